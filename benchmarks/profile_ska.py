"""Profile and time the torch SKA path (fwd+bwd) next to PyTorch's flash SDPA on CPU, side by side in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/profile_ska.py                      # T = 8K, 16K, 32K; 2 threads
    PYTHONPATH=. .venv/bin/python benchmarks/profile_ska.py --lengths 8192 --profile

Shapes of issue 11: B=1, H=8, fp32; SKA r=48, P=64, S=64, K=2; SDPA head width 64 for q, k and v (so the CPU
flash kernel runs, forced with `sdpa_kernel(FLASH_ATTENTION)`), is_causal=True. Each cell is the median of
`--repeats` timed runs after one warm-up, with [min, max]; wall-clock and process CPU time (all threads) are
both printed, because on a shared machine wall time measures the neighbours as much as the code. The
official table is `bench_ops.py`'s; this script is for profiling the torch path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from echo_megatron.ops import ska

HEADS, RANK, VALUE_DIM, CHUNK, POWER, SDPA_WIDTH = 8, 48, 64, 64, 2, 64


def ska_step(seq_len: int, whole_sequence: bool = False):
    """fwd+bwd of the torch path; `whole_sequence` runs the stages over the whole sequence at once (the
    path packed sequences take, forced with cu_seqlens = [0, T]) instead of block by block."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, seq_len, HEADS, RANK, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(1, seq_len, HEADS, VALUE_DIM, generator=gen).requires_grad_()
    eta = torch.full((HEADS,), 1.5, requires_grad=True)
    gamma = torch.full((HEADS,), 1.01, requires_grad=True)

    def step() -> None:
        ska(q, k, v, eta=eta, gamma=gamma, chunk_size=CHUNK, power=POWER, backend="torch",
            cu_seqlens=torch.tensor([0, seq_len]) if whole_sequence else None).sum().backward()
    return step


def sdpa_step(seq_len: int):
    q, k, v = (torch.randn(1, HEADS, seq_len, SDPA_WIDTH, requires_grad=True) for _ in range(3))

    def step() -> None:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    return step


def measure(step, repeats: int) -> dict[str, tuple[float, float, float]]:
    """{"wall": (median, min, max), "cpu": (...)} in ms over `repeats` runs after a warm-up."""
    step()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(1e3 * (time.perf_counter() - w0))
        cpu.append(1e3 * (time.process_time() - c0))
    return {name: (statistics.median(x), min(x), max(x)) for name, x in (("wall", wall), ("cpu", cpu))}


def _cell(stats: tuple[float, float, float]) -> str:
    return f"{stats[0]:.0f} [{stats[1]:.0f}, {stats[2]:.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384,32768", help="comma-separated T")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed SKA runs per length (SDPA: 2)")
    parser.add_argument("--sdpa-max", type=int, default=32768, help="no SDPA above this T (quadratic)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per length")
    parser.add_argument("--whole", action="store_true",
                        help="also time the whole-sequence stages (cu_seqlens = [0, T]) next to the block-by-block path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"threads={args.threads}; ms, median [min, max]; ratio = SDPA / SKA (medians)")
    extra = " whole-sequence SKA cpu | whole / blocks (cpu) |" if args.whole else ""
    print("| T | SKA wall | SKA cpu | SDPA flash wall | SDPA flash cpu | ratio wall | ratio cpu | SKA cpu t(T)/t(T/2) |" + extra)
    print("|---|---|---|---|---|---|---|---|" + "---|" * (2 if args.whole else 0))
    previous = None
    for seq_len in lengths:
        ours = measure(ska_step(seq_len), args.repeats)
        peer = measure(sdpa_step(seq_len), 2) if seq_len <= args.sdpa_max else None
        growth = f"{ours['cpu'][0] / previous[1]:.2f}" if previous and previous[0] * 2 == seq_len else "-"
        cells = [_cell(ours["wall"]), _cell(ours["cpu"])]
        if peer:
            cells += [_cell(peer["wall"]), _cell(peer["cpu"]), f"{peer['wall'][0] / ours['wall'][0]:.1f}x",
                      f"{peer['cpu'][0] / ours['cpu'][0]:.1f}x"]
        else:
            cells += ["not run"] * 2 + ["-"] * 2
        cells.append(growth)
        if args.whole:
            whole = measure(ska_step(seq_len, whole_sequence=True), args.repeats)
            cells += [_cell(whole["cpu"]), f"{whole['cpu'][0] / ours['cpu'][0]:.2f}"]
        print(f"| {seq_len} | " + " | ".join(cells) + " |", flush=True)
        previous = (seq_len, ours["cpu"][0])
        if args.profile:
            step = ska_step(seq_len)
            step()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
