"""Export Megatron models and checkpoints to Hugging Face directories, and import them back.

- `export_model(model, out_dir)`: an in-memory TP = 1 `HybridModel` -> HF directory.
- `export_checkpoint(ckpt_dir, out_dir)`: a torch_dist checkpoint (`echo-megatron export-hf`), model-free.
- `import_checkpoint(hf_dir, ckpt_dir)`: HF directory -> torch_dist "release" checkpoint (`echo-megatron
  import-hf`) that the launcher loads with `--load` at any TP size.

Outputs are atomic: written into a temporary sibling and renamed; an existing non-empty output is an error
unless `force`; on any failure nothing is left behind. HF directories hold safetensors shards (with an index
when sharded), `config.json` (with `auto_map` for `echo_hybrid`, whose self-contained remote code
`remote_code` generates), a generation config and, when given, the tokenizer. The vocabulary keeps
Megatron's padding (`vocab_size` = embedding rows); `megatron_vocab_size` in an `echo_hybrid` config records the tokenizer's size when known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHForCausalLM

from .configuration import EchoHybridConfig
from .convert import ArchitectureFields, ConversionError, embeddings_tied, hf_config, hf_to_megatron, megatron_to_hf
from .modeling import EchoHybridForCausalLM
from .remote_code import remote_code_files

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_CLASSES = {"nemotron_h": NemotronHConfig, "echo_hybrid": EchoHybridConfig}


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """None, a torch dtype, or one of `DTYPES`' names -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; on success it replaces `path`, on failure it is removed
    (with any parent directories this call created)."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ConversionError(f"output {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ConversionError(f"output directory {str(path)!r} exists and is not empty (pass --force / force=True "
                              "to replace it)")
    created = [parent for parent in reversed(path.parents) if not parent.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _token_ids(tokenizer) -> dict:
    return {name: getattr(tokenizer, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}


def _export(fields: ArchitectureFields, tensors, out_dir, *, dtype, tokenizer, force: bool, max_shard_size):
    """Megatron checkpoint-named tensors + fields -> HF directory; returns the HF config."""
    dtype = resolve_dtype(dtype) or next(iter(tensors.values())).dtype
    loaded_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer)) if tokenizer is not None else None
    if loaded_tokenizer is not None and fields.megatron_vocab_size is None:
        fields = dataclasses.replace(fields, megatron_vocab_size=len(loaded_tokenizer))
    config = hf_config(fields, tensors, dtype=dtype, token_ids=_token_ids(loaded_tokenizer) if loaded_tokenizer else None)
    state = megatron_to_hf(tensors, config, tied_embeddings=fields.tied_embeddings)
    model_class = NemotronHForCausalLM if config.model_type == "nemotron_h" else EchoHybridForCausalLM
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()}, strict=True, assign=True)
    model.generation_config = GenerationConfig.from_model_config(config)
    with atomic_directory(out_dir, force=force) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if config.model_type == "echo_hybrid":
            for name, source in remote_code_files().items():
                (tmp / name).write_text(source)
        if loaded_tokenizer is not None:
            loaded_tokenizer.save_pretrained(tmp)
    return config


def export_model(model, out_dir, *, dtype=None, tokenizer=None, force: bool = False, max_shard_size="2GB"):
    """Export an in-memory Megatron `HybridModel` (built by `build_hybrid_model`) to `out_dir`.

    With torch.distributed initialised this is a collective call (every rank calls it; tensor-parallel shards
    are gathered) and rank 0 writes. dtype: None (the model's), torch dtype or "fp32" | "bf16" | "fp16".
    tokenizer: a tokenizer directory (copied; its special token ids go into the config). Returns the HF config.
    """
    from .megatron_io import fields_from_model, gathered_tensors, megatron_tensors, tensor_parallel_size

    resolve_dtype(dtype)
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    tensors = gathered_tensors(model) if tensor_parallel_size(model) > 1 else megatron_tensors(model)
    if not distributed:
        return _export(fields_from_model(model, tensors), tensors, out_dir, dtype=dtype, tokenizer=tokenizer,
                       force=force, max_shard_size=max_shard_size)
    result: list = [None]
    if torch.distributed.get_rank() == 0:
        try:
            result[0] = _export(fields_from_model(model, tensors), tensors, out_dir, dtype=dtype,
                                tokenizer=tokenizer, force=force, max_shard_size=max_shard_size)
        except ConversionError as error:
            result[0] = error
    torch.distributed.broadcast_object_list(result, src=0)
    if isinstance(result[0], ConversionError):
        raise result[0]
    return result[0]


def export_checkpoint(ckpt_dir, out_dir, *, iteration: Optional[int] = None, dtype=None, tokenizer=None,
                      force: bool = False, max_shard_size="2GB"):
    """Export a torch_dist checkpoint written by megatron.training (`echo-megatron export-hf`)."""
    from .megatron_io import fields_from_args, megatron_session, read_checkpoint

    resolve_dtype(dtype)
    with megatron_session():
        args, tensors, _ = read_checkpoint(ckpt_dir, iteration)
    return _export(fields_from_args(args, tensors), tensors, out_dir, dtype=dtype, tokenizer=tokenizer, force=force,
                   max_shard_size=max_shard_size)


def read_hf_directory(hf_dir) -> tuple[object, dict]:
    """(config, state dict with NemotronH module names) of an exported HF directory, read by transformers itself
    (stock nemotron_h checkpoints store `backbone.*` names that its loader maps)."""
    root = Path(hf_dir)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{str(root)!r} has no config.json: not a Hugging Face model directory")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ConversionError(f"model_type must be one of {tuple(CONFIG_CLASSES)}, got {model_type!r}")
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise ConversionError(f"safetensors file(s) {missing} of {str(root)!r} are missing")
    for name in files:  # a truncated or overwritten file, named (transformers' error names the directory)
        try:
            with safe_open(str(root / name), framework="pt"):
                pass
        except Exception as error:
            raise ConversionError(f"{root / name}: unreadable safetensors file ({type(error).__name__}: {error})") from error
    model_class = NemotronHForCausalLM if model_type == "nemotron_h" else EchoHybridForCausalLM
    try:
        model, info = model_class.from_pretrained(str(root), dtype="auto", output_loading_info=True)
    except Exception as error:
        raise ConversionError(f"cannot load the Hugging Face model in {str(root)!r}: {type(error).__name__}: "
                              f"{error}") from error
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ConversionError(f"the Hugging Face checkpoint in {str(root)!r} does not match its config: "
                              + ", ".join(f"{kind} {names}" for kind, names in problems.items() if names))
    return model.config, {name: tensor.detach() for name, tensor in model.state_dict().items()}


def import_checkpoint(hf_dir, ckpt_dir, *, force: bool = False) -> None:
    """HF directory -> torch_dist "release" checkpoint for `--load` (fp32, TP-independent; `echo-megatron
    import-hf`)."""
    from .megatron_io import args_namespace, build_model, fields_from_hf, load_tensors_into, megatron_session, write_checkpoint

    config, state = read_hf_directory(hf_dir)
    tied = embeddings_tied(state)
    fields = fields_from_hf(config, tied)
    fields.check_supported()
    tensors = hf_to_megatron(state, config, tied_embeddings=tied)
    with megatron_session():
        model = build_model(fields, config.mamba_num_heads)
        load_tensors_into(model, {name: tensor.float() for name, tensor in tensors.items()})
        with atomic_directory(ckpt_dir, force=force) as tmp:
            write_checkpoint(model, args_namespace(fields, config.mamba_num_heads), tmp)
