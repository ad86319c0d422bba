"""Megatron side of the converters: architecture fields, torch_dist checkpoints, models (CPU, TP = 1).

Checkpoints are what megatron.training's `save_checkpoint` writes with `--ckpt-format torch_dist`:
`DIR/latest_checkpointed_iteration.txt` and `DIR/iter_0000008/` holding a distributed checkpoint whose common
state dict has `args` (Megatron's Namespace) and `iteration`, and whose tensors carry the names of the model's
`sharded_state_dict` (optimizer tensors, if any, are never read).

Stored `args` fields read (all as Megatron-LM names them): `hybrid_layer_pattern` (or the deprecated
`hybrid_override_pattern`), `hidden_size`, `num_attention_heads`, `group_query_attention` +
`num_query_groups`, `kv_channels`, `ffn_hidden_size`, `swiglu`, `squared_relu`, `norm_epsilon` /
`layernorm_epsilon`, `normalization`, `add_bias_linear`, `add_qkv_bias`, `qk_layernorm`,
`position_embedding_type`, `padded_vocab_size`, `vocab_size`, `seq_length`,
`untie_embeddings_and_output_weights`, `mamba_state_dim`, `mamba_head_dim`, `mamba_num_groups` and every
`ska_*` field of `SKAConfig` (missing ones take SKAConfig's defaults). Whether `'*'` is SKA or softmax and
`'-'` an MLP or the Koopman MLP is read from the tensor names, so it cannot disagree with the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .convert import EXPORTED_SKA_FIELDS, MODEL_PREFIXES, ArchitectureFields, ConversionError

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"  # Megatron's name for converted checkpoints: loaded as iteration 0, no optimizer or RNG state
CHECKPOINT_VERSION = 3.0
_ACTIVATION_NAMES = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def megatron_session():
    """CPU mode (without CUDA), a one-rank gloo group and TP = 1 model-parallel state, unless already set up."""
    from megatron.core import parallel_state, tensor_parallel

    from echo_megatron.megatron.cpu import enable_cpu_mode, install_cpu_rng_tracker

    cpu = enable_cpu_mode()
    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                             world_size=1)
    owns_state = not parallel_state.model_parallel_is_initialized()
    if owns_state:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        if cpu:
            install_cpu_rng_tracker()
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    try:
        yield
    finally:
        if owns_state:
            parallel_state.destroy_model_parallel()
        if owns_group:
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------- fields
def _kinds(tensors: Mapping[str, Tensor]) -> tuple[str, str]:
    """(attention, ffn) kinds from the tensor names."""
    attention = "softmax" if any(".self_attention.linear_qkv." in name for name in tensors) else "ska"
    ffn = "koopman" if any(name.endswith(".mlp.lift.weight") for name in tensors) else "mlp"
    return attention, ffn


def _main_pattern(pattern: Optional[str]) -> str:
    if not pattern:
        raise ConversionError("the model has no hybrid layer pattern (hybrid_layer_pattern): not a hybrid model")
    if "/" in pattern:
        raise ConversionError(f"multi-token prediction layers ('/' in pattern {pattern!r}) are not supported")
    return pattern.replace("|", "")


def _activation_name(function) -> str:
    from megatron.core.activations import squared_relu

    if function is squared_relu:
        return "relu2"
    return _ACTIVATION_NAMES.get(function, getattr(function, "__name__", repr(function)))


def _ska_fields(source) -> dict:
    from echo_megatron.megatron.config import SKAConfig

    return {f.name: getattr(source, f.name) for f in dataclasses.fields(SKAConfig)
            if f.name.startswith("ska_") and getattr(source, f.name, None) is not None}


def fields_from_model(model, tensors: Mapping[str, Tensor]) -> ArchitectureFields:
    """Fields of an in-memory `HybridModel` (built by `build_hybrid_model`)."""
    config = model.config
    attention, ffn = _kinds(tensors)
    return ArchitectureFields(
        pattern=_main_pattern(model.hybrid_layer_pattern), attention=attention, ffn=ffn,
        hidden_size=config.hidden_size, vocab_size=model.vocab_size,
        tied_embeddings=model.share_embeddings_and_output_weights, norm_epsilon=config.layernorm_epsilon,
        normalization=config.normalization, gated_linear_unit=config.gated_linear_unit,
        activation=_activation_name(config.activation_func), ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads, kv_channels=config.kv_channels,
        seq_length=model.max_sequence_length, mamba_state_dim=config.mamba_state_dim,
        mamba_head_dim=config.mamba_head_dim, mamba_num_groups=config.mamba_num_groups,
        add_bias_linear=config.add_bias_linear, add_qkv_bias=config.add_qkv_bias, qk_layernorm=config.qk_layernorm,
        position_embedding_type=model.position_embedding_type, softmax_scale=config.softmax_scale,
        ska=_ska_fields(config),
    )


def fields_from_args(args: Namespace, tensors: Mapping[str, Tensor]) -> ArchitectureFields:
    """Fields of a checkpoint from its stored Megatron `args` (see the module docstring for the names)."""
    def arg(name, default=None):
        return getattr(args, name, default)

    attention, ffn = _kinds(tensors)
    heads = arg("num_attention_heads")
    activation = "silu" if arg("swiglu") else ("relu2" if arg("squared_relu") else "gelu")
    return ArchitectureFields(
        pattern=_main_pattern(arg("hybrid_layer_pattern") or arg("hybrid_override_pattern")), attention=attention,
        ffn=ffn, hidden_size=arg("hidden_size"), vocab_size=arg("padded_vocab_size") or arg("vocab_size"),
        tied_embeddings=not arg("untie_embeddings_and_output_weights", False),
        norm_epsilon=arg("norm_epsilon", arg("layernorm_epsilon", 1e-5)), normalization=arg("normalization", "RMSNorm"),
        gated_linear_unit=bool(arg("swiglu") or arg("gated_linear_unit")), activation=activation,
        ffn_hidden_size=arg("ffn_hidden_size"), num_attention_heads=heads,
        num_query_groups=arg("num_query_groups") if arg("group_query_attention") else heads,
        kv_channels=arg("kv_channels") or arg("hidden_size") // heads, seq_length=arg("seq_length"),
        mamba_state_dim=arg("mamba_state_dim", 128), mamba_head_dim=arg("mamba_head_dim", 64),
        mamba_num_groups=arg("mamba_num_groups", 8), add_bias_linear=bool(arg("add_bias_linear", False)),
        add_qkv_bias=bool(arg("add_qkv_bias", False)), qk_layernorm=bool(arg("qk_layernorm", False)),
        position_embedding_type=arg("position_embedding_type", "none"), softmax_scale=arg("softmax_scale"),
        ska=_ska_fields(args), megatron_vocab_size=arg("vocab_size"),
    )


def fields_from_hf(config, tied_embeddings: bool) -> ArchitectureFields:
    """Fields of an exported HF model (`NemotronHConfig` or `EchoHybridConfig`)."""
    symbols = {"linear_attention": "M", "full_attention": "*", "ska": "*", "mlp": "-"}
    unknown = sorted(set(config.layer_types) - set(symbols))
    if unknown:
        raise ConversionError(f"layer types {unknown} have no Megatron equivalent in the Echo stacks")
    ffn_kind = getattr(config, "ffn_kind", "mlp")
    ska = {name: getattr(config, name) for name in EXPORTED_SKA_FIELDS if hasattr(config, name)}
    return ArchitectureFields(
        pattern="".join(symbols[t] for t in config.layer_types),
        attention="ska" if "ska" in config.layer_types else "softmax", ffn="koopman" if ffn_kind == "koopman" else "mlp",
        hidden_size=config.hidden_size, vocab_size=config.vocab_size, tied_embeddings=tied_embeddings,
        norm_epsilon=config.layer_norm_epsilon, normalization="RMSNorm", gated_linear_unit=ffn_kind == "gated_mlp",
        activation=config.mlp_hidden_act, ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.num_key_value_heads,
        kv_channels=config.head_dim, seq_length=config.max_position_embeddings,
        mamba_state_dim=config.ssm_state_size, mamba_head_dim=config.mamba_head_dim, mamba_num_groups=config.n_groups,
        ska=ska, megatron_vocab_size=getattr(config, "megatron_vocab_size", None),
    )


def args_namespace(fields: ArchitectureFields, mamba_num_heads: int) -> Namespace:
    """A Megatron-LM `args` Namespace for a checkpoint written by `import-hf` (launcher names)."""
    return Namespace(
        hybrid_layer_pattern=fields.pattern, num_layers=len(fields.pattern), hidden_size=fields.hidden_size,
        num_attention_heads=fields.num_attention_heads,
        group_query_attention=fields.num_query_groups != fields.num_attention_heads,
        num_query_groups=fields.num_query_groups, kv_channels=fields.kv_channels, ffn_hidden_size=fields.ffn_hidden_size,
        swiglu=fields.gated_linear_unit and fields.activation == "silu", squared_relu=fields.activation == "relu2",
        norm_epsilon=fields.norm_epsilon, normalization=fields.normalization, add_bias_linear=False,
        add_qkv_bias=False, qk_layernorm=False, position_embedding_type="none", padded_vocab_size=fields.vocab_size,
        vocab_size=fields.megatron_vocab_size, seq_length=fields.seq_length, max_position_embeddings=fields.seq_length,
        untie_embeddings_and_output_weights=not fields.tied_embeddings, mamba_state_dim=fields.mamba_state_dim,
        mamba_head_dim=fields.mamba_head_dim, mamba_num_groups=fields.mamba_num_groups, mamba_num_heads=mamba_num_heads,
        echo_attention=fields.attention, echo_ffn=fields.ffn, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, ckpt_format="torch_dist", no_save_optim=True, no_save_rng=True,
        **dict(fields.ska),
    )


# ---------------------------------------------------------------------------------------------- models
def tensor_parallel_size(model) -> int:
    tp = getattr(getattr(model, "pg_collection", None), "tp", None)
    return tp.size() if tp is not None else 1


def megatron_tensors(model) -> dict[str, Tensor]:
    """Checkpoint-named full tensors of an in-memory TP = 1 `HybridModel` (its `sharded_state_dict`, factories
    applied: fused projections split as in distributed checkpoints)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if tensor_parallel_size(model) > 1:
        raise ConversionError("megatron_tensors needs a TP = 1 model; use gathered_tensors (collective) at TP > 1")
    out: dict[str, Tensor] = {}
    pending = list(nested_values(model.sharded_state_dict()))
    while pending:
        item = pending.pop()
        if isinstance(item, ShardedTensorFactory):
            pending.extend(nested_values(item.build()))
        elif isinstance(item, ShardedTensor):
            full = out.setdefault(item.key, item.data.new_empty(item.global_shape))
            full[_global_slices(item)] = item.data.detach().reshape(full[_global_slices(item)].shape)
    return out


