"""SKA operator vs softmax attention on this machine: time, peak memory, decode — measured side by side.

The attention baseline is the fastest softmax attention PyTorch has on a CPU: SDPA with equal q/k/v
head widths (its flash kernel needs them; with unequal widths it silently runs the quadratic-memory
math backend), forced with ``torch.nn.attention.sdpa_kernel`` so that the backend that ran is known
and printed. Both operators get the same B, H and head width: attention d = 64 against

- SKA ``matched`` (r = P = 64): the same q/k/v widths, so the same projection parameters and
  FLOPs per token as attention — the layer a user would swap in; the fair comparison;
- SKA ``paper`` (r = 48, P = 64): the narrower keys of the paper's configurations (cheaper).

Cells hold measurements only; a cell not run says so, and extrapolations are printed on separate
lines labelled "estimate". Each cell is the median of 3 timed runs after a warm-up; with ``--rounds N``
the whole fwd / fwd+bwd table is measured N times in turn and each cell shows the median over rounds
with its (min–max) range: on a shared machine single runs move by tens of percent.

Every measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss, minus the
process's baseline after importing torch and building the inputs) belongs to it alone; a
measurement that dies of memory exhaustion (or is refused by the address-space cap) is reported
as OOM. Prints Markdown tables.

    .venv/bin/python benchmarks/bench_ops.py            # full run (about 10 min on 2 cores)
    .venv/bin/python benchmarks/bench_ops.py --rounds 3 # the same, three rounds interleaved (medians, ranges)
    .venv/bin/python benchmarks/bench_ops.py --quick    # T up to 4096, a minute or two
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel

BATCH, HEADS, HEAD_DIM, CHUNK = 1, 8, 64, 64
SKA_CONFIGS = {"matched": (64, 64), "paper": (48, 64)}  # name -> (r, P)
ATTENTION_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)  # fastest first
MEMORY_CAP_BYTES = 20 * 2**30  # leave the machine alive: attention that needs more is OOM here


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _time_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _sequence_inputs(seq_len: int, requires_grad: bool, rank: int = HEAD_DIM, value_dim: int = HEAD_DIM) -> dict:
    """q, k [B, T, H, rank], v [B, T, H, value_dim]."""
    gen = torch.Generator().manual_seed(0)
    shape = (BATCH, seq_len, HEADS)
    return {
        "q": torch.randn(*shape, rank, generator=gen).requires_grad_(requires_grad),
        "k": torch.randn(*shape, rank, generator=gen).requires_grad_(requires_grad),
        "v": torch.randn(*shape, value_dim, generator=gen).requires_grad_(requires_grad),
    }


def fastest_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = True) -> SDPBackend:
    """The first of ``ATTENTION_BACKENDS`` that SDPA accepts for these [B, H, T, d] inputs (each is
    tried alone under ``sdpa_kernel``, which raises when the forced kernel cannot run)."""
    for backend in ATTENTION_BACKENDS:
        try:
            with sdpa_kernel(backend), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a refused kernel warns, then raises
                F.scaled_dot_product_attention(q[..., :1, :], k[..., :1, :], v[..., :1, :], is_causal=is_causal)
        except RuntimeError:
            continue
        return backend
    raise RuntimeError("no SDPA backend accepts these inputs")


def _ska_runner(seq_len: int, backward: bool, backend: str, config: str = "matched"):
    from echo_megatron.ops import ska

    x = _sequence_inputs(seq_len, backward, *SKA_CONFIGS[config])
    eta = torch.full((HEADS,), 1.5, requires_grad=backward)
    gamma = torch.full((HEADS,), 1.01, requires_grad=backward)

    def run():
        y = ska(x["q"], x["k"], x["v"], eta=eta, gamma=gamma, chunk_size=CHUNK, backend=backend)
        if backward:
            y.sum().backward()

    return run


def _attention_runner(seq_len: int, backward: bool):
    """Causal SDPA on [B, H, T, d] (equal widths), forced onto the fastest backend that accepts it."""
    x = {n: t.detach().transpose(1, 2).contiguous().requires_grad_(backward)
         for n, t in _sequence_inputs(seq_len, False).items()}
    backend = fastest_attention_backend(x["q"], x["k"], x["v"])

    def run():
        with sdpa_kernel(backend):
            y = F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
            if backward:
                y.sum().backward()

    return run, backend.name


def _decode_runner(context: int, kind: str):
    """One decode step after `context` tokens: SKA state read+write vs attention over a KV cache."""
    gen = torch.Generator().manual_seed(0)
    rank, value_dim = SKA_CONFIGS["matched"] if kind == "ska" else (HEAD_DIM, HEAD_DIM)
    q = torch.randn(BATCH, HEADS, rank, generator=gen)
    k = torch.randn(BATCH, HEADS, rank, generator=gen)
    v = torch.randn(BATCH, HEADS, value_dim, generator=gen)
    if kind == "ska":
        from echo_megatron.ops import ska_prefill, ska_step

        x = _sequence_inputs(context, False, rank, value_dim)
        eta, gamma = torch.full((HEADS,), 1.5), torch.full((HEADS,), 1.01)
        with torch.no_grad():
            _, state = ska_prefill(x["q"], x["k"], x["v"], eta=eta, gamma=gamma, chunk_size=CHUNK)
        holder = {"state": state}

        def run():
            with torch.no_grad():  # one full chunk of steps, so the O(r³) refresh is amortised as in use
                for _ in range(CHUNK):
                    _, holder["state"] = ska_step(q, k, v, holder["state"], eta=eta, gamma=gamma)

        return run, state.nbytes, "—"
    k_cache = torch.randn(BATCH, HEADS, context + CHUNK, HEAD_DIM, generator=gen)
    v_cache = torch.randn(BATCH, HEADS, context + CHUNK, HEAD_DIM, generator=gen)
    backend = fastest_attention_backend(q[:, :, None], k_cache, v_cache, is_causal=False)

    def run():
        with torch.no_grad(), sdpa_kernel(backend):
            for i in range(CHUNK):
                n = context + i
                k_cache[:, :, n] = k
                v_cache[:, :, n] = v
                F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, : n + 1], v_cache[:, :, : n + 1])

    return run, (k_cache.numel() + v_cache.numel()) * 4 * context // (context + CHUNK), backend.name


def worker(spec: dict) -> dict:
    """Runs in the child process: one measurement."""
    torch.manual_seed(0)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))
    state_bytes, backend = None, "—"
    if spec["kind"] == "decode":
        run, state_bytes, backend = _decode_runner(spec["T"], spec["impl"])
    elif spec["impl"] == "attention":
        run, backend = _attention_runner(spec["T"], spec["backward"])
    else:
        run = _ska_runner(spec["T"], spec["backward"], spec["impl"], spec.get("config", "matched"))
    baseline = _peak_rss_bytes()
    ms = _time_ms(run, spec["repeats"])
    if spec["kind"] == "decode":
        ms /= CHUNK
    return {"ms": ms, "peak_bytes": _peak_rss_bytes() - baseline, "state_bytes": state_bytes, "backend": backend}


def measure(**spec) -> dict:
    spec.setdefault("repeats", 3)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        oom = any(s in proc.stderr for s in ("out of memory", "MemoryError", "DefaultCPUAllocator: can't allocate"))
        if oom or proc.returncode in (-9, 137):
            return {"missing": "OOM"}
        raise RuntimeError(f"measurement {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_ms(m: dict) -> str:
    if "missing" in m:
        return m["missing"]
    low, high = m.get("range", (m["ms"], m["ms"]))
    return f"{m['ms']:.1f}" if low == high else f"{m['ms']:.1f} ({low:.0f}–{high:.0f})"


def median_of_rounds(runs: list[dict]) -> dict:
    """One cell over several rounds: the median of its per-round medians (ms, peak memory) and the ms range."""
    missing = [run for run in runs if "missing" in run]
    if missing:
        return missing[0]
    ms = [run["ms"] for run in runs]
    return {**runs[0], "ms": statistics.median(ms), "range": (min(ms), max(ms)),
            "peak_bytes": statistics.median(run["peak_bytes"] for run in runs)}


def _fmt_mem(m: dict) -> str:
    return m["missing"] if "missing" in m else f"{m['peak_bytes'] / 2**20:.0f}"


def _ratio(slow: dict, fast: dict) -> str:
    return "—" if "missing" in slow or "missing" in fast else f"{slow['ms'] / fast['ms']:.1f}×"


NOT_RUN = {"missing": "not run"}


def _estimate_line(name: str, seq_len: int, measured: dict[int, dict]) -> str | None:
    """Attention at ``seq_len`` extrapolated as T² from the longest measured length (an estimate)."""
    known = [t for t, m in measured.items() if "missing" not in m]
    if not known:
        return None
    base = max(known)
    return (f"estimate (not measured): {name} attention at T={seq_len} ≈ {measured[base]['ms'] * (seq_len / base) ** 2:.0f} ms "
            f"(T² from T={base})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T up to 4096 and a short decode table")
    parser.add_argument("--attention-max-len", type=int, default=32768,
                        help="longest T at which attention is run (longer cells: 'not run' plus a labelled estimate)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the fwd / fwd+bwd table this many times, cells interleaved; print per-cell medians "
                             "with the (min–max) range over rounds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    lengths = [1024, 2048, 4096] if args.quick else [1024, 4096, 8192, 16384, 32768, 65536]
    print(f"B={BATCH}, H={HEADS}, attention d={HEAD_DIM} (q/k/v), SKA matched r=P={SKA_CONFIGS['matched'][0]}, "
          f"SKA paper r={SKA_CONFIGS['paper'][0]} P={SKA_CONFIGS['paper'][1]}, S={CHUNK}, K=2, fp32, "
          f"{torch.get_num_threads()} threads\n")
    print("| T | pass | SDPA backend | SDPA ms | SKA matched ms | SKA paper ms | SDPA / SKA matched | SDPA / SKA paper "
          "| SDPA peak MiB | SKA matched peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    impls = {"matched": dict(impl="torch", config="matched"), "paper": dict(impl="torch", config="paper"),
             "attention": dict(impl="attention")}
    runs: dict[tuple[str, bool, int], list[dict]] = {}
    for _ in range(args.rounds):  # whole tables in turn: a slow drift of the machine hits every cell alike
        for backward in (False, True):
            for seq_len in lengths:
                for key, impl in impls.items():
                    if key != "attention" or seq_len <= args.attention_max_len:
                        runs.setdefault((key, backward, seq_len), []).append(
                            measure(kind="seq", T=seq_len, backward=backward, **impl))
    cells = {key: median_of_rounds(value) for key, value in runs.items()}
    estimates = []
    for backward in (False, True):
        name = "fwd+bwd" if backward else "fwd"
        attention: dict[int, dict] = {}
        for seq_len in lengths:
            matched, paper = cells["matched", backward, seq_len], cells["paper", backward, seq_len]
            att = attention[seq_len] = cells.get(("attention", backward, seq_len), NOT_RUN)
            if att is NOT_RUN:
                estimates.append(_estimate_line(name, seq_len, attention))
            print(f"| {seq_len} | {name} | {att.get('backend', '—')} | {_fmt_ms(att)} | {_fmt_ms(matched)} | "
                  f"{_fmt_ms(paper)} | {_ratio(att, matched)} | {_ratio(att, paper)} | {_fmt_mem(att)} | "
                  f"{_fmt_mem(matched)} |", flush=True)
    for line in filter(None, estimates):
        print(line)
    print("\nSKA scaling, t(T2)/t(T1) / (T2/T1) (1.0 = linear):")
    for config in SKA_CONFIGS:
        for backward in (False, True):
            times = {t: cells[config, backward, t] for t in lengths}
            parts = [f"{a}→{b}: {times[b]['ms'] / times[a]['ms'] / (b / a):.2f}"
                     for a, b in zip(lengths[:-1], lengths[1:])
                     if "missing" not in times[a] and "missing" not in times[b]]
            print(f"  {config} {'fwd+bwd' if backward else 'fwd'}: " + ", ".join(parts))
    contexts = [1024, 8192] if args.quick else [1024, 16384, 65536]
    print("\n| context | SKA (matched) step ms | SKA state KiB | attention step ms | SDPA backend | KV cache KiB |")
    print("|---|---|---|---|---|---|")
    for context in contexts:
        ska_m = measure(kind="decode", impl="ska", T=context)
        att_m = measure(kind="decode", impl="attention", T=context)
        print(f"| {context} | {ska_m['ms']:.3f} | {ska_m['state_bytes'] / 1024:.1f} | {att_m['ms']:.3f} | "
              f"{att_m['backend']} | {att_m['state_bytes'] / 1024:.0f} |", flush=True)
    print("\n| T | reference ms (fwd) | chunked ms (fwd) | reference / chunked |")
    print("|---|---|---|---|")
    for seq_len in (128, 256):
        ref_m = measure(kind="seq", impl="reference", T=seq_len, backward=False, repeats=1)
        fast_m = measure(kind="seq", impl="torch", T=seq_len, backward=False)
        print(f"| {seq_len} | {_fmt_ms(ref_m)} | {_fmt_ms(fast_m)} | {_ratio(ref_m, fast_m)} |", flush=True)


if __name__ == "__main__":
    main()
