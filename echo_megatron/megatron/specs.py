"""Module-level `ModuleSpec`s for Echo hybrid stacks, and `build_hybrid_model`.

Stacks (Megatron's `HybridStack`, pattern symbols `'M'` Mamba-2, `'*'` attention slot, `'-'` FFN):

| object                              | `'*'`            | `'-'`        | linears / norms          |
|-------------------------------------|------------------|--------------|--------------------------|
| `echo_hybrid_stack_spec`            | SKA              | MLP          | Transformer Engine (GPU) |
| `echo_hybrid_stack_spec_local`      | SKA              | MLP          | Megatron parallel + torch|
| `echo_koopman_stack_spec`           | SKA              | Koopman MLP  | Transformer Engine       |
| `echo_koopman_stack_spec_local`     | SKA              | Koopman MLP  | local                    |
| `softmax_hybrid_stack_spec`         | softmax attention| MLP          | Transformer Engine       |
| `softmax_hybrid_stack_spec_local`   | softmax (SDPA)   | MLP          | local                    |
| `softmax_koopman_stack_spec(_local)`| softmax attention| Koopman MLP  | TE / local               |

The TE specs reuse the Mamba, attention and MLP layer specs of Megatron's own
`hybrid_stack_spec`. The local softmax specs' core attention is `SDPAttention` (PyTorch's
`scaled_dot_product_attention`: flash/cuDNN kernels, no T×T score matrix), not Megatron's local
`DotProductAttention`. Importing this module never needs Transformer Engine: as in Megatron's
`hybrid_layer_specs`, the TE classes are placeholders without TE and only fail when instantiated.
Local specs map their separate norms onto the TE checkpoint keys (`sharded_state_dict_keys_map`),
so distributed checkpoints load across the two. Megatron's `HybridStack` builds its final norm with
`TENorm` whatever the spec: `build_hybrid_model` with a local spec on a GPU without Transformer Engine,
the launcher without it, and `enable_cpu_mode()` swap it for `TorchNorm` (`norm.use_torch_final_norm`).
"""

from __future__ import annotations

from functools import partial

import torch

from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear, TERowParallelLinear
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols, parse_hybrid_pattern
from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as megatron_hybrid_stack_spec
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from echo_megatron.ops.context_parallel import check_context_parallel_layout

from .config import SKAConfig
from .koopman_mlp import KoopmanMLP, KoopmanMLPSubmodules
from .norm import TorchNorm, use_torch_final_norm
from .parallel import missing_parallel_state
from .sdpa_attention import SDPAttention
from .ska_layer import SKASubmodules, SpectralKoopmanAttention

SPEC_KINDS = ("local", "te")
FFN_KINDS = ("mlp", "koopman")
ATTENTION_KINDS = ("ska", "softmax")
PATTERN_SYMBOLS = (Symbols.MAMBA, Symbols.ATTENTION, Symbols.MLP)

_megatron_layers: HybridStackSubmodules = megatron_hybrid_stack_spec.submodules

# ----------------------------------------------------------------------------- Mamba-2 ('M')
mamba_layer_spec = _megatron_layers.mamba_layer
mamba_layer_spec_local = ModuleSpec(
    module=MambaLayer,
    submodules=MambaLayerSubmodules(
        norm=TorchNorm,
        mixer=ModuleSpec(
            module=MambaMixer,
            submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
        ),
        mamba_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
    ),
)


# slot -> (layer class, norm field, block field, bias-dropout-add field) of TransformerLayerSubmodules
_LAYER_SLOTS = {
    "attention": (TransformerLayer, "input_layernorm", "self_attention", "self_attn_bda"),
    "ffn": (MLPLayer, "pre_mlp_layernorm", "mlp", "mlp_bda"),
}


def _layer(slot: str, block, fused_norm_linear: str | None = None) -> ModuleSpec:
    """A '*' (`slot="attention"`) or '-' (`slot="ffn"`) layer around `block`. TE specs fuse the
    pre-norm into the block's first linear; local specs pass that linear's name as
    `fused_norm_linear` and get a `TorchNorm` whose checkpoint keys are those of the fused norm."""
    module, norm_field, block_field, bda_field = _LAYER_SLOTS[slot]
    submodules = {block_field: block, bda_field: get_bias_dropout_add}
    if fused_norm_linear is not None:
        submodules[norm_field] = TorchNorm
        submodules["sharded_state_dict_keys_map"] = {f"{norm_field}.": f"{block_field}.{fused_norm_linear}.layer_norm_"}
    return ModuleSpec(module=module, submodules=TransformerLayerSubmodules(**submodules))


