"""Triton SKA kernels: GPU timings against FlashAttention-2 and Mamba-2's SSD; a CPU correctness-and-smoke mode.

GPU (CUDA available): `triton.testing.do_bench` of SKA forward and forward+backward — Triton kernels, and the
torch chunked path for reference — next to `flash_attn_func(causal=True)` and `mamba_chunk_scan_combined`
at the same batch, length and model width, measured in one run and printed as a Markdown table with ratios.
Defaults: B=1, T=8192, d=4096: SKA 32 heads of r=64, P=128 (H·P = d), S=64, K=2; attention 32 heads of 128;
Mamba-2 d_inner = 2d = 128 heads of 64, d_state 128, chunk 256. bf16.

CPU (no GPU; also forced by --cpu): (1) the kernels under the Triton interpreter against the torch path on
small awkward shapes, fp32 and fp16: max relative error of y and of every gradient; (2) every kernel of a
forward+backward call compiled for sm_90 (H100) with Triton's own ptxas: registers, spills, shared memory
(skip with --no-compile); (3) the roofline estimate of docs/performance.md (an estimate on paper).

    .venv/bin/python benchmarks/bench_kernels.py                 # GPU timings, or the CPU mode
    .venv/bin/python benchmarks/bench_kernels.py --estimate      # only the paper estimate table
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass

import torch

from echo_megatron.ops import ska

GRAD_NAMES = ("q", "k", "v", "eta", "gamma")


@dataclass(frozen=True)
class Shape:
    batch: int = 1
    heads: int = 32  # SKA heads; attention has the same count of head_dim = d / heads
    rank: int = 64
    value_dim: int = 128
    chunk: int = 64
    power: int = 2
    mamba_headdim: int = 64
    mamba_state: int = 128
    mamba_chunk: int = 256

    @property
    def width(self) -> int:
        return self.heads * self.value_dim


# ------------------------------------------------------------------------------------------------
# paper estimate (H100 SXM roofline)
# ------------------------------------------------------------------------------------------------

H100 = dict(bf16_flops=989e12, tf32_flops=495e12, hbm_bytes=3.35e12, sms=132, clock_hz=1.75e9)
EFFICIENCY = dict(memory=0.7, tensor=0.5)  # sustained fraction of peak assumed for streaming kernels
FA2_TFLOPS = dict(fwd=350e12, bwd=300e12)  # FlashAttention-2 on H100, bf16, d=128 (about 35% / 30% of peak)
SSD_EFFICIENCY = 0.25  # mamba_chunk_scan_combined: five kernels, small matmuls
# latency model of one register-resident dense program (cycles): per Cholesky column, per r×r tf32x3 product
CYCLES = dict(cholesky_column=600, product=1800, power_step=600)


def ska_costs(shape: Shape, element_bytes: int = 2) -> list[tuple[str, float, float]]:
    """(kernel, FLOPs, HBM bytes) per token per head of the forward and backward kernels."""
    r, p, s = shape.rank, shape.value_dim, shape.chunk
    row = (2 * r * r + p * r) * 4  # one fp32 statistics row (G, M, C)
    tokens_in = (r + p) * element_bytes
    products_fwd, products_bwd = _dense_products(shape)
    dense_fwd_flops = 2 * r**3 * products_fwd / s
    dense_bwd_flops = 2 * r**3 * products_bwd / s
    return [
        ("stats fwd", 2 * (2 * r * r + p * r), tokens_in + row / s),
        ("scan fwd", row / 4 / s, 2 * row / s),
        ("dense fwd", dense_fwd_flops, (row + (p * r + r * r) * 4) / s),
        ("readout fwd", 2 * p * r, (r + p) * element_bytes + p * r * 4 / s),
        ("readout bwd", 4 * p * r, (2 * r + p) * element_bytes + 2 * p * r * 4 / s),
        ("dense bwd", dense_bwd_flops, (2 * row + (2 * p * r + r * r) * 4) / s),
        ("scan bwd", row / 4 / s, 2 * row / s),
        ("stats bwd", 2 * (4 * r * r + 3 * p * r), 2 * tokens_in + 2 * r * element_bytes + row / s),
    ]


def _dense_products(shape: Shape) -> tuple[float, float]:
    """r×r×r-equivalent matrix products of one dense program (K >= 1), forward and backward.

    Forward: X M, (X M) Xᵀ, then C Xᵀ, K × T A and T X on P×r. Backward: 17 + 3(K-1) r×r products
    (see readout_matrix_bwd_kernel) and Cᵀ dR, dR U on P×r."""
    r, p, k = shape.rank, shape.value_dim, shape.power
    return 2 + (2 + k) * p / r, 17 + 3 * max(k - 1, 0) + 2 * p / r


def _dense_program_seconds(shape: Shape, backward: bool) -> float:
    products_fwd, products_bwd = _dense_products(shape)
    if backward:
        return products_bwd * CYCLES["product"] / H100["clock_hz"]
    cycles = products_fwd * CYCLES["product"] + shape.rank * CYCLES["cholesky_column"] + 6 * CYCLES["power_step"]
    return cycles / H100["clock_hz"]


def ska_estimate_ms(shape: Shape, seq_len: int, backward: bool) -> float:
    """Roofline for the streaming kernels + latency model × waves for the dense per-chunk programs."""
    tokens = shape.batch * seq_len * shape.heads
    total = 0.0
    for name, flops, nbytes in ska_costs(shape):
        if name.endswith("bwd") != backward:
            continue
        if name.startswith("dense"):
            programs = shape.batch * shape.heads * math.ceil(seq_len / shape.chunk)
            total += math.ceil(programs / H100["sms"]) * _dense_program_seconds(shape, backward)
        else:
            total += max(tokens * nbytes / (H100["hbm_bytes"] * EFFICIENCY["memory"]),
                         tokens * flops / (H100["tf32_flops"] * EFFICIENCY["tensor"]))
    return total * 1e3


def fa2_estimate_ms(shape: Shape, seq_len: int, backward: bool) -> float:
    head_dim = shape.width // shape.heads
    fwd_flops = 2 * shape.batch * shape.heads * seq_len**2 * head_dim  # causal: half of 4·T²·d
    if backward:
        return 2.5 * fwd_flops / FA2_TFLOPS["bwd"] * 1e3
    return fwd_flops / FA2_TFLOPS["fwd"] * 1e3


def ssd_estimate_ms(shape: Shape, seq_len: int, backward: bool) -> float:
    heads = 2 * shape.width // shape.mamba_headdim
    q, n, p = shape.mamba_chunk, shape.mamba_state, shape.mamba_headdim
    per_token_head = 2 * q * p + 4 * n * p + 2 * q * n / heads  # intra-chunk, states in/out, C·Bᵀ per group
    flops = shape.batch * seq_len * heads * per_token_head * (2.0 if backward else 1.0)
    nbytes = shape.batch * seq_len * (2 * 2 * shape.width * 2 + 4 * n) * (2.0 if backward else 1.0)
    return max(flops / (H100["bf16_flops"] * SSD_EFFICIENCY), nbytes / (H100["hbm_bytes"] * EFFICIENCY["memory"])) * 1e3


def print_estimate(shape: Shape, seq_lens: list[int]) -> None:
    print("### Paper estimate (H100 SXM roofline + latency model; not a measurement)\n")
    print(f"SKA r={shape.rank}, P={shape.value_dim}, S={shape.chunk}, K={shape.power}, bf16 in/out, fp32 statistics\n")
    print("| kernel | FLOPs / token / head | HBM bytes / token / head | FLOP / byte |")
    print("|---|---:|---:|---:|")
    for name, flops, nbytes in ska_costs(shape):
        print(f"| {name} | {flops:,.0f} | {nbytes:,.0f} | {flops / nbytes:.1f} |")
    print(f"\nB={shape.batch}, d={shape.width}: SKA {shape.heads}×(r={shape.rank}, P={shape.value_dim}); "
          f"FA-2 {shape.heads}×{shape.width // shape.heads}; Mamba-2 SSD {2 * shape.width // shape.mamba_headdim}×"
          f"{shape.mamba_headdim}, N={shape.mamba_state}\n")
    print("| T | SKA fwd | FA-2 fwd | SSD fwd | SKA fwd+bwd | FA-2 fwd+bwd | SSD fwd+bwd | FA-2 / SKA (fwd+bwd) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seq_len in seq_lens:
        ska_f, fa_f, ssd_f = (f(shape, seq_len, False) for f in (ska_estimate_ms, fa2_estimate_ms, ssd_estimate_ms))
        ska_b, fa_b, ssd_b = (f(shape, seq_len, True) for f in (ska_estimate_ms, fa2_estimate_ms, ssd_estimate_ms))
        print(f"| {seq_len} | {ska_f:.2f} ms | {fa_f:.2f} ms | {ssd_f:.2f} ms | {ska_f + ska_b:.2f} ms | "
              f"{fa_f + fa_b:.2f} ms | {ssd_f + ssd_b:.2f} ms | {(fa_f + fa_b) / (ska_f + ska_b):.2f}× |")
    print()


# ------------------------------------------------------------------------------------------------
# CPU: correctness and smoke under the interpreter, sm_90 compile report
# ------------------------------------------------------------------------------------------------


def _inputs(batch, seq_len, heads, rank, value_dim, dtype, device="cpu", seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(q=torch.randn(batch, seq_len, heads, rank, generator=gen),
                   k=torch.randn(batch, seq_len, heads, rank, generator=gen),
                   v=torch.randn(batch, seq_len, heads, value_dim, generator=gen),
                   eta=torch.full((heads,), 1.5), gamma=1.0 + 0.5 * torch.rand(heads, generator=gen))
    return {n: x.to(device=device, dtype=dtype).requires_grad_() for n, x in tensors.items()}


def _run(inputs: dict, backend: str, **options) -> list[torch.Tensor]:
    y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend=backend,
            **options)
    weights = torch.linspace(-1.0, 2.0, y.numel(), device=y.device).view_as(y)
    grads = torch.autograd.grad((y.float() * weights).sum(), [inputs[n] for n in GRAD_NAMES])
    return [y.detach(), *grads]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.double().abs().max().item()
    return (a.double() - b.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def cpu_smoke() -> None:
    print("### Interpreter (CPU) vs torch path: max relative error\n")
    print("| shape (B, T, H, r, P, S, K) | options | dtype | time | y | dq | dk | dv | dη | dγ̂ |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    cases = [((2, 70, 2, 24, 17, 16, 2), {}), ((1, 100, 1, 64, 20, 64, 1), {}),
             ((1, 90, 2, 5, 7, 8, 2), dict(cu_seqlens=torch.tensor([0, 30, 31, 90]), mode="prefix"))]
    for (batch, seq_len, heads, rank, value_dim, chunk, power), extra in cases:
        for dtype in (torch.float32, torch.float16):
            inputs = _inputs(batch, seq_len, heads, rank, value_dim, dtype)
            options = dict(chunk_size=chunk, power=power, **extra)
            start = time.perf_counter()
            fast = _run(inputs, "triton", **options)
            elapsed = time.perf_counter() - start
            errors = " | ".join(f"{_rel(a, b):.1e}" for a, b in zip(fast, _run(inputs, "torch", **options)))
            shown = ", ".join(f"{k}" for k in extra) or "-"
            print(f"| {batch, seq_len, heads, rank, value_dim, chunk, power} | {shown} | {str(dtype)[6:]} | "
                  f"{elapsed:.1f} s | {errors} |")
    print()


def compile_report(shape: Shape) -> None:
    """Every kernel of a bf16 forward+backward, then of decoding, compiled for sm_90 at r = P = 32, 64, 128 and
    the paper's r = 48, P = 64 (`aot.sm90_report`), with the programs that fit on one SM."""
    from echo_megatron.ops.triton.aot import sm90_report

    print(f"### sm_90 (H100/H200) compile report, S={shape.chunk}, K={shape.power}, bf16\n")
    print("| r | P | kernel | constexprs | warps | registers / thread | spill bytes / thread | shared memory | "
          "programs / SM |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|")
    rows = [row for decode in (False, True) for row in sm90_report(chunk=shape.chunk, power=shape.power, decode=decode)]
    for rank, value_dim, res in rows:
        print(f"| {rank} | {value_dim} | {res.name} | {res.constexprs} | {res.num_warps} | {res.registers} | "
              f"{res.spill_bytes} | {res.shared_bytes // 1024} KiB | {res.programs_per_sm} |")
    print()


