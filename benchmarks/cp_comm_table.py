"""Context-parallel communication per layer per rank: SKA (segment totals, independent of T) vs ring attention
(K/V blocks, linear in T), computed by `echo_megatron.megatron.flops` — byte counts, not timings.

    python benchmarks/cp_comm_table.py [--cp 8]

Shapes: the paper's 180M Echo model (d=768: SKA H=12, r=48, P=64; attention 12 heads of 64) and an 8B-class
layer (d=4096: SKA H=32, r=128, P=128; attention 32 query heads, 8 key/value groups of 128, GQA). Batch 1,
TP 1, SKA statistics fp32, attention K/V bf16.
"""

from __future__ import annotations

import argparse

from echo_megatron.megatron.flops import ring_attention_cp_comm_bytes, ska_cp_comm_bytes

SEQ_LENGTHS = (32 * 1024, 128 * 1024, 1024 * 1024)
# name: (SKA heads, r, P), (attention key/value groups, head dim)
MODELS = {
    "Echo-180M (d=768; SKA 12 heads r=48 P=64; attention 12×64)": ((12, 48, 64), (12, 64)),
    "8B-class (d=4096; SKA 32 heads r=128 P=128; attention GQA 8×128)": ((32, 128, 128), (8, 128)),
}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def table(cp_size: int) -> str:
    lines = [f"| model | T | SKA fwd + bwd | ring attention fwd + bwd | ring / SKA |",
             "|---|---:|---:|---:|---:|"]
    for name, ((heads, rank, value_dim), (groups, head_dim)) in MODELS.items():
        ska = ska_cp_comm_bytes(cp_size=cp_size, num_heads=heads, rank=rank, value_dim=value_dim)
        for seq_length in SEQ_LENGTHS:
            ring = ring_attention_cp_comm_bytes(seq_length=seq_length, cp_size=cp_size, num_query_groups=groups,
                                                head_dim=head_dim)
            lines.append(f"| {name} | {seq_length // 1024}K | {_mib(ska.total)} | {_mib(ring.total)} | "
                         f"{ring.total / ska.total:,.0f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, default=8, help="context-parallel size c (default 8)")
    args = parser.parse_args()
    print(f"Bytes received per layer per rank, CP = {args.cp}, batch 1 (forward + backward):\n")
    print(table(args.cp))


if __name__ == "__main__":
    main()