# ----------------------------------------------------------------------------- SKA ('*')
ska_layer_spec = _layer(
    "attention",
    ModuleSpec(
        module=SpectralKoopmanAttention,
        submodules=SKASubmodules(in_proj=TELayerNormColumnParallelLinear, out_proj=TERowParallelLinear),
    )
)
ska_layer_spec_local = _layer(
    "attention",
    ModuleSpec(
        module=SpectralKoopmanAttention,
        submodules=SKASubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
    ),
    fused_norm_linear="in_proj",
)

# ----------------------------------------------------------------------------- softmax attention ('*', baselines)
softmax_attention_layer_spec = _megatron_layers.attention_layer
softmax_attention_layer_spec_local = _layer(
    "attention",
    ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=SDPAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    ),
    fused_norm_linear="linear_qkv",
)

# ----------------------------------------------------------------------------- FFN ('-')
mlp_layer_spec = _megatron_layers.mlp_layer
mlp_layer_spec_local = _layer(
    "ffn",
    partial(MLP.as_mlp_submodule,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
    fused_norm_linear="linear_fc1",
)
koopman_layer_spec = _layer(
    "ffn",
    ModuleSpec(
        module=KoopmanMLP,
        submodules=KoopmanMLPSubmodules(lift=TELayerNormColumnParallelLinear, readout=TERowParallelLinear),
    )
)
koopman_layer_spec_local = _layer(
    "ffn",
    ModuleSpec(module=KoopmanMLP, submodules=KoopmanMLPSubmodules(lift=ColumnParallelLinear, readout=RowParallelLinear)),
    fused_norm_linear="lift",
)


def _stack(mamba: ModuleSpec, attention: ModuleSpec, ffn: ModuleSpec) -> ModuleSpec:
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(mamba_layer=mamba, attention_layer=attention, mlp_layer=ffn),
    )


# ----------------------------------------------------------------------------- stacks
echo_hybrid_stack_spec = _stack(mamba_layer_spec, ska_layer_spec, mlp_layer_spec)
echo_hybrid_stack_spec_local = _stack(mamba_layer_spec_local, ska_layer_spec_local, mlp_layer_spec_local)
echo_koopman_stack_spec = _stack(mamba_layer_spec, ska_layer_spec, koopman_layer_spec)
echo_koopman_stack_spec_local = _stack(mamba_layer_spec_local, ska_layer_spec_local, koopman_layer_spec_local)
softmax_hybrid_stack_spec = _stack(mamba_layer_spec, softmax_attention_layer_spec, mlp_layer_spec)
softmax_hybrid_stack_spec_local = _stack(
    mamba_layer_spec_local, softmax_attention_layer_spec_local, mlp_layer_spec_local
)
softmax_koopman_stack_spec = _stack(mamba_layer_spec, softmax_attention_layer_spec, koopman_layer_spec)
softmax_koopman_stack_spec_local = _stack(
    mamba_layer_spec_local, softmax_attention_layer_spec_local, koopman_layer_spec_local
)

STACK_SPECS: dict[tuple[str, str, str], ModuleSpec] = {
    ("te", "ska", "mlp"): echo_hybrid_stack_spec,
    ("local", "ska", "mlp"): echo_hybrid_stack_spec_local,
    ("te", "ska", "koopman"): echo_koopman_stack_spec,
    ("local", "ska", "koopman"): echo_koopman_stack_spec_local,
    ("te", "softmax", "mlp"): softmax_hybrid_stack_spec,
    ("local", "softmax", "mlp"): softmax_hybrid_stack_spec_local,
    ("te", "softmax", "koopman"): softmax_koopman_stack_spec,
    ("local", "softmax", "koopman"): softmax_koopman_stack_spec_local,
}
"""(spec, attention, ffn) -> stack spec, as selected by `build_hybrid_model`."""


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def stack_spec(spec: str = "local", ffn: str = "mlp", attention: str = "ska") -> ModuleSpec:
    """The module-level stack spec for `spec` ("local" | "te"), `ffn` ("mlp" | "koopman") and
    `attention` ("ska" | "softmax")."""
    _check_choice("spec", spec, SPEC_KINDS)
    _check_choice("ffn", ffn, FFN_KINDS)
    _check_choice("attention", attention, ATTENTION_KINDS)
    return STACK_SPECS[(spec, attention, ffn)]