# ------------------------------------------------------------------------------------------------
# GPU: measured side by side
# ------------------------------------------------------------------------------------------------


def _bench(fn, grads: list[torch.Tensor] | None = None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grads)


def gpu_tables(shape: Shape, seq_lens: list[int]) -> None:
    print(f"### Measured on {torch.cuda.get_device_name()} (bf16), B={shape.batch}, d={shape.width}\n")
    print("| T | SKA Triton fwd | SKA torch fwd | FA-2 fwd | SSD fwd | SKA Triton fwd+bwd | SKA torch fwd+bwd | "
          "FA-2 fwd+bwd | SSD fwd+bwd | FA-2 / SKA (fwd+bwd) |")
    print("|---:|" + "---:|" * 9)
    for seq_len in seq_lens:
        row = [str(seq_len)]
        times = {}
        inputs = _inputs(shape.batch, seq_len, shape.heads, shape.rank, shape.value_dim, torch.bfloat16, "cuda")
        for backward in (False, True):
            for backend in ("triton", "torch"):
                def run(backend=backend, backward=backward):
                    y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"],
                            backend=backend, chunk_size=shape.chunk, power=shape.power)
                    if backward:
                        y.backward(torch.ones_like(y))
                times[backend, backward] = _bench(run, list(inputs.values()))
            times["fa2", backward] = _flash_attention_ms(shape, seq_len, backward)
            times["ssd", backward] = _ssd_ms(shape, seq_len, backward)
        for backward in (False, True):
            row += [_fmt(times[name, backward]) for name in ("triton", "torch", "fa2", "ssd")]
        ratio = times["fa2", True] / times["triton", True] if times["fa2", True] else float("nan")
        print("| " + " | ".join(row) + f" | {ratio:.2f}× |")
    print()


