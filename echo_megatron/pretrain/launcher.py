"""`main()`: Megatron-LM's `pretrain_hybrid.py`, for Echo models, on megatron-core 0.19.2's trainer.

    torchrun --nproc-per-node N -m echo_megatron.pretrain [--cpu] [--echo-preset NAME] <Megatron flags>

Parses every Megatron-LM flag plus the Echo flags (`arguments`), checks the Echo-specific settings
before anything is built (`check_echo_args`), applies the run-time Megatron fixes (`compat`) and, with
`--cpu`, the CPU fixes (`cpu_training`), then runs `megatron.training.pretrain()` with a
`HybridModelConfig` (`model`), Megatron's GPT datasets and a language-model forward step (`data`).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import torch
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols

from echo_megatron.ops.context_parallel import check_context_parallel_layout

from . import compat, cpu_training
from .arguments import add_echo_arguments, restore_checkpoint_model_args
from .model import load_stack_spec


def check_echo_args(args) -> None:
    """Clear errors (SystemExit naming the flag), before anything is built, for settings Megatron would
    reject deep inside training, or silently accept (a --spec that is not what --echo-attention says)."""
    def fail(message: str):
        raise SystemExit(f"echo_megatron.pretrain: {message}")

    if not args.cpu and not torch.cuda.is_available():
        fail("CUDA is not available; add --cpu to train on the CPU")
    if args.cpu and args.transformer_impl != "local":
        fail(f"--cpu needs --transformer-impl local (Transformer Engine needs CUDA), got {args.transformer_impl}")
    if args.transformer_impl == "transformer_engine" and not HAVE_TE:
        fail("Transformer Engine is not installed: add --transformer-impl local (Megatron's parallel linears, "
             "torch norms, SDPA softmax attention)")
    if args.hybrid_layer_pattern is None:
        fail("give --echo-preset NAME, or --hybrid-layer-pattern and the model sizes")
    if args.yaml_cfg is not None:
        fail("--yaml-cfg is not supported by this launcher; pass flags")
    heads = args.ska_num_heads or args.num_attention_heads
    if args.echo_attention == "ska" and heads % args.tensor_model_parallel_size:
        fail(f"SKA heads ({heads}, from --ska-num-heads or --num-attention-heads) must be divisible by "
             f"--tensor-model-parallel-size ({args.tensor_model_parallel_size})")
    if args.echo_attention == "ska" and args.ska_chunk_size >= args.seq_length:
        fail(f"--ska-chunk-size ({args.ska_chunk_size}) must be smaller than --seq-length ({args.seq_length}): "
             "otherwise every query sits in chunk 0 and reads nothing")
    if args.echo_attention == "ska" and Symbols.ATTENTION in args.hybrid_layer_pattern:
        try:
            check_context_parallel_layout(args.seq_length, args.context_parallel_size, args.ska_chunk_size)
        except ValueError as error:
            fail(f"--seq-length, --context-parallel-size, --ska-chunk-size: {error}")
    try:
        load_stack_spec(args.spec, args.echo_attention, args.echo_ffn)
    except ValueError as error:
        fail(str(error))


# Stored args that define the model an Echo checkpoint holds (ska_backend is a run-time choice)
MODEL_DEFINING_ARGS = ("hybrid_layer_pattern", "echo_attention", "echo_ffn", "ska_num_heads", "ska_rank",
                       "ska_value_dim", "ska_chunk_size", "ska_power", "ska_eps", "ska_norm", "ska_power_iters")


def check_load_checkpoint(args) -> None:
    """--load of an existing checkpoint: its files are complete (`check_torch_dist_files`) and it holds the
    model these flags build (MODEL_DEFINING_ARGS), else SystemExit naming the file or the flags, before
    anything is built. A --load directory without a checkpoint is Megatron's fresh start, left alone."""
    from megatron.core import dist_checkpointing
    from megatron.training.checkpointing import get_checkpoint_tracker_filename, read_metadata

    from echo_megatron.megatron.checkpoint_files import CheckpointFilesError, check_torch_dist_files

    if not args.load or args.ckpt_format != "torch_dist":
        return
    tracker = get_checkpoint_tracker_filename(args.load)
    if args.ckpt_step is None and not os.path.isfile(tracker):
        return
    iteration, release = (args.ckpt_step, False) if args.ckpt_step is not None else read_metadata(tracker)
    directory = os.path.join(args.load, "release" if release else f"iter_{iteration:07d}")
    try:
        check_torch_dist_files(directory)
        stored = dist_checkpointing.load_common_state_dict(directory).get("args")
    except CheckpointFilesError as error:
        raise SystemExit(f"echo_megatron.pretrain: --load: {error}") from error
    differing = [f"--{name.replace('_', '-')} {getattr(args, name)!r} (checkpoint: {getattr(stored, name)!r})"
                 for name in MODEL_DEFINING_ARGS
                 if stored is not None and hasattr(stored, name) and getattr(stored, name) != getattr(args, name, None)]
    if differing:
        raise SystemExit(f"echo_megatron.pretrain: --load {args.load}: the checkpoint holds another model than these "
                         f"flags build: {'; '.join(differing)} (pass the checkpoint's values, or --use-checkpoint-args)")


def parse_args(argv: Sequence[str] | None = None):
    """Megatron's `parse_and_validate_args` with the Echo flags, and `check_echo_args` before Megatron's
    own validation (sets Megatron's global args; builds the tokenizer)."""
    from megatron.training import arguments
    from megatron.training.checkpointing import load_args_from_checkpoint
    from megatron.training.global_vars import set_global_variables

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = arguments.parse_args(extra_args_provider=add_echo_arguments)
    if args.use_checkpoint_args:  # Megatron's model args, then ours (Megatron's list does not know them)
        for load_arg in ("pretrained_checkpoint", "load"):
            loaded = load_args_from_checkpoint(args, load_arg=load_arg)
            if isinstance(loaded, tuple):  # (args, checkpoint_args); just args when there was nothing to load
                restore_checkpoint_model_args(args, loaded[1])
    check_echo_args(args)
    check_load_checkpoint(args)
    if not args.mock_data:
        from .data import check_data_files

        try:
            check_data_files(args)
        except ValueError as error:
            raise SystemExit(f"echo_megatron.pretrain: --data-path: {error}") from error
    arguments.validate_args(args)
    set_global_variables(args)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run `megatron.training.pretrain()` on an Echo hybrid model (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--cpu" in argv:
        cpu_training.enable()
    compat.apply()
    args = parse_args(argv)

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from . import throughput
    from .data import forward_step, train_valid_test_datasets_provider
    from .model import model_config_from_args

    model_config = model_config_from_args(args)
    throughput.install(args, model_config)
    pretrain(pretrain_cfg_container_from_args(args, model_config), train_valid_test_datasets_provider,
             ModelType.encoder_or_decoder, forward_step)