def check_pattern(pattern: str, config: TransformerConfig) -> None:
    """A hybrid pattern these stacks can build: symbols 'M', '*', '-' (and '|' pipeline
    boundaries), one per layer of `config.num_layers`; no multi-token prediction."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty string of {PATTERN_SYMBOLS}, got {pattern!r}")
    if Symbols.MTP_SEPARATOR in pattern:
        raise ValueError(f"pattern: multi-token prediction ('/') is not supported by the Echo stacks, got {pattern!r}")
    unknown = sorted(set(pattern) - set(PATTERN_SYMBOLS) - {Symbols.PIPE})
    if unknown:
        raise ValueError(f"pattern may only contain {PATTERN_SYMBOLS} (and '|'), got {unknown} in {pattern!r}")
    main = parse_hybrid_pattern(pattern).main_pattern
    layers = len(main.replace(Symbols.PIPE, ""))
    if layers != config.num_layers:
        raise ValueError(f"pattern {pattern!r} has {layers} layers but config.num_layers = {config.num_layers}")


def build_hybrid_model(
    config: TransformerConfig,
    pattern: str,
    vocab_size: int,
    seq_length: int,
    spec: str = "local",
    ffn: str = "mlp",
    attention: str = "ska",
    **model_kwargs,
) -> HybridModel:
    """A Megatron `HybridModel` with Mamba-2 in 'M', SKA (or softmax attention) in '*', MLP (or the
    Koopman MLP) in '-'.

    Args:
        config: `SKAConfig`, or a plain `TransformerConfig` (SKA then runs with
            `SKAConfig.from_transformer_config`'s defaults); its `num_layers` must equal the number
            of layers in `pattern`.
        pattern: Megatron hybrid layer pattern, e.g. "M-*-M-*-" (with '|' for pipeline stages).
        vocab_size, seq_length: vocabulary size and maximum sequence length.
        spec: "local" (Megatron parallel linears + torch norms; CPU mode) or "te" (Transformer Engine).
        ffn, attention: see `stack_spec`.
        **model_kwargs: passed to `HybridModel` (e.g. share_embeddings_and_output_weights,
            pg_collection, pre_process/post_process, parallel_output).

    Call `echo_megatron.megatron.initialize_single_process(seed)` first (process group, Megatron's
    model-parallel state and RNG seed; on a machine without CUDA it also enables the CPU mode).
    """
    stack = stack_spec(spec, ffn, attention)
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig (an SKAConfig to tune SKA), got {type(config).__name__}")
    check_pattern(pattern, config)
    for name, value in (("vocab_size", vocab_size), ("seq_length", seq_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    missing = missing_parallel_state(needs_groups="pg_collection" not in model_kwargs)
    if missing:
        raise RuntimeError(f"{missing}: call echo_megatron.megatron.initialize_single_process(seed=0) before "
                           "build_hybrid_model (under torchrun it uses the launcher's ranks)")
    if attention == "ska" and Symbols.ATTENTION in pattern:
        check_context_parallel_layout(seq_length, config.context_parallel_size,
                                      SKAConfig.from_transformer_config(config).ska_chunk_size)
    if not torch.cuda.is_available():
        from .cpu import cpu_mode_enabled  # CPU-only machines: this check never runs on GPUs

        if not cpu_mode_enabled():
            raise RuntimeError("CUDA is not available: call echo_megatron.megatron.initialize_single_process() "
                               "(or echo_megatron.megatron.cpu.enable_cpu_mode()) before building Megatron "
                               "models on the CPU")
        if spec == "te":
            raise RuntimeError("spec='te' needs Transformer Engine and CUDA; use spec='local' on the CPU")
    elif spec == "local":
        use_torch_final_norm()  # a GPU without Transformer Engine
    return HybridModel(
        config=config,
        hybrid_stack_spec=stack,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        hybrid_layer_pattern=pattern,
        **model_kwargs,
    )
