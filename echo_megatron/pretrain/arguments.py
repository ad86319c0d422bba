"""Command-line flags of the launcher: every Megatron-LM flag, plus the Echo ones.

- `--ska-*`: generated from `SKAConfig`'s `ska_*` fields with Megatron's own `ArgumentGroupFactory`
  (help text from the fields' docstrings); `core_transformer_config_from_args(args, SKAConfig)` reads
  them back, and the checkpoint's stored args record them.
- `--echo-preset NAME`: architecture defaults (pattern, sizes, vocabulary, sequence length, `ska_*`)
  from `echo_megatron.megatron.presets`; any explicit flag overrides them (they are parser defaults).
- `--echo-attention ska|softmax`, `--echo-ffn mlp|koopman`: what the '*' and '-' layers are; with
  `--transformer-impl` they select the default `--spec` (an `echo_megatron.megatron.specs` object).
- `--cpu`: run on a machine without CUDA (see `cpu_training`); implies the flags in `CPU_DEFAULTS`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import typing
from typing import Sequence

from megatron.training.argument_utils import ArgumentGroupFactory

from echo_megatron.megatron.config import SKAConfig
from echo_megatron.megatron.presets import PRESETS, get_preset
from echo_megatron.megatron import specs
from echo_megatron.megatron.specs import ATTENTION_KINDS, FFN_KINDS, STACK_SPECS

from . import compat

SPECS_MODULE = specs.__name__

CPU_DEFAULTS = dict(
    distributed_backend="gloo",
    transformer_impl="local",
    gradient_accumulation_fusion=False,
    masked_softmax_fusion=False,
    bias_gelu_fusion=False,
    bias_dropout_fusion=False,
    no_persist_layer_norm=True,
    use_cpu_initialization=True,
)
"""What `--cpu` implies: `--distributed-backend gloo --transformer-impl local
--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion
--no-bias-dropout-fusion --no-persist-layer-norm --use-cpu-initialization`."""

LAUNCHER_DEFAULTS = dict(eval_interval=1000)
"""Megatron-LM's historical defaults for flags the 0.19 parser leaves at None but `pretrain()` needs."""

PRESET_DEFAULTS = dict(tokenizer_type="NullTokenizer", make_vocab_size_divisible_by=16)
"""With `--echo-preset`: Megatron's NullTokenizer over the preset's vocabulary, and vocabulary padding
to a multiple of 16·TP instead of 128·TP, so the padded vocabulary (hence the checkpoint's embedding and
output shapes) is the same at every TP size up to 8 for the presets' vocabularies (multiples of 128)."""


class SKAArgumentGroupFactory(ArgumentGroupFactory):
    """Megatron's `ArgumentGroupFactory` for `SKAConfig`'s `ska_*` fields.

    `SKAConfig` is written with `from __future__ import annotations`, so its fields' types are strings
    ("Optional[int]"), which the stock factory cannot map to argparse types; resolve them first.
    """

    def __init__(self) -> None:
        ska_fields = {f.name for f in dataclasses.fields(SKAConfig) if f.name.startswith("ska_")}
        super().__init__(SKAConfig, exclude=[f.name for f in dataclasses.fields(SKAConfig) if f.name not in ska_fields])
        self._hints = typing.get_type_hints(SKAConfig)

    def _build_argparse_kwargs_from_field(self, attribute: dataclasses.Field) -> dict:
        resolved = copy.copy(attribute)
        resolved.type = self._hints[attribute.name]
        return super()._build_argparse_kwargs_from_field(resolved)


def spec_name(attention: str, ffn: str, transformer_impl: str) -> str:
    """Name of the `echo_megatron.megatron.specs` stack spec for these layer kinds and implementation."""
    stack = STACK_SPECS[("local" if transformer_impl == "local" else "te", attention, ffn)]
    return next(name for name, value in vars(specs).items() if value is stack)


