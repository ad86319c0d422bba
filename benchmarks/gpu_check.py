"""The prepared GPU check (issue 11, item 4): correctness, timings, the Megatron layer and CUDA graphs on one GPU.

Run through `scripts/gpu_check.sh` (which installs the carried wheels first), or directly:

    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out DIR            # on a CUDA machine
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out DIR --dry-run  # CPU: tiny sizes, Triton interpreter
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out DIR --dry-run --quick  # fp32, one case, one length

Sections, run in this order, each with its own time limit (checked between items, plus a hard alarm), each
catching its own exceptions (recorded with a traceback summary) so one failure never loses the others:

  p  Prewarm: compile every Triton specialisation the sections below launch, in parallel worker processes
     (one per item, all CPU cores), into Triton's on-disk cache, so sections a-d load kernels instead of
     compiling them one after another (a forward+backward compiles 9 kernels per dtype and tile size).
  a  Triton forward and all gradients vs the torch path and the fp64 reference (fp32/bf16/fp16, awkward
     sizes, packed sequences), decode (prefill + steps) vs the parallel forward.
  c  The Megatron SKA layer (local spec, TP = 1, one-rank nccl/gloo group): forward/backward, Triton vs torch.
  b  Timings (CUDA events, warm-up, median; B = 1) of SKA Triton fwd and fwd+bwd at T = 2K … 128K, bf16,
     H = 16, r = P = 64, next to the same with every chunk's visible statistics written (G = 1: the A/B of the
     dense kernels' recomputation, issue 18), with the two-stage statistics the walk replaced (the walk's
     parallelism at B = 1) and SKA at r = P = 128 (issue 18: it did not launch before), SDPA (flash and
     cuDNN backends, forced) and fla's `chunk_gated_delta_rule`; decode step vs context; peak memory.
  k  Per-kernel profile (`torch.profiler`, CUDA time by kernel) of one SKA forward+backward at 8K and 32K
     (issue 18: where the time goes after the dense rewrite).
  d  Host synchronisations of `ska()`'s default path (`torch.cuda.set_sync_debug_mode`); CUDA-graph capture
     of the layer's forward (last: a failed capture can leave the CUDA context unusable).

After every item the whole report is rewritten to DIR/gpu_check.json and DIR/gpu_check.md, so a timeout still
leaves data. Anything that cannot run (no CUDA, no fla, no cuDNN) is recorded as "not run" with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from echo_megatron.ops import ska, ska_prefill, ska_step

GRAD_NAMES = ("q", "k", "v", "eta", "gamma")
MiB = 2**20


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Case:
    """One correctness case: q, k [B, T, H, r]; v [B, T, H, P]; chunk size S; extra `ska` options."""

    batch: int
    heads: int
    rank: int
    value_dim: int
    seq_len: int
    chunk_size: int
    options: tuple = ()  # (name, value) pairs passed to ska
    cu_seqlens: tuple | None = None

    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.options)
        packed = f" cu_seqlens={list(self.cu_seqlens)}" if self.cu_seqlens else ""
        return (f"B={self.batch} H={self.heads} r={self.rank} P={self.value_dim} T={self.seq_len} "
                f"S={self.chunk_size}{extra}{packed}")


@dataclass(frozen=True)
class Profile:
    """Everything the sections size from: the GPU profile and the tiny CPU dry-run profile."""

    dtypes: tuple[torch.dtype, ...]
    cases: tuple[Case, ...]
    extra_fp32_cases: tuple[Case, ...]  # modes / norms checked in fp32 only
    decode: tuple[int, int, int, int, int, int]  # B, H, r, P, S, T0 (prefill), steps follow up to 2·T0
    layer: dict  # SKAConfig fields for sections c and d
    layer_tokens: tuple[int, int]  # s, b
    bench_lengths: tuple[int, ...]
    bench_heads: int
    bench_width: int  # r = P = SDPA/fla head width
    bench_dtype: torch.dtype
    bench_chunk: int  # SKA chunk size S of the timings
    min_reps: int  # timed repetitions at least (after 2 warm-ups)
    decode_contexts: tuple[int, ...]
    profile_lengths: tuple[int, ...]  # T of section k's per-kernel profiles
    limits: dict[str, float]  # seconds per section
    prewarm_jobs: int  # parallel compile workers (the dry run prewarms only its first item: no cache on CPU)
    cpu_prewarm: tuple[str, ...] = ()  # on CPU (nothing to cache) one worker runs these items, to keep them working


GPU = Profile(
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    cases=(
        Case(2, 3, 24, 20, 1, 16), Case(2, 3, 24, 20, 63, 16), Case(2, 3, 24, 20, 65, 16),
        Case(2, 3, 24, 20, 200, 16), Case(1, 2, 48, 40, 200, 64),
        Case(1, 3, 24, 20, 200, 16, cu_seqlens=(0, 1, 64, 65, 130, 200)),
    ),
    extra_fp32_cases=(
        Case(1, 2, 24, 20, 130, 16, options=(("norm", "none"),)),
        Case(1, 2, 24, 20, 130, 16, options=(("power", 0),)),
        Case(1, 2, 24, 20, 130, 16, options=(("mode", "prefix"), ("masked", True))),
    ),
    decode=(2, 3, 24, 20, 16, 40),
    layer=dict(hidden_size=1024, num_attention_heads=16, ska_num_heads=16, ska_rank=64, ska_value_dim=64,
               ska_chunk_size=64, ffn_hidden_size=4096),
    layer_tokens=(4096, 2),
    bench_lengths=tuple(2**k for k in range(11, 18)),  # 2K … 128K
    bench_heads=16,
    bench_width=64,
    bench_dtype=torch.bfloat16,
    bench_chunk=64,
    min_reps=3,
    decode_contexts=(2048, 16384, 131072),
    profile_lengths=(8192, 32768),
    limits=dict(p=80.0, a=70.0, c=40.0, b=140.0, k=20.0, d=40.0),  # 390 s + ~20 s start-up < the 450 s limit
    prewarm_jobs=12,
)

DRY = Profile(
    dtypes=(torch.float32, torch.float16),  # the interpreter's bf16 tl.dot is wrong
    cases=(Case(1, 2, 3, 4, 1, 4), Case(1, 2, 3, 4, 9, 4, cu_seqlens=(0, 5, 9))),
    extra_fp32_cases=(),
    decode=(1, 2, 3, 4, 4, 5),
    layer=dict(hidden_size=16, num_attention_heads=2, ska_num_heads=2, ska_rank=3, ska_value_dim=4,
               ska_chunk_size=4, ffn_hidden_size=32, use_cpu_initialization=True),
    layer_tokens=(9, 1),
    bench_lengths=(8, 16),
    bench_heads=2,
    bench_width=4,
    bench_dtype=torch.float32,
    bench_chunk=4,
    min_reps=1,
    decode_contexts=(8, 16),
    profile_lengths=(8,),
    limits=dict(p=120.0, a=240.0, c=120.0, b=120.0, k=60.0, d=60.0),
    prewarm_jobs=1,
    cpu_prewarm=("case:0:0", "decode:0", "bench:ska", "bench:ska_every_chunk", "bench:ska_two_stage", "bench:ska_wide",
                 "layer"),
)


DRY_QUICK = replace(DRY, dtypes=(torch.float32,), cases=DRY.cases[1:], bench_lengths=DRY.bench_lengths[:1],
                    decode_contexts=DRY.decode_contexts[:1], cpu_prewarm=("bench:ska",))
"""`--dry-run --quick`: every section of the dry run, fp32 only, the packed case only (which also runs each
sequence alone), one length, one prewarm item: the default test run's profile, a fraction of the time."""

