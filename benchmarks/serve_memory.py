"""Inference memory per request of the Echo presets: SKA + Mamba state (constant) vs the same hybrid with
softmax attention in the '*' layers (Mamba state + KV cache), at 1K, 16K and 64K tokens.

    python benchmarks/serve_memory.py [--dtype bf16|fp32] [--out docs/results/serve_memory.md]

Figures are computed from the built models' layers (`echo_megatron.megatron.generation.memory_per_request`;
models built on the meta device, no weights). The "allocated" column is measured: the bytes of the state
tensors an `SKADynamicInferenceContext` allocates (SKA slots, Mamba slots and the KV buffer) to serve one
64K-token request.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from echo_megatron.hf.megatron_io import megatron_session
from echo_megatron.megatron.generation import inference_context, memory_per_request
from echo_megatron.megatron.presets import PRESETS

LENGTHS = (1024, 16384, 65536)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def meta_model(name: str, dtype: torch.dtype, **config_overrides):
    """The preset's model on the meta device (shapes only); `config_overrides` replace `SKAConfig` fields."""
    preset = PRESETS[name]
    config = preset.make_config(params_dtype=dtype, use_cpu_initialization=True, perform_initialization=False,
                                **config_overrides)
    with torch.device("meta"):
        return preset.build(config, preset.seq_length)


def allocated_per_request(model, tokens: int) -> int:
    """Bytes of state tensors an engine serving one `tokens`-token request allocates."""
    context = inference_context(model, max_requests=1, max_sequence_length=tokens)
    state = [context.mamba_conv_states, context.mamba_ssm_states, context.memory_buffer]
    state += [tensor for slots in context.ska_slots for tensor in slots.tensors()]
    return sum(tensor.nbytes for tensor in state)


def table(dtype_name: str) -> str:
    dtype = DTYPES[dtype_name]
    header = ("| preset | SKA state | Mamba state | Echo total (any length) | Echo allocated, measured at 64K | "
              + " | ".join(f"attention hybrid at {n // 1024}K" for n in LENGTHS) + " |")
    rows = [header, "|" + "---|" * (5 + len(LENGTHS))]
    for name in PRESETS:
        model = meta_model(name, dtype)
        memory = [memory_per_request(model, n) for n in LENGTHS]
        measured = _mib(allocated_per_request(model, LENGTHS[-1]))
        first = memory[0]
        rows.append(f"| {name} | {_mib(first.ska)} | {_mib(first.mamba)} | {_mib(first.total)} | {measured} | "
                    + " | ".join(_mib(m.mamba + m.softmax_kv) for m in memory) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="model dtype (SKA state is fp32)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    with megatron_session():
        text = (f"Inference memory per request, MiB (model dtype {args.dtype}; SKA state in fp32; TP = 1; "
                "attention hybrid: the same model with softmax attention in the '*' layers (preset's KV heads, "
                "kv_channels), its Mamba state + KV cache)\n\n"
                + table(args.dtype) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
