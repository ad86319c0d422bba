"""SKA operator vs softmax attention on this machine: time, peak memory, decode — measured side by side.

Every measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss, minus the
process's baseline after importing torch and building the inputs) belongs to it alone; a
measurement that dies of memory exhaustion (or is refused by the address-space cap) is reported
as OOM. Prints Markdown tables.

    .venv/bin/python benchmarks/bench_ops.py            # full run (about 15 min on 2 cores)
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

import torch
import torch.nn.functional as F

BATCH, HEADS, RANK, VALUE_DIM, CHUNK = 1, 8, 48, 64, 64
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


def _sequence_inputs(seq_len: int, requires_grad: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    shape = (BATCH, seq_len, HEADS)
    return {
        "q": torch.randn(*shape, RANK, generator=gen).requires_grad_(requires_grad),
        "k": torch.randn(*shape, RANK, generator=gen).requires_grad_(requires_grad),
        "v": torch.randn(*shape, VALUE_DIM, generator=gen).requires_grad_(requires_grad),
    }


def _ska_runner(seq_len: int, backward: bool, backend: str):
    from echo_megatron.ops import ska

    x = _sequence_inputs(seq_len, backward)
    eta = torch.full((HEADS,), 1.5, requires_grad=backward)
    gamma = torch.full((HEADS,), 1.01, requires_grad=backward)

    def run():
        y = ska(x["q"], x["k"], x["v"], eta=eta, gamma=gamma, chunk_size=CHUNK, backend=backend)
        if backward:
            y.sum().backward()

    return run


def _attention_runner(seq_len: int, backward: bool):
    # SDPA wants [B, H, T, d]; softmax attention has head width r for q/k and P for v, as SKA.
    x = {n: t.detach().transpose(1, 2).contiguous().requires_grad_(backward)
         for n, t in _sequence_inputs(seq_len, False).items()}

    def run():
        y = F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
        if backward:
            y.sum().backward()

    return run


def _decode_runner(context: int, kind: str):
    """One decode step after `context` tokens: SKA state read+write vs attention over a KV cache."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, RANK, generator=gen)
    k = torch.randn(BATCH, HEADS, RANK, generator=gen)
    v = torch.randn(BATCH, HEADS, VALUE_DIM, generator=gen)
    if kind == "ska":
        from echo_megatron.ops import ska_prefill, ska_step

        x = _sequence_inputs(context, False)
        eta, gamma = torch.full((HEADS,), 1.5), torch.full((HEADS,), 1.01)
        with torch.no_grad():
            _, state = ska_prefill(x["q"], x["k"], x["v"], eta=eta, gamma=gamma, chunk_size=CHUNK)
        holder = {"state": state}

        def run():
            with torch.no_grad():  # one full chunk of steps, so the O(r³) refresh is amortised as in use
                for _ in range(CHUNK):
                    _, holder["state"] = ska_step(q, k, v, holder["state"], eta=eta, gamma=gamma)

        return run, state.nbytes
    k_cache = torch.randn(BATCH, HEADS, context + CHUNK, RANK, generator=gen)
    v_cache = torch.randn(BATCH, HEADS, context + CHUNK, VALUE_DIM, generator=gen)

    def run():
        with torch.no_grad():
            for i in range(CHUNK):
                n = context + i
                k_cache[:, :, n] = k
                v_cache[:, :, n] = v
                F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, : n + 1], v_cache[:, :, : n + 1])

    return run, (k_cache.numel() + v_cache.numel()) * 4 * context // (context + CHUNK)


def worker(spec: dict) -> dict:
    """Runs in the child process: one measurement."""
    torch.manual_seed(0)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))
    state_bytes = None
    if spec["kind"] == "decode":
        run, state_bytes = _decode_runner(spec["T"], spec["impl"])
    elif spec["impl"] == "attention":
        run = _attention_runner(spec["T"], spec["backward"])
    else:
        run = _ska_runner(spec["T"], spec["backward"], spec["impl"])
    baseline = _peak_rss_bytes()
    ms = _time_ms(run, spec["repeats"])
    if spec["kind"] == "decode":
        ms /= CHUNK
    return {"ms": ms, "peak_bytes": _peak_rss_bytes() - baseline, "state_bytes": state_bytes}


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
    return m["missing"] if "missing" in m else f"{m['ms']:.1f}"