def gathered_tensors(model) -> dict[str, Tensor]:
    """Collective over the default process group (every rank calls it): the full checkpoint-named tensors of a
    tensor-parallel model, on every rank, through a temporary distributed checkpoint (one shared filesystem,
    e.g. a single node)."""
    from megatron.core import dist_checkpointing

    directory = [tempfile.mkdtemp(prefix="echo-hf-export-") if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(directory, src=0)
    try:
        dist_checkpointing.save(model.sharded_state_dict(), directory[0])
        return _load_model_tensors(directory[0])
    finally:
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(directory[0], ignore_errors=True)


def _load_model_tensors(path: str) -> dict[str, Tensor]:
    """Full model tensors of a distributed checkpoint (optimizer and common state left out)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    metadata = dist_checkpointing.load_tensors_metadata(path)
    wanted = {key: value for key, value in metadata.items()
              if isinstance(value, ShardedTensor) and key.startswith(MODEL_PREFIXES)}
    loaded = dist_checkpointing.load(wanted, path, validate_access_integrity=False)
    return {key: loaded[key] for key in wanted}  # load() adds the common state dict


def _global_slices(item) -> tuple[slice, ...]:
    """Where a ShardedTensor's local data sits in its global tensor (e.g. Megatron's SwiGLU fc1 halves)."""
    shape = (1,) * item.prepend_axis_num + tuple(item.local_shape)
    return tuple(slice(offset, offset + size) for offset, size in zip(item.global_offset, shape))


def _activation_function(name: str):
    from megatron.core.activations import squared_relu

    functions = {"relu2": squared_relu, **{v: k for k, v in _ACTIVATION_NAMES.items()}}
    if name not in functions:
        raise ConversionError(f"activation {name!r} has no Megatron equivalent (supported: {sorted(functions)})")
    return functions[name]


def build_model(fields: ArchitectureFields, mamba_num_heads: Optional[int] = None, **config_overrides):
    """A CPU, fp32 `HybridModel` for `fields` at the initialised TP size (TP = 1 in `megatron_session()`);
    `config_overrides` go to `SKAConfig` (e.g. `tensor_model_parallel_size=2`)."""
    from echo_megatron.megatron import SKAConfig, build_hybrid_model

    config = SKAConfig(
        num_layers=len(fields.pattern), hidden_size=fields.hidden_size, num_attention_heads=fields.num_attention_heads,
        num_query_groups=fields.num_query_groups, kv_channels=fields.kv_channels, ffn_hidden_size=fields.ffn_hidden_size,
        gated_linear_unit=fields.gated_linear_unit, activation_func=_activation_function(fields.activation),
        layernorm_epsilon=fields.norm_epsilon, normalization=fields.normalization, add_bias_linear=False,
        mamba_state_dim=fields.mamba_state_dim, mamba_head_dim=fields.mamba_head_dim,
        mamba_num_groups=fields.mamba_num_groups, mamba_num_heads=mamba_num_heads, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, **{**dict(fields.ska), **config_overrides},
    )
    return build_hybrid_model(config, fields.pattern, fields.vocab_size, fields.seq_length, ffn=fields.ffn,
                              attention=fields.attention,
                              share_embeddings_and_output_weights=fields.tied_embeddings)


# ---------------------------------------------------------------------------------------------- checkpoints
def iteration_dir(ckpt_dir: str | os.PathLike, iteration: Optional[int] = None) -> tuple[Path, int]:
    """(DIR/iter_NNNNNNN or DIR/release, N): `iteration`, else the one in `latest_checkpointed_iteration.txt`
    ("release", as written by converters, is iteration 0)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise ConversionError(f"checkpoint directory {str(root)!r} does not exist")
    if iteration is None:
        tracker = root / TRACKER
        if not tracker.is_file():
            raise ConversionError(f"{str(root)!r} has no {TRACKER}: pass --iteration or a Megatron checkpoint directory")
        text = tracker.read_text().strip()
        if text == RELEASE:
            return root / RELEASE, 0
        if not text.isdigit():
            raise ConversionError(f"{tracker} must hold an iteration number or {RELEASE!r}, got {text!r}")
        iteration = int(text)
    path = root / f"iter_{iteration:07d}"
    if not path.is_dir():
        raise ConversionError(f"checkpoint iteration {iteration} not found: {str(path)!r} does not exist")
    return path, iteration