# ----------------------------------------------------------------------------- the report
class SectionTimeout(BaseException):
    """Raised by the hard alarm when a section overruns its limit (not an Exception: items never catch it)."""


def error_summary(exc: BaseException, frames: int = 4) -> str:
    """`Type: message` plus the innermost frames of the traceback."""
    tb = traceback.extract_tb(exc.__traceback__)[-frames:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(tb))
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0][:300] if message else ''}" + (f" [at {where}]" if where else "")


@dataclass
class Section:
    key: str
    title: str
    limit_s: float
    status: str = "not run"
    elapsed_s: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    items: list[dict] = field(default_factory=list)
    deadline: float = math.inf

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


class Report:
    """The json/md pair under `out`, rewritten after every item."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out = out
        self.meta = meta
        self.sections: dict[str, Section] = {}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: Section, item: dict) -> None:
        section.items.append(item)
        self.save()

    def save(self) -> None:
        data = dict(meta=self.meta, sections={k: {n: v for n, v in vars(s).items() if n != "deadline"}
                                              for k, s in self.sections.items()})
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(render_markdown(data))


def render_markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [f"# SKA GPU check — {meta['date']}", "",
             "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in meta.items() if k != "date"]
    for section in data["sections"].values():
        lines += ["", f"## {section['key']}. {section['title']}", "",
                  f"status: **{section['status']}** ({section['elapsed_s']:.1f} s of {section['limit_s']:.0f} s)"]
        if section["error"]:
            lines.append(f"\nerror: `{section['error']}`")
        lines += [f"\n- {note}" for note in section["notes"]]
        lines += _table(section["items"])
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value == value and abs(value) != math.inf else str(value)
    return str(value).replace("|", "/")


def _table(items: list[dict]) -> list[str]:
    """Markdown tables, one per run of items with the same `table` name and keys."""
    lines, header = [], None
    for item in items:
        keys = [k for k in item if k != "table"]
        if keys != header:
            header = keys
            lines += ["", f"{item.get('table', '')}", "", "| " + " | ".join(keys) + " |",
                      "|" + " --- |" * len(keys)]
        lines.append("| " + " | ".join(_fmt(item[k]) for k in keys) + " |")
    return lines


@contextlib.contextmanager
def _hard_alarm(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after `seconds` (a last resort; items also check the deadline)."""
    def fire(signum, frame):
        raise SectionTimeout(f"hard time limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(report: Report, key: str, title: str, limit_s: float, body: Callable[[Section], None]) -> None:
    """Run `body(section)`; record its status, time and any error; never raise."""
    section = Section(key, title, limit_s)
    report.sections[key] = section
    start = time.monotonic()
    section.deadline = start + limit_s
    section.status = "running"
    report.save()
    try:
        with _hard_alarm(limit_s + 20.0):
            body(section)
        section.status = "partial (time limit)" if section.time_left() < 0 else "ok"
    except SectionTimeout as exc:
        section.status, section.error = "partial (hard time limit)", str(exc)
    except Exception as exc:  # noqa: BLE001 - the check records every failure and goes on
        section.status, section.error = "failed", error_summary(exc)
    failures = sum(1 for item in section.items if item.get("pass") is False or item.get("error"))
    if failures and section.status == "ok":
        section.status = f"ok, {failures} item(s) failed or errored"
    section.elapsed_s = time.monotonic() - start
    report.save()


def guarded(report: Report, section: Section, table: str, label: dict, fn: Callable[[], dict],
            min_left_s: float = 0.0) -> dict | None:
    """Run one item unless the section's time is up; record its result, or its error, under `label`."""
    if section.time_left() < min_left_s:
        report.add(section, dict(table=table, **label, error=f"not run: section time limit ({section.limit_s:.0f} s)"))
        return None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001
        result = dict(error=error_summary(exc))
    report.add(section, dict(table=table, **label, **result))
    return result


# ----------------------------------------------------------------------------- helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, budget_s: float = 1.0, min_reps: int = 3,
            max_reps: int = 20) -> dict:
    """Median wall time of fn() in ms after one warm-up call (CUDA events on GPU, perf_counter on CPU).

    Returns also the first (warm-up, compile/autotune included) call's time and the repetitions used.
    """
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - t0
    fn()  # a second warm-up: allocator and autotune caches settled
    reps = int(max(min_reps, min(max_reps, budget_s / max(first, 1e-4))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return dict(ms=statistics.median(times), first_call_s=first, reps=reps)


@contextlib.contextmanager
def peak_memory(device: torch.device, record: dict) -> Iterator[None]:
    """Record in `record["peak_MiB"]` the peak allocation above what was allocated on entry (CUDA only)."""
    if device.type != "cuda":
        yield
        record["peak_MiB"] = "n/a (CPU)"
        return
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield
    synchronize(device)
    record["peak_MiB"] = (torch.cuda.max_memory_allocated(device) - base) / MiB


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute when expected is zero); inf if anything is not finite."""
    if actual.numel() == 0:
        return 0.0
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    return diff / scale if scale > 0 else diff


def random_inputs(case: Case, seed: int) -> dict[str, torch.Tensor]:
    """fp64 CPU master inputs for a case (mask included when the case asks for one), and the upstream grad."""
    gen = torch.Generator().manual_seed(seed)
    b, t, h = case.batch, case.seq_len, case.heads
    inputs = dict(
        q=torch.randn(b, t, h, case.rank, generator=gen, dtype=torch.float64),
        k=torch.randn(b, t, h, case.rank, generator=gen, dtype=torch.float64),
        v=torch.randn(b, t, h, case.value_dim, generator=gen, dtype=torch.float64),
        eta=0.5 + torch.rand(h, generator=gen, dtype=torch.float64),
        gamma=1.0 + 0.5 * torch.rand(h, generator=gen, dtype=torch.float64),
        dy=torch.randn(b, t, h, case.value_dim, generator=gen, dtype=torch.float64),
    )
    if dict(case.options).get("masked"):
        inputs["mask"] = (torch.rand(b, t, generator=gen) > 0.3).to(torch.float64)
    return inputs


def forward_backward(master: dict, case: Case, backend: str, dtype: torch.dtype, device: torch.device
                     ) -> dict[str, torch.Tensor]:
    """y and the gradients of <y, dy> for q, k, v, eta, gamma: token tensors in `dtype`, eta/gamma in fp32
    (fp64 when dtype is fp64), as a bf16 layer passes them."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {n: master[n].to(device, dtype if n in ("q", "k", "v") else param_dtype).requires_grad_()
              for n in GRAD_NAMES}
    options = {k: v for k, v in case.options if k != "masked"}
    if "mask" in master:
        options["mask"] = master["mask"].to(device, dtype)
    if case.cu_seqlens is not None:
        options["cu_seqlens"] = torch.tensor(case.cu_seqlens, dtype=torch.int32, device=device)
    y = ska(leaves["q"], leaves["k"], leaves["v"], eta=leaves["eta"], gamma=leaves["gamma"],
            chunk_size=case.chunk_size, backend=backend, **options)
    grads = torch.autograd.grad(y, [leaves[n] for n in GRAD_NAMES], master["dy"].to(device, y.dtype),
                                allow_unused=True, materialize_grads=True)
    return dict(y=y.detach(), **{f"d{n}": g for n, g in zip(GRAD_NAMES, grads)})


