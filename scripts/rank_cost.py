"""What a preset's SKA rank costs, COMPUTED from the project's models (nothing here is measured): parameters,
training FLOPs per token and memory per GPU of its launch script's layout (`scripts/examples_table.py`), the
SKA operator's FLOPs, HBM bytes and saved bytes per token (`echo_megatron.megatron.flops`; the bytes at the
chunks per block G that the script's shape gives the kernels, `examples_table.ska_chunks_per_block`), and the decode
state per request (`benchmarks/serve_memory.py`), side by side at each rank.

    python scripts/rank_cost.py                                   # echo-8b at r = 64 and r = 128
    python scripts/rank_cost.py --preset echo-1b --ranks 64 128
    python scripts/rank_cost.py --write                           # replace the table in examples/README.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # scripts.examples_table and benchmarks.serve_memory, also when run as a script

from scripts.examples_table import (  # noqa: E402
    README, SCRIPTS, estimate, print_or_write, script_layout, ska_chunks_per_block, ska_computed_bytes_per_token,
    ska_measurement, ska_saved_bytes_per_token, ska_shape,
)

BEGIN, END = "<!-- rank-cost:begin (scripts/rank_cost.py --write) -->", "<!-- rank-cost:end -->"


def rank_columns(preset_name: str, rank: int) -> dict[str, str]:
    """Quantity -> its value for `preset_name` with `ska_rank = rank`, formatted."""
    import torch
    from megatron.core.models.hybrid.hybrid_layer_allocation import get_hybrid_layer_counts

    from benchmarks.serve_memory import meta_model
    from echo_megatron.hf.megatron_io import megatron_session
    from echo_megatron.megatron import get_preset
    from echo_megatron.megatron.flops import ska_operator_flops, ska_triton_hbm_bytes
    from echo_megatron.megatron.generation import memory_per_request
    from echo_megatron.megatron.params import hybrid_model_params

    preset = get_preset(preset_name)
    script = next(script for script in SCRIPTS if script_layout(script).preset == preset_name)
    row = estimate(script, ska_rank=rank)
    config = preset.make_config(ska_rank=rank)
    heads, value_dim, chunk = config.ska_num_heads, config.ska_value_dim, config.ska_chunk_size
    seq = row.layout.seq_length
    layers = get_hybrid_layer_counts(preset.pattern)["*"]
    operator = ska_operator_flops(seq_length=seq, batch_size=1, num_heads=heads, rank=rank, value_dim=value_dim,
                                  chunk_size=chunk, power=config.ska_power, power_iters=config.ska_power_iters)
    every = ska_chunks_per_block(config, row.layout)
    hbm = ska_triton_hbm_bytes(rank=rank, value_dim=value_dim, chunk_size=chunk, chunks_per_block=every)
    saved = ska_saved_bytes_per_token(config, row.layout)
    measured = ska_measurement(config)
    with megatron_session():
        model = meta_model(preset_name, torch.bfloat16, ska_rank=rank)
        one_token, request = memory_per_request(model, 1), memory_per_request(model, seq)
    tied = hybrid_model_params(preset.pattern, config, vocab_size=preset.vocab_size, ffn=preset.ffn)
    mib = 2**20
    return {
        "parameters, tied embeddings": f"{tied / 1e9:.3f}B",
        f"parameters as `{script}` trains ({'untied' if row.layout.untied else 'tied'})": f"{row.params / 1e9:.3f}B",
        f"of which the {layers} SKA layers": f"{row.params_by_kind['SKA'] / 1e6:.1f}M",
        f"training FLOPs per token (forward + backward, T = {seq})": f"{row.flops_per_token / 1e9:.2f} GFLOP",
        f"of which the SKA operators ({layers} layers × {heads} heads)":
            f"{layers * operator.total / seq / 1e9:.2f} GFLOP",
        "SKA operator FLOPs per token and head, forward + backward": f"{operator.total / seq / heads / 1e3:,.0f}k",
        "SKA operator HBM bytes per token and head (Triton kernels), forward + backward":
            f"{hbm.forward:,.0f} + {hbm.backward:,.0f} B (G = {every})",
        "SKA operator saved for the backward, per token and layer":
            f"{saved / 1e3:.1f} kB (G = {every})"
            + (f"; G = 1: {ska_computed_bytes_per_token(ska_shape(config)) / 1e3:.1f} kB, measured "
               f"{measured['saved_bytes_per_token'] / 1e3:.1f} kB" if measured else ""),
        f"memory per GPU, `{script}` layout (state + activations)":
            f"{row.state_gib + row.activation_gib:.1f} GiB ({row.state_gib:.1f} + {row.activation_gib:.1f})",
        "decode state per request: SKA (fp32) / Echo total": f"{request.ska / mib:.2f} / {request.total / mib:.2f} MiB",
        "GQA KV cache of the attention hybrid equals the SKA state at":
            f"{request.ska / one_token.softmax_kv:,.0f} tokens",
    }


def table(preset: str, ranks: list[int]) -> str:
    columns = [rank_columns(preset, rank) for rank in ranks]
    lines = [f"| `{preset}`, computed | " + " | ".join(f"r = {rank}" for rank in ranks) + " |",
             "|---" * (1 + len(ranks)) + "|"]
    lines += [f"| {name} | " + " | ".join(column[name] for column in columns) + " |" for name in columns[0]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="echo-8b", help="a preset that one of the examples/ scripts launches")
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 128], help="SKA ranks r to compare")
    parser.add_argument("--write", action="store_true", help=f"replace the table in {README.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    print_or_write(table(args.preset, args.ranks), BEGIN, END, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