def _fmt(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:.2f} ms"


def _flash_attention_ms(shape: Shape, seq_len: int, backward: bool) -> float | None:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    head_dim = shape.width // shape.heads
    q, k, v = (torch.randn(shape.batch, seq_len, shape.heads, head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=backward) for _ in range(3))

    def run():
        out = flash_attn_func(q, k, v, causal=True)
        if backward:
            out.backward(torch.ones_like(out))
    return _bench(run, [q, k, v] if backward else None)


def _ssd_ms(shape: Shape, seq_len: int, backward: bool) -> float | None:
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    heads = 2 * shape.width // shape.mamba_headdim
    kw = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(shape.batch, seq_len, heads, shape.mamba_headdim, **kw).requires_grad_(backward)
    dt = torch.rand(shape.batch, seq_len, heads, device="cuda", requires_grad=backward)
    a = (-torch.rand(heads, device="cuda")).requires_grad_(backward)
    b, c = (torch.randn(shape.batch, seq_len, 1, shape.mamba_state, **kw).requires_grad_(backward) for _ in range(2))

    def run():
        out = mamba_chunk_scan_combined(x, dt, a, b, c, chunk_size=shape.mamba_chunk, dt_softplus=True)
        if backward:
            out.backward(torch.ones_like(out))
    return _bench(run, [x, dt, a, b, c] if backward else None)