@functools.lru_cache(maxsize=None)
def reference_result(case: Case, seed: int) -> dict[str, torch.Tensor]:
    """The fp64 reference on the fp64 master inputs, on the host (it loops over tokens: microseconds per op
    there, a kernel launch each on a GPU), computed once per case and shared by every dtype. Errors of half-
    precision runs therefore include the rounding of their inputs, equally for the Triton and torch paths."""
    return forward_backward(random_inputs(case, seed), case, "reference", torch.float64, torch.device("cpu"))


# tolerance on max-relative error vs the fp64 reference, per dtype; Triton also passes within 2x the torch
# path's own error in the same dtype (half-precision inputs make both paths equally approximate)
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


# ----------------------------------------------------------------------------- section a
def section_correctness(report: Report, section: Section, profile: Profile, device: torch.device) -> None:
    items = [(dtype, case) for dtype in profile.dtypes for case in (*profile.cases, "decode")]
    items += [(torch.float32, case) for case in profile.extra_fp32_cases]
    for dtype, case in items:
        name = str(dtype).removeprefix("torch.")
        if case == "decode":
            guarded(report, section, "Decode: prefill(T0) + steps vs the parallel forward (max-relative error)",
                    dict(dtype=name), lambda dtype=dtype: _compare_decode(profile, dtype, device))
        else:
            guarded(report, section, "Triton and torch vs the fp64 reference (max-relative error; y, worst grad)",
                    dict(dtype=name, case=case.label()),
                    lambda dtype=dtype, case=case: _compare_backends(case, dtype, device, seed=0))


