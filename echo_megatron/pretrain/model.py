"""The launcher's model: a Megatron `HybridModelConfig` whose stack spec comes through `--spec`.

`--spec MODULE NAME` goes through Megatron's own mechanism (`hybrid_config_from_args` imports it and
the checkpoint's stored args record it); the launcher's default is the Echo spec for
`--echo-attention`/`--echo-ffn`/`--transformer-impl` (see `arguments.spec_name`). Megatron 0.19's
`import_module` returns None on an import error and `HybridModelBuilder` then silently builds its stock
softmax stack, so the spec is checked before the build (imported, right '*' and '-' blocks) and every
built layer after it (`check_built_layers`, which also prints the layer table).
"""

from __future__ import annotations

import sys
from functools import partial

import torch

from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec, import_module
from megatron.training.argument_utils import core_transformer_config_from_args, hybrid_config_from_args
from megatron.training.models.hybrid import HybridModelConfig
from megatron.core.utils import unwrap_model

from echo_megatron.megatron.config import SKAConfig
from echo_megatron.megatron.koopman_mlp import KoopmanMLP
from echo_megatron.megatron.ska_layer import SpectralKoopmanAttention

ATTENTION_CLASSES = {"ska": SpectralKoopmanAttention, "softmax": SelfAttention}
"""--echo-attention -> the class of every '*' layer's `self_attention`."""
FFN_CLASSES = {"mlp": MLP, "koopman": KoopmanMLP}
"""--echo-ffn -> the class of every '-' layer's `mlp`."""


def _block_class(spec_or_module) -> type | None:
    """The class a spec entry builds: a ModuleSpec's module, a class, or the class of a bound
    classmethod wrapped in a partial (Megatron's `partial(MLP.as_mlp_submodule, ...)`)."""
    module = spec_or_module.module if isinstance(spec_or_module, ModuleSpec) else spec_or_module
    if isinstance(module, partial):
        module = getattr(module.func, "__self__", None)
    return module if isinstance(module, type) else None


def load_stack_spec(spec: list[str], attention: str, ffn: str) -> ModuleSpec:
    """Import `--spec MODULE NAME` and check that its '*' and '-' blocks are what --echo-attention and
    --echo-ffn ask for (a clear ValueError otherwise, instead of Megatron's silent fallback)."""
    if not spec or len(spec) != 2:
        raise ValueError(f"--spec takes a module and an object name, e.g. --spec echo_megatron.megatron.specs "
                         f"echo_hybrid_stack_spec; got {spec!r}")
    stack = import_module(tuple(spec))
    if stack is None:
        raise ValueError(f"--spec {' '.join(spec)}: the module could not be imported (see the error above); Megatron "
                         "would silently train its stock softmax stack instead")
    if not isinstance(stack, ModuleSpec) or not hasattr(stack.submodules, "attention_layer"):
        raise ValueError(f"--spec {' '.join(spec)} is not a hybrid stack ModuleSpec (got {type(stack).__name__})")
    for symbol, layer, field, wanted, flag, kind in (
        (Symbols.ATTENTION, stack.submodules.attention_layer, "self_attention", ATTENTION_CLASSES[attention],
         "--echo-attention", attention),
        (Symbols.MLP, stack.submodules.mlp_layer, "mlp", FFN_CLASSES[ffn], "--echo-ffn", ffn),
    ):
        block = _block_class(getattr(layer.submodules, field)) if isinstance(layer, ModuleSpec) else None
        if block is None or not issubclass(block, wanted):
            name = getattr(block, "__name__", repr(block))
            raise ValueError(
                f"--spec {' '.join(spec)} puts {name} in the {symbol!r} layers but {flag} {kind} needs "
                f"{wanted.__name__}: drop --spec (the default follows --echo-attention, --echo-ffn and "
                f"--transformer-impl) or pass a spec with {wanted.__name__} there"
            )
    return stack


def model_config_from_args(args) -> HybridModelConfig:
    """The `HybridModelConfig` for `pretrain()`: an `SKAConfig` transformer, the checked `--spec`, and a
    post-build hook that checks every layer and prints the layer table. (`--spec` is checked by the
    launcher's `check_echo_args` first, with `load_stack_spec`.)"""
    transformer = core_transformer_config_from_args(args, SKAConfig)
    config = hybrid_config_from_args(args, transformer)
    config.post_wrap_hooks.append(partial(check_built_layers, attention=args.echo_attention, ffn=args.echo_ffn))
    return config


def layer_table(model) -> str:
    """One line per layer of this pipeline stage: number, pattern symbol, block class, parameters here."""
    stack = model.decoder
    rows = [f"{'layer':>5}  sym  {'block':<26} {'params (this rank)':>18}"]
    for symbol, layer in zip(stack.layer_type_list, stack.layers):
        block = _built_block(symbol, layer)
        params = sum(p.numel() for p in layer.parameters())
        rows.append(f"{layer.layer_number:>5}  {symbol:^3}  {type(block).__name__:<26} {params:>18,}")
    return "\n".join(rows)


_BLOCK_FIELDS = {Symbols.ATTENTION: "self_attention", Symbols.MLP: "mlp", Symbols.MAMBA: "mixer"}


def _built_block(symbol: str, layer: torch.nn.Module) -> torch.nn.Module:
    """The mixer / feed-forward block inside a built hybrid layer (the layer itself for other symbols)."""
    return getattr(layer, _BLOCK_FIELDS[symbol]) if symbol in _BLOCK_FIELDS else layer


def _print_whole(text: str) -> None:
    """Write text to stdout in one system call, so that another stage's rank printing into the same log (torchrun
    joins them) cannot land inside it. print() may not: unbuffered (PYTHONUNBUFFERED) it writes the line ending
    separately, buffered it appends to what is left unflushed. A pipe keeps one write whole up to PIPE_BUF (4 KiB:
    tables of up to about 60 layers)."""
    sys.stdout.flush()
    sys.stdout.write(text)
    sys.stdout.flush()


def check_built_layers(model_list: list, attention: str, ffn: str) -> list:
    """Post-build hook: assert every '*' / '-' layer holds the class --echo-attention / --echo-ffn ask
    for, and print the layer table (first tensor- and data-parallel rank of each pipeline stage)."""
    from megatron.core import parallel_state

    for model in unwrap_model(model_list):
        for symbol, layer in zip(model.decoder.layer_type_list, model.decoder.layers):
            wanted = {Symbols.ATTENTION: ATTENTION_CLASSES[attention], Symbols.MLP: FFN_CLASSES[ffn]}.get(symbol)
            block = _built_block(symbol, layer)
            if wanted is not None and not isinstance(block, wanted):
                raise RuntimeError(f"layer {layer.layer_number} ({symbol!r}) was built as {type(block).__name__}, "
                                   f"expected {wanted.__name__}: check --spec")
        if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
            stage = parallel_state.get_pipeline_model_parallel_rank()
            _print_whole(f"echo-megatron layer table (pipeline stage {stage}):\n{layer_table(model)}\n")
    return model_list