def gpu_correctness(shape: Shape) -> None:
    """The compiled kernels (tf32x3 / split-tf32 products) against the torch path on the GPU, fp32 and bf16."""
    print("### Compiled kernels vs torch path on the GPU: max relative error\n")
    print("| dtype | y | dq | dk | dv | dη | dγ̂ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        inputs = _inputs(2, 4 * shape.chunk + 3, 4, shape.rank, shape.value_dim, dtype, "cuda")
        options = dict(chunk_size=shape.chunk, power=shape.power)
        errors = [_rel(a, b) for a, b in zip(_run(inputs, "triton", **options), _run(inputs, "torch", **options))]
        print(f"| {str(dtype)[6:]} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--value-dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--power", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="the CPU mode even if a GPU is present")
    parser.add_argument("--no-compile", action="store_true", help="CPU mode: skip the sm_90 compile report")
    parser.add_argument("--estimate", action="store_true", help="only print the paper estimate")
    parser.add_argument("--compile-only", action="store_true", help="only print the sm_90 compile report")
    args = parser.parse_args()
    shape = Shape(heads=args.heads, rank=args.rank, value_dim=args.value_dim, chunk=args.chunk, power=args.power)
    warnings.filterwarnings("ignore", message="overflow encountered")
    if args.compile_only:
        compile_report(shape)
        return
    if not args.estimate:
        if torch.cuda.is_available() and not args.cpu:
            gpu_correctness(shape)
            gpu_tables(shape, args.seq_lens)
        else:
            cpu_smoke()
            if not args.no_compile:
                compile_report(shape)
    print_estimate(shape, args.seq_lens)


if __name__ == "__main__":
    main()