def _compare_backends(case: Case, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    master = random_inputs(case, seed)
    reference = reference_result(case, seed)
    result, worst = {}, {}
    t0 = time.perf_counter()
    for backend in ("triton", "torch"):
        out = forward_backward(master, case, backend, dtype, device)
        errs = {name: rel_err(out[name], reference[name]) for name in reference}
        result[f"{backend} y"] = errs.pop("y")
        worst[backend] = max(errs.items(), key=lambda kv: kv[1] if kv[1] == kv[1] else math.inf)
        result[f"{backend} grad"] = f"{worst[backend][1]:.2e} ({worst[backend][0]})"
        if backend == "triton":
            result["triton s (1st call)"] = time.perf_counter() - t0
    result["packed vs alone"] = (_packed_vs_alone(master, case, dtype, device) if case.cu_seqlens is not None
                                 else "-")  # packed == each sequence alone (Triton)
    limit = TOLERANCE[dtype]
    triton_errs = (result["triton y"], worst["triton"][1])
    torch_errs = (result["torch y"], worst["torch"][1])
    packed_ok = case.cu_seqlens is None or result["packed vs alone"] <= limit
    result["pass"] = packed_ok and all(e == e and e <= max(limit, 2 * t) for e, t in zip(triton_errs, torch_errs))
    return result


def _packed_vs_alone(master: dict, case: Case, dtype: torch.dtype, device: torch.device) -> float:
    packed = forward_backward(master, case, "triton", dtype, device)["y"]
    bounds = case.cu_seqlens
    alone = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        piece = {n: (x[:, start:end] if x.dim() > 1 else x) for n, x in master.items()}
        alone.append(forward_backward(piece, Case(1, case.heads, case.rank, case.value_dim, end - start,
                                                  case.chunk_size), "triton", dtype, device)["y"])
    return rel_err(packed, torch.cat(alone, dim=1))


def _compare_decode(profile: Profile, dtype: torch.dtype, device: torch.device) -> dict:
    batch, heads, rank, value_dim, chunk, prompt = profile.decode
    case = Case(batch, heads, rank, value_dim, 2 * prompt + 3, chunk)
    master = random_inputs(case, seed=99)
    x = {n: master[n].to(device, dtype) for n in ("q", "k", "v")}
    eta, gamma = master["eta"].to(device, torch.float32), master["gamma"].to(device, torch.float32)
    parallel = ska(x["q"], x["k"], x["v"], eta=eta, gamma=gamma, chunk_size=chunk, backend="triton")
    y0, state = ska_prefill(x["q"][:, :prompt], x["k"][:, :prompt], x["v"][:, :prompt], eta=eta, gamma=gamma,
                            chunk_size=chunk)
    steps = []
    for t in range(prompt, case.seq_len):
        y, state = ska_step(x["q"][:, t], x["k"][:, t], x["v"][:, t], state, eta=eta, gamma=gamma)
        steps.append(y)
    decoded = torch.cat([y0, torch.stack(steps, dim=1)], dim=1)
    err = rel_err(decoded, parallel)
    return dict(T0=prompt, steps=case.seq_len - prompt, S=chunk, err=err, state_bytes=state.nbytes,
                **{"pass": err == err and err <= max(TOLERANCE[dtype], 1e-4)})


# ----------------------------------------------------------------------------- sections c and d: the layer
_MODEL_PARALLEL: dict = {}


def model_parallel(device: torch.device) -> str:
    """One-rank process group (nccl on CUDA, gloo on CPU) and Megatron's TP = 1 state, set up once."""
    if _MODEL_PARALLEL:
        return _MODEL_PARALLEL["backend"]
    from megatron.core import parallel_state, tensor_parallel

    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        from echo_megatron.megatron.cpu import enable_cpu_mode, install_cpu_rng_tracker

        enable_cpu_mode()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, create_gloo_process_groups=backend == "gloo")
    if device.type != "cuda":
        install_cpu_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    _MODEL_PARALLEL["backend"] = backend
    return backend