def _fmt_mem(m: dict) -> str:
    return m["missing"] if "missing" in m else f"{m['peak_bytes'] / 2**20:.0f}"


def _ratio(slow: dict, fast: dict) -> str:
    return "—" if "missing" in slow or "missing" in fast else f"{slow['ms'] / fast['ms']:.1f}×"


def _attention_not_run(seq_len: int, backward: bool) -> dict:
    """Attention cells too large to run here, with the arithmetic that says why."""
    scores_gib = BATCH * HEADS * seq_len**2 * 4 / 2**30
    if backward:  # the backward keeps the T×T probabilities: far beyond the machine
        return {"missing": f"OOM (T×T scores {scores_gib:.0f} GiB)"}
    return {"missing": "not run (> 10 min)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T up to 4096 and a short decode table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    lengths = [1024, 2048, 4096] if args.quick else [1024, 4096, 8192, 16384, 65536]
    attention_max_len = 16384  # beyond: fwd takes > 10 min and fwd+bwd needs > 100 GiB
    torch_threads = torch.get_num_threads()
    print(f"B={BATCH}, H={HEADS}, r={RANK}, P={VALUE_DIM}, S={CHUNK}, K=2, fp32, {torch_threads} threads\n")
    print("| T | pass | SKA ms | SDPA ms | SDPA / SKA | SKA peak MiB | SDPA peak MiB |")
    print("|---|---|---|---|---|---|---|")
    ska_times: dict[tuple[bool, int], dict] = {}
    for backward in (False, True):
        for seq_len in lengths:
            ska_m = measure(kind="seq", impl="torch", T=seq_len, backward=backward)
            ska_times[backward, seq_len] = ska_m
            if seq_len <= attention_max_len:
                att_m = measure(kind="seq", impl="attention", T=seq_len, backward=backward)
            else:
                att_m = _attention_not_run(seq_len, backward)
            name = "fwd+bwd" if backward else "fwd"
            print(f"| {seq_len} | {name} | {_fmt_ms(ska_m)} | {_fmt_ms(att_m)} | {_ratio(att_m, ska_m)} "
                  f"| {_fmt_mem(ska_m)} | {_fmt_mem(att_m)} |", flush=True)
    print("\nSKA scaling, t(T2)/t(T1) / (T2/T1) (1.0 = linear):")
    for backward in (False, True):
        pairs = zip(lengths[:-1], lengths[1:])
        parts = [f"{a}→{b}: {ska_times[backward, b]['ms'] / ska_times[backward, a]['ms'] / (b / a):.2f}"
                 for a, b in pairs]
        print(f"  {'fwd+bwd' if backward else 'fwd'}: " + ", ".join(parts))
    contexts = [1024, 8192] if args.quick else [1024, 16384, 65536]
    print("\n| context | SKA step ms | SKA state KiB | attention step ms | KV cache KiB |")
    print("|---|---|---|---|---|")
    for context in contexts:
        ska_m = measure(kind="decode", impl="ska", T=context)
        att_m = measure(kind="decode", impl="attention", T=context)
        print(f"| {context} | {ska_m['ms']:.3f} | {ska_m['state_bytes'] / 1024:.1f} | {att_m['ms']:.3f} "
              f"| {att_m['state_bytes'] / 1024:.0f} |", flush=True)
    print("\n| T | reference ms (fwd) | chunked ms (fwd) | reference / chunked |")
    print("|---|---|---|---|")
    for seq_len in (128, 256):
        ref_m = measure(kind="seq", impl="reference", T=seq_len, backward=False, repeats=1)
        fast_m = measure(kind="seq", impl="torch", T=seq_len, backward=False)
        print(f"| {seq_len} | {_fmt_ms(ref_m)} | {_fmt_ms(fast_m)} | {_ratio(ref_m, fast_m)} |", flush=True)


if __name__ == "__main__":
    main()