def read_checkpoint(ckpt_dir, iteration: Optional[int] = None) -> tuple[Namespace, dict[str, Tensor], int]:
    """(stored args, model tensors by checkpoint name, iteration) of a torch_dist checkpoint (one gloo rank)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from echo_megatron.megatron.checkpoint_files import CheckpointFilesError, check_torch_dist_files

    path, iteration = iteration_dir(ckpt_dir, iteration)
    try:
        check_torch_dist_files(path)
    except CheckpointFilesError as error:
        raise ConversionError(f"cannot read the Megatron checkpoint: {error}") from error
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
        tensors = _load_model_tensors(str(path))
    except ConversionError:
        raise
    except (Exception, CheckpointException) as error:  # corrupt or partial checkpoints fail inside torch DCP
        cause = next(iter(error.failures.values()))[0] if isinstance(error, CheckpointException) else error
        raise ConversionError(f"cannot read the Megatron checkpoint {str(path)!r}: {type(cause).__name__}: "
                              f"{cause}") from error
    args = common.get("args")
    if not isinstance(args, Namespace):
        raise ConversionError(f"{str(path)!r} has no stored Megatron args (common state dict keys: {sorted(common)})")
    return args, tensors, iteration


def write_checkpoint(model, args: Namespace, ckpt_dir: Path) -> None:
    """Save `model` as megatron.training saves a converted ("release") checkpoint: torch_dist, with `args` and
    `iteration` 0 in the common state. The launcher resumes from it with `--load` (no optimizer or RNG state)."""
    from megatron.core import dist_checkpointing

    path = ckpt_dir / RELEASE
    path.mkdir(parents=True)
    state = {"model": model.sharded_state_dict(), "args": args, "iteration": 0,
             "checkpoint_version": CHECKPOINT_VERSION}
    dist_checkpointing.save(state, str(path))
    (ckpt_dir / TRACKER).write_text(RELEASE)


def load_tensors_into(model, tensors: Mapping[str, Tensor]) -> None:
    """Load checkpoint-named full tensors into a TP = 1 model through its own `sharded_state_dict` (so every
    factory merge — fused projections, norms mapped onto TE names — is Megatron's)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, extract_matching_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject, ShardedTensor, ShardedTensorFactory, apply_factories, apply_factory_merges,
    )

    built = model.sharded_state_dict()
    factories, _ = extract_matching_values(built, lambda x: isinstance(x, ShardedTensorFactory),
                                           return_lists_as_dicts=True)
    apply_factories(built)
    missing: list[str] = []

    def fill(item):
        if isinstance(item, ShardedTensor):
            if item.key not in tensors:
                missing.append(item.key)
                return item.data
            return tensors[item.key][_global_slices(item)].to(item.data.dtype).reshape(item.data.shape)
        if isinstance(item, ShardedObject):
            return None
        return item

    dict_list_map_inplace(fill, built)
    if missing:
        raise ConversionError(f"tensors missing for the Megatron model: {missing}")
    state = apply_factory_merges(built, factories)
    model.load_state_dict(state, strict=True)


def load_megatron_checkpoint(ckpt_dir, iteration: Optional[int] = None):
    """A CPU, fp32, TP = 1 `HybridModel` with the weights of a torch_dist checkpoint.

    Call inside an initialised Megatron process (one rank), e.g. `with megatron_session(): ...`.
    """
    args, tensors, _ = read_checkpoint(ckpt_dir, iteration)
    fields = fields_from_args(args, tensors)
    fields.check_supported()
    mamba = next((i for i, s in enumerate(fields.pattern) if s == "M"), None)
    heads = tensors[f"decoder.layers.{mamba}.mixer.A_log"].shape[0] if mamba is not None else None
    model = build_model(fields, heads)
    load_tensors_into(model, tensors)
    return model