def build_layer(profile: Profile, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A TransformerLayer from `ska_layer_spec_local` (local spec, TP = 1), non-zero output projection."""
    from megatron.core.transformer.spec_utils import build_module

    from echo_megatron.megatron import SKAConfig
    from echo_megatron.megatron.specs import ska_layer_spec_local

    config = SKAConfig(num_layers=1, normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0,
                       attention_dropout=0.0, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                       fp16=dtype == torch.float16, ska_zero_init_output=False, **profile.layer)
    torch.manual_seed(seed)
    layer = build_module(ska_layer_spec_local, config=config, layer_number=1)
    return layer.to(device), config


def layer_dtype(device: torch.device) -> torch.dtype:
    """Parameter dtype of the layer checks: bf16 on GPUs (as trained), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def layer_output(layer, hidden: torch.Tensor) -> torch.Tensor:
    out = layer(hidden, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def section_layer(report: Report, section: Section, profile: Profile, device: torch.device) -> None:
    dtype = layer_dtype(device)
    section.notes.append(f"process group: {model_parallel(device)}, TP = 1, local spec (ColumnParallelLinear / "
                         f"RowParallelLinear / TorchNorm), params {str(dtype).removeprefix('torch.')}, "
                         f"[s, b] = {list(profile.layer_tokens)}, layer fields {profile.layer}")
    try:
        import transformer_engine  # noqa: F401
        section.notes.append("transformer_engine is importable: the TE spec is not exercised by this check")
    except ImportError:
        section.notes.append("TE spec not run: transformer_engine is not installed")
    layer, config = build_layer(profile, device, dtype)
    seq, batch = profile.layer_tokens
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(seq, batch, config.hidden_size, generator=gen).to(device, dtype)
    upstream = torch.randn(seq, batch, config.hidden_size, generator=gen).to(device, dtype)
    results = {}
    for backend in ("triton", "torch"):
        def run(backend=backend) -> dict:
            config.ska_backend = backend
            x = hidden.clone().requires_grad_()
            layer.zero_grad(set_to_none=True)
            out = layer_output(layer, x)
            out.backward(upstream)
            results[backend] = dict(out=out.detach(), dx=x.grad, dw=layer.self_attention.in_proj.weight.grad.clone())

            def step():
                layer_output(layer, hidden.clone().requires_grad_()).backward(upstream)
            timing = time_ms(step, device, budget_s=1.0, min_reps=profile.min_reps, max_reps=10)
            return dict(finite=bool(torch.isfinite(out).all() and torch.isfinite(results[backend]["dw"]).all()),
                        in_proj_grad_norm=results[backend]["dw"].float().norm().item(),
                        **{"fwd+bwd ms": timing["ms"], "first call s": timing["first_call_s"]})
        guarded(report, section, "Layer forward/backward", dict(ska_backend=backend), run)
    if len(results) == 2:
        def agree() -> dict:
            errs = {n: rel_err(results["triton"][n], results["torch"][n]) for n in ("out", "dx", "dw")}
            limit = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
            return dict(**{f"{n} err": e for n, e in errs.items()}, tolerance=limit,
                        **{"pass": all(e <= limit for e in errs.values())})
        guarded(report, section, "Layer: triton vs torch backend (same weights, max-relative error)", {}, agree)


def section_graphs_and_syncs(report: Report, section: Section, profile: Profile, device: torch.device) -> None:
    cuda = device.type == "cuda"
    if not cuda:
        section.notes.append("dry run on CPU: CUDA-graph capture and sync debug mode are emulated (eager calls, "
                             "no sync detection); they only run on a GPU")
    model_parallel(device)
    dtype = layer_dtype(device)
    layer, config = build_layer(profile, device, dtype, seed=1)
    seq, batch = profile.layer_tokens
    static_in = torch.randn(seq, batch, config.hidden_size, device=device, dtype=dtype)
    width = profile.bench_width
    shape = (1, profile.layer_tokens[0], profile.bench_heads, width)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    eta = torch.full((profile.bench_heads,), 1.5, device=device)
    gamma = torch.full((profile.bench_heads,), 1.01, device=device)
    for mode in ("forward", "forward+backward"):
        guarded(report, section, "Host synchronisations in ska()'s default path (set_sync_debug_mode)",
                dict(mode=mode, shape=list(shape)), lambda mode=mode: _sync_sites(q, k, v, eta, gamma, mode, cuda))
    guarded(report, section, "CUDA-graph capture of the layer forward (no grad)", {},
            lambda: _capture_forward(layer, static_in, cuda))
    guarded(report, section, "CUDA-graph capture, fwd+bwd (torch.cuda.make_graphed_callables)", {},
            lambda: _capture_fwd_bwd(layer, static_in, cuda))


def _capture_forward(layer, static_in: torch.Tensor, cuda: bool) -> dict:
    with torch.no_grad():
        eager = layer_output(layer, static_in).clone()
        if not cuda:
            return dict(captured="emulated (CPU)", replay_err=rel_err(layer_output(layer, static_in), eager))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                layer_output(layer, static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer_output(layer, static_in)
        graph.replay()
        torch.cuda.synchronize()
        err = rel_err(static_out, eager)
    return dict(captured=True, replay_err=err, **{"pass": err <= 1e-2})


def _capture_fwd_bwd(layer, static_in: torch.Tensor, cuda: bool) -> dict:
    x = static_in.clone().requires_grad_()
    eager = layer_output(layer, x)
    eager.float().square().mean().backward()
    eager_dx = x.grad.clone()
    if not cuda:
        return dict(captured="emulated (CPU)", dx_norm=eager_dx.float().norm().item())
    graphed = torch.cuda.make_graphed_callables(lambda t: layer_output(layer, t), (static_in.clone().requires_grad_(),))
    x2 = static_in.clone().requires_grad_()
    graphed(x2).float().square().mean().backward()
    err = rel_err(x2.grad, eager_dx)
    return dict(captured=True, dx_err=err, **{"pass": err <= 5e-2})


def _sync_sites(q, k, v, eta, gamma, mode: str, cuda: bool) -> dict:
    """Run ska() (default backend) once to compile, then under sync debug mode "warn" (recording where each
    host sync happens, innermost echo_megatron frame) and "error" (whether it raises)."""
    leaves = [x.clone().requires_grad_(mode != "forward") for x in (q, k, v)]

    def call():
        y = ska(*leaves, eta=eta, gamma=gamma)
        if mode != "forward":
            y.float().sum().backward()

    call()
    if not cuda:
        return dict(syncs="not run (needs CUDA)")
    synchronize(q.device)
    sites: dict[str, int] = {}
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):  # only the sync debug mode's warnings
            return
        ours = [f for f in traceback.extract_stack() if "echo_megatron" in f.filename]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else f"{filename}:{lineno}"
        sites[where] = sites.get(where, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = original
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
        raised = "no"
    except RuntimeError as exc:
        raised = error_summary(exc, frames=3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return dict(syncs=sum(sites.values()), sites="; ".join(f"{k} x{n}" for k, n in sites.items()) or "none",
                error_mode=raised, **{"pass": not sites})


# ----------------------------------------------------------------------------- section b: timings
def section_timings(report: Report, section: Section, profile: Profile, device: torch.device) -> None:
    heads, width, dtype = profile.bench_heads, profile.bench_width, profile.bench_dtype
    section.notes.append(f"B = 1, H = {heads}, r = P = head width = {width}, {str(dtype).removeprefix('torch.')}, "
                         f"SKA S = {profile.bench_chunk}, K = 2, causal everywhere; median of n timed calls after 2 warm-ups "
                         f"({'CUDA events' if device.type == 'cuda' else 'perf_counter, CPU dry run'}); "
                         "peak = max allocated above the inputs")
    peers = _peers(device, section)
    table = "Prefill / training step: ms (peak MiB)"
    for seq_len in profile.bench_lengths:
        if section.time_left() < 5:
            report.add(section, dict(table=table, T=seq_len, error="not run: section time limit"))
            continue
        row = dict(table=table, T=seq_len)
        for name, make in [("SKA triton", _ska_bench), ("SKA triton G=1", _ska_every_chunk_bench),
                           ("SKA triton two-stage statistics", _ska_two_stage_bench),
                           ("SKA triton r=P=2w", _ska_wide_bench), *peers]:
            for phase in ("fwd", "fwd+bwd"):
                row[f"{name} {phase}"] = _bench_cell(make, seq_len, profile, device, phase, section)
        report.add(section, row)
    table = "Decode: one token at context T0 (SKA state vs SDPA KV cache)"
    for context in profile.decode_contexts:
        guarded(report, section, table, dict(T0=context),
                lambda context=context: _decode_bench(context, profile, device), min_left_s=5)


def section_kernel_profile(report: Report, section: Section, profile: Profile, device: torch.device) -> None:
    """Device time per kernel (the 12 largest) of one warm SKA forward+backward, bench shape, at each length."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cuda = device.type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"

    def one(seq_len: int) -> dict:
        forward, _ = _ska_bench(seq_len, profile, device)
        upstream = torch.randn_like(forward())
        forward().backward(upstream)  # warm: compiled, cached tables
        synchronize(device)
        with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            forward().backward(upstream)
            synchronize(device)
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total_us = sum(getattr(e, key) for e in events)
        for e in events[:12]:
            report.add(section, dict(table=f"Per-kernel time, one fwd+bwd at T = {seq_len}", kernel=e.key[:60],
                                     calls=e.count, ms=getattr(e, key) / 1e3,
                                     share=f"{100 * getattr(e, key) / max(total_us, 1e-9):.0f} %"))
        return dict(total_ms=total_us / 1e3, kernels=len(events))

    for seq_len in profile.profile_lengths:
        guarded(report, section, "Per-kernel time: totals", dict(T=seq_len), lambda t=seq_len: one(t), min_left_s=3)


def _peers(device: torch.device, section: Section) -> list:
    """(name, maker) of the baselines that can run here; the others are noted as not run."""
    from torch.nn.attention import SDPBackend

    peers = [("SDPA flash", lambda *a: _sdpa_bench(SDPBackend.FLASH_ATTENTION, *a))]
    if device.type == "cuda":
        peers.append(("SDPA cuDNN", lambda *a: _sdpa_bench(SDPBackend.CUDNN_ATTENTION, *a)))
    else:
        section.notes.append("SDPA cuDNN: not run (needs CUDA)")
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
        import fla
        section.notes.append(f"fla {fla.__version__}: chunk_gated_delta_rule, q/k L2-normalised in the kernel")
        if device.type == "cuda":
            peers.append(("fla GDN", _fla_bench))
        else:
            section.notes.append("fla chunk_gated_delta_rule: not run (needs CUDA)")
    except ImportError as exc:
        section.notes.append(f"fla chunk_gated_delta_rule: not run ({error_summary(exc, frames=0)})")
    return peers


def _bench_cell(make, seq_len: int, profile: Profile, device: torch.device, phase: str, section: Section) -> str:
    """'ms (peak MiB)' of one (method, length, phase), or why it did not run."""
    if section.time_left() < 3:
        return "not run: time limit"
    record: dict = {}
    try:
        forward, tensors = make(seq_len, profile, device)
        if phase == "fwd":
            def fn():
                with torch.no_grad():
                    forward()
        else:
            upstream = torch.randn_like(forward())

            def fn():
                for t in tensors:
                    t.grad = None
                forward().backward(upstream)
        with peak_memory(device, record):
            timing = time_ms(fn, device, budget_s=min(1.0, max(0.2, section.time_left() / 40)),
                             min_reps=profile.min_reps)
    except Exception as exc:  # noqa: BLE001
        return f"error: {error_summary(exc, frames=1)}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = record.get("peak_MiB")
    peak = f"{peak:.0f}" if isinstance(peak, float) else peak
    first = f", 1st {timing['first_call_s']:.1f} s" if timing["first_call_s"] > 2 else ""
    return f"{timing['ms']:.3g} ({peak}{first})"


def _ska_wide_bench(seq_len: int, profile: Profile, device: torch.device):
    """SKA at twice the bench width (r = P = 128 on the GPU profile)."""
    return _ska_bench(seq_len, profile, device, width=2 * profile.bench_width)


def _ska_patched_bench(seq_len: int, profile: Profile, device: torch.device, **patches):
    """`_ska_bench` with attributes of `echo_megatron.ops.triton.function` replaced while the forward runs (the
    autograd graph it builds decides the backward)."""
    from unittest import mock

    from echo_megatron.ops.triton import function as tfn

    forward, tensors = _ska_bench(seq_len, profile, device)

    def patched():
        with mock.patch.multiple(tfn, **patches):
            return forward()
    return patched, tensors


def _ska_every_chunk_bench(seq_len: int, profile: Profile, device: torch.device):
    """SKA with the walk writing every chunk's visible statistics and the dense kernels reading them (G = 1), where
    `chunks_per_block` lets the dense kernels recompute all but one chunk's in G: the A/B of that choice."""
    return _ska_patched_bench(seq_len, profile, device, chunks_per_block=lambda *args: 1)


def _ska_two_stage_bench(seq_len: int, profile: Profile, device: torch.device):
    """SKA with its statistics and scan as the two chunk-parallel stages the walk replaced (issue 18), every chunk's
    row written (as G = 1): the walk is parallel over B·H and column tiles only, so this A/B (against the G = 1
    column) says whether that costs time at B = 1."""
    from echo_megatron.ops.triton import function as tfn

    def staged(q, k, v, eta, gamma, weights, table, norm_keys, sequence_max, every, *dense):
        rows, chunk_max = tfn.ChunkStatistics.apply(k, v, weights, table, norm_keys)
        visible, max_norm = tfn.SegmentScan.apply(rows, chunk_max, table, False, sequence_max)
        return tfn.ChunkReadout.apply(visible, max_norm, gamma, q, eta, table, *dense)

    return _ska_patched_bench(seq_len, profile, device, ChunkCausal=SimpleNamespace(apply=staged))


def _ska_bench(seq_len: int, profile: Profile, device: torch.device, width: int | None = None):
    heads, dtype = profile.bench_heads, profile.bench_dtype
    width = width or profile.bench_width
    q, k, v = (torch.randn(1, seq_len, heads, width, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    eta = torch.full((heads,), 1.5, device=device)
    gamma = torch.full((heads,), 1.01, device=device)
    return (lambda: ska(q, k, v, eta=eta, gamma=gamma, chunk_size=profile.bench_chunk,
                    backend="triton")), (q, k, v)


def _sdpa_bench(backend, seq_len: int, profile: Profile, device: torch.device):
    from torch.nn.attention import sdpa_kernel

    heads, width, dtype = profile.bench_heads, profile.bench_width, profile.bench_dtype
    q, k, v = (torch.randn(1, heads, seq_len, width, device=device, dtype=dtype).requires_grad_() for _ in range(3))

    def forward():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return forward, (q, k, v)


def _fla_bench(seq_len: int, profile: Profile, device: torch.device):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    heads, width, dtype = profile.bench_heads, profile.bench_width, profile.bench_dtype
    q, k, v = (torch.randn(1, seq_len, heads, width, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    g = F.logsigmoid(torch.randn(1, seq_len, heads, device=device, dtype=torch.float32)).requires_grad_()
    beta = torch.rand(1, seq_len, heads, device=device, dtype=dtype).sigmoid().requires_grad_()

    def forward():
        return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]
    return forward, (q, k, v, g, beta)


def _decode_bench(context: int, profile: Profile, device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, width, dtype, chunk = profile.bench_heads, profile.bench_width, profile.bench_dtype, profile.bench_chunk
    q, k, v = (torch.randn(1, context + chunk, heads, width, device=device, dtype=dtype) for _ in range(3))
    eta = torch.full((heads,), 1.5, device=device)
    gamma = torch.full((heads,), 1.01, device=device)
    t0 = time.perf_counter()
    _, state = ska_prefill(q[:, :context], k[:, :context], v[:, :context], eta=eta, gamma=gamma, chunk_size=chunk)
    synchronize(device)
    prefill_s = time.perf_counter() - t0

    def steps(backend: str):  # S consecutive steps: one readout recomputation among them, as in steady decoding
        s = state
        for t in range(context, context + chunk):
            _, s = ska_step(q[:, t], k[:, t], v[:, t], s, eta=eta, gamma=gamma, backend=backend)
    # "auto": the Triton step kernel on CUDA (one launch a token), the torch path on CPU
    step = time_ms(lambda: steps("auto"), device, budget_s=1.0, min_reps=profile.min_reps, max_reps=5)
    torch_step = (time_ms(lambda: steps("torch"), device, budget_s=1.0, min_reps=profile.min_reps, max_reps=5)
                  if device.type == "cuda" else step)
    kq, kk, kv = (x[:, :context].transpose(1, 2).contiguous() for x in (q, k, v))
    one = q[:, context:context + 1].transpose(1, 2).contiguous()

    def attend():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(one, kk, kv)
    sdpa = time_ms(attend, device, budget_s=0.5, min_reps=profile.min_reps)
    cache_bytes = 2 * kk.numel() * kk.element_size()
    return {"SKA step ms (mean of S steps)": step["ms"] / chunk,
            "SKA step ms, torch path": torch_step["ms"] / chunk, "SKA state KiB": state.nbytes / 1024,
            "SDPA flash step ms": sdpa["ms"], "KV cache KiB": cache_bytes / 1024,
            "SKA prefill s (torch path, incl. warm-up)": prefill_s}


# ----------------------------------------------------------------------------- section p: parallel compile
def prewarm_tasks(profile: Profile) -> list[str]:
    """Names of the items whose Triton launches are compiled ahead (see `run_prewarm_task`)."""
    tasks = [f"case:{d}:{i}" for d in range(len(profile.dtypes)) for i in range(len(profile.cases))]
    tasks += [f"extra:{i}" for i in range(len(profile.extra_fp32_cases))]
    tasks += [f"decode:{d}" for d in range(len(profile.dtypes))]
    tasks += ["bench:ska", "bench:ska_every_chunk", "bench:ska_two_stage", "bench:ska_wide", "layer"]
    return tasks + (["bench:fla"] if profile is GPU else [])


def run_prewarm_task(task: str, profile: Profile, device: torch.device) -> None:
    """Run one item's Triton calls exactly as its section does (same shapes, dtypes, strides: same
    specialisations), which compiles them into Triton's cache. `task` may list several, comma-separated."""
    if "," in task:
        for one in task.split(","):
            run_prewarm_task(one, profile, device)
        return
    kind, *index = task.split(":")
    if kind in ("case", "extra"):
        dtype, case = ((profile.dtypes[int(index[0])], profile.cases[int(index[1])]) if kind == "case" else
                       (torch.float32, profile.extra_fp32_cases[int(index[0])]))
        master = random_inputs(case, seed=0)
        forward_backward(master, case, "triton", dtype, device)
        if case.cu_seqlens is not None:
            _packed_vs_alone(master, case, dtype, device)
    elif kind == "decode":
        _compare_decode(profile, profile.dtypes[int(index[0])], device)
    elif kind == "layer":  # the layer's q, k, v are strided views: their own specialisations
        model_parallel(device)
        layer, config = build_layer(profile, device, layer_dtype(device))
        config.ska_backend = "triton"
        seq, batch = profile.layer_tokens
        hidden = torch.randn(seq, batch, config.hidden_size, device=device, dtype=layer_dtype(device))
        layer_output(layer, hidden.requires_grad_()).float().sum().backward()
    elif task in ("bench:ska", "bench:ska_every_chunk", "bench:ska_two_stage", "bench:ska_wide", "bench:fla"):
        make = dict(ska=_ska_bench, ska_every_chunk=_ska_every_chunk_bench, ska_two_stage=_ska_two_stage_bench,
                    ska_wide=_ska_wide_bench, fla=_fla_bench)[task.split(":")[1]]
        forward, _ = make(profile.bench_lengths[0], profile, device)
        forward().float().sum().backward()
    else:
        raise ValueError(f"unknown prewarm task {task!r}")
    synchronize(device)


def section_prewarm(report: Report, section: Section, profile: Profile, device: torch.device, argv: list[str]
                    ) -> None:
    from concurrent.futures import ThreadPoolExecutor

    tasks = prewarm_tasks(profile)
    if profile is not GPU:  # CPU: nothing to cache; one worker runs the profile's cpu_prewarm items
        tasks = [",".join(t for t in tasks if t in profile.cpu_prewarm)]
    section.notes.append(f"{len(tasks)} worker processes, {profile.prewarm_jobs} at a time; cache "
                         f"{os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')}")

    def work(task: str) -> dict:
        start = time.monotonic()
        budget = max(1.0, section.time_left())
        try:
            proc = subprocess.run([sys.executable, __file__, *argv, "--prewarm-task", task], capture_output=True,
                                  text=True, timeout=budget)
            result = dict(rc=proc.returncode)
            if proc.returncode:
                result["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        except subprocess.TimeoutExpired:
            result = dict(rc="timeout", error=f"not finished within the section limit ({budget:.0f} s)")
        return dict(task=task, wall_s=time.monotonic() - start, **result)

    with ThreadPoolExecutor(max_workers=profile.prewarm_jobs) as pool:
        results = pool.map(work, tasks)
        start = time.monotonic()
        for case in (*profile.cases, *profile.extra_fp32_cases):  # meanwhile, section a's references (host)
            if section.time_left() > 0:
                reference_result(case, 0)
        section.notes.append(f"the fp64 references of section a were computed meanwhile, on the host, in "
                             f"{time.monotonic() - start:.1f} s")
        for item in results:
            report.add(section, dict(table="Prewarm workers", **item))


# ----------------------------------------------------------------------------- main
def environment(device: torch.device, dry_run: bool) -> dict:
    import triton

    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                mode="dry run (CPU, Triton interpreter, tiny sizes)" if dry_run else "GPU",
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=triton.__version__)
    if device.type == "cuda":
        meta["cudnn"] = torch.backends.cudnn.version()
        try:
            meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip() or "?"
        except (OSError, subprocess.SubprocessError) as exc:
            meta["driver"] = f"nvidia-smi failed ({type(exc).__name__})"
    for name in ("megatron.core", "fla", "transformers"):
        try:
            module = __import__(name, fromlist=["__version__"])
            meta[name] = getattr(module, "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            meta[name] = f"not importable ({type(exc).__name__})"
    try:
        meta["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        timeout=10, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        meta["commit"] = "unknown"
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter")
    parser.add_argument("--quick", action="store_true", help="with --dry-run: DRY_QUICK (fp32, one case, one length)")
    parser.add_argument("--sections", default="pacbkd", help="which sections to run, in this order (default pacbkd)")
    parser.add_argument("--prewarm-task", help=argparse.SUPPRESS)  # internal: one worker of section p
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on CPU")
    if args.quick and not args.dry_run:
        parser.error("--quick is a dry-run profile: pass --dry-run too")
    if set(args.sections) - set("pabcdk"):
        parser.error(f"--sections takes letters from 'pabcdk', got {args.sections!r}")
    profile = (DRY_QUICK if args.quick else DRY) if args.dry_run else GPU
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if args.prewarm_task:
        run_prewarm_task(args.prewarm_task, profile, device)
        return 0
    report = Report(args.out, environment(device, args.dry_run))
    worker_argv = [flag for flag, given in (("--dry-run", args.dry_run), ("--quick", args.quick)) if given]
    bodies = {
        "p": ("Prewarm: parallel Triton compilation",
              lambda report, section, profile, device: section_prewarm(report, section, profile, device, worker_argv)),
        "a": ("Triton vs torch vs reference; packed sequences; decode", section_correctness),
        "c": ("Megatron SKA layer (local spec, TP = 1) forward/backward", section_layer),
        "d": ("CUDA graphs and host synchronisations", section_graphs_and_syncs),
        "b": ("Timings: SKA vs SDPA vs fla; decode; peak memory", section_timings),
        "k": ("Per-kernel profile of SKA fwd+bwd", section_kernel_profile),
    }
    for key in args.sections:
        title, body = bodies[key]
        run_section(report, key, title, profile.limits[key],
                    lambda section, body=body: body(report, section, profile, device))
        print(f"[gpu_check] section {key}: {report.sections[key].status} "
              f"({report.sections[key].elapsed_s:.1f} s)", flush=True)
    print((args.out / "gpu_check.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