def _preparse(argv: Sequence[str]) -> argparse.Namespace:
    """The Echo flags that decide other flags' defaults (read before Megatron parses everything)."""
    parser = argparse.ArgumentParser(prog="echo_megatron.pretrain", add_help=False, allow_abbrev=False)
    _add_echo_flags(parser)
    parser.add_argument("--transformer-impl", default=None)
    known, _ = parser.parse_known_args(list(argv))
    return known


def _as_flags(defaults: dict) -> str:
    """Megatron's flags that set `defaults`: `--name value`, `--name` for True, `--no-name` for False."""
    def flag(name: str, value) -> str:
        option = name.replace("_", "-")
        if isinstance(value, bool):
            return f"--{option}" if value else f"--no-{option}"
        return f"--{option} {value}"

    return " ".join(flag(name, value) for name, value in defaults.items())


def _add_echo_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="echo-megatron")
    group.add_argument("--cpu", action="store_true",
                       help="run without CUDA (gloo, local layers, CPU mode); implies " + _as_flags(CPU_DEFAULTS))
    group.add_argument("--echo-preset", choices=tuple(PRESETS), default=None,
                       help="architecture defaults (pattern, sizes, vocabulary, sequence length, ska_*) from "
                            "echo_megatron.megatron.presets; explicit flags override them")
    group.add_argument("--echo-attention", choices=ATTENTION_KINDS, default="ska",
                       help="what the '*' layers are: SKA (default) or softmax attention (baseline)")
    group.add_argument("--echo-ffn", choices=FFN_KINDS, default=None,
                       help="what the '-' layers are: Megatron's MLP or the Koopman MLP (default: the preset's, "
                            "else mlp)")
    group.add_argument("--echo-peak-tflops", type=float, default=None,
                       help="peak TFLOP/s per device for the MFU in the echo-megatron log line (default: the "
                            "bf16 peak of a known GPU; none on the CPU)")


def echo_defaults(argv: Sequence[str]) -> dict:
    """Parser defaults implied by `--cpu`, `--echo-preset`, `--echo-attention`, `--echo-ffn`."""
    echo = _preparse(argv)
    defaults: dict = dict(LAUNCHER_DEFAULTS)
    ffn = echo.echo_ffn or "mlp"
    if echo.echo_preset is not None:
        preset = get_preset(echo.echo_preset)
        defaults.update(PRESET_DEFAULTS)
        defaults.update(preset.megatron_args())
        ffn = echo.echo_ffn or preset.ffn
    if echo.cpu:
        defaults.update(CPU_DEFAULTS)
    defaults["echo_ffn"] = ffn
    impl = echo.transformer_impl or defaults.get("transformer_impl", "transformer_engine")
    defaults["spec"] = [SPECS_MODULE, spec_name(echo.echo_attention, ffn, impl)]
    return defaults


def add_echo_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Megatron `extra_args_provider`: add the Echo and `--ska-*` flags and the defaults they imply."""
    _add_echo_flags(parser)
    SKAArgumentGroupFactory().build_group(parser, title="Spectral Koopman Attention (SKAConfig ska_* fields)")
    parser.set_defaults(**echo_defaults(sys.argv[1:] if argv is None else argv))
    return compat.escape_unformattable_help(parser)


CHECKPOINT_MODEL_ARGS = (*(f.name for f in dataclasses.fields(SKAConfig) if f.name.startswith("ska_") and f.name != "ska_backend"),
                         "echo_attention", "echo_ffn")
"""Echo flags that define the model: `--use-checkpoint-args` restores them from the checkpoint, as Megatron
restores its own model args (its list does not know ours). `ska_backend` is a run-time choice and stays."""


def restore_checkpoint_model_args(args: argparse.Namespace, checkpoint_args: argparse.Namespace) -> None:
    """Set `CHECKPOINT_MODEL_ARGS` from a checkpoint's stored args (the checkpoint wins, as for Megatron's)."""
    from megatron.training.utils import print_rank_0

    for name in CHECKPOINT_MODEL_ARGS:
        value = getattr(checkpoint_args, name, None)
        if value is not None and getattr(args, name, None) != value:
            print_rank_0(f"Setting {name} to {value} from checkpoint")
            setattr(args, name, value)
