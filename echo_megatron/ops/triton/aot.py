"""Ahead-of-time compilation of the SKA kernels for an NVIDIA GPU, on a machine without one.

Triton ships `ptxas` and `cuobjdump`, so the exact specialisations a call launches (recorded while it
runs under the interpreter, `runtime.recording`) can be compiled for sm_90 (H100) here, proving that
the compiled path builds and reporting what decides its speed: registers per thread, spilled bytes
(ptxas's own "spill stores", summed over the kernel and the functions it calls), stack frame (spills
plus the call frames of `noinline` functions) and shared memory per program.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

from .runtime import Launch, _load, recording

_LAUNCH_OPTIONS = ("num_warps", "num_stages")
# sm_90 (H100/H200) per-SM limits, from NVIDIA's CUDA occupancy tables
SM90_REGISTERS = 65536
SM90_SHARED_BYTES = 228 * 1024  # per SM; at most 227 KiB of it for one program
SM90_SHARED_RESERVED = 1024  # bytes the driver reserves per resident program
SM90_MAX_WARPS = 64
SM90_MAX_PROGRAMS = 32


@dataclass(frozen=True)
class KernelResources:
    """Resource usage of one compiled specialisation."""

    name: str
    constexprs: str  # the compile-time constants that distinguish it
    num_warps: int
    registers: int  # per thread
    spill_bytes: int  # bytes per thread ptxas spills (spill stores of the kernel and its callees)
    shared_bytes: int  # dynamic shared memory per program
    stack_bytes: int = 0  # stack frame per thread: spills and the call frames of noinline functions

    @property
    def programs_per_sm(self) -> int:
        """Programs that fit on one sm_90 SM at once (registers allocated per warp in units of 256, shared
        memory plus the per-program reservation, warp and program limits): the occupancy calculator's rule."""
        registers_per_warp = -(-self.registers * 32 // 256) * 256
        by_registers = SM90_REGISTERS // (registers_per_warp * self.num_warps)
        by_shared = SM90_SHARED_BYTES // (self.shared_bytes + SM90_SHARED_RESERVED)
        return min(by_registers, by_shared, SM90_MAX_WARPS // self.num_warps, SM90_MAX_PROGRAMS)


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_cuobjdump()), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, usage.groups())))


def _compile(fn, signature: dict, constexprs: dict, arch: int, options: dict) -> tuple[object, int]:
    """triton.compile in a fresh cache, so that ptxas runs and its log (-v) can be read: (kernel, spilled
    bytes per thread)."""
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache, triton.knobs.cache.scope(), triton.knobs.nvidia.scope(), \
            contextlib.redirect_stdout(log):
        triton.knobs.cache.dir = cache
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log.getvalue())]
    if not spills:
        raise RuntimeError(f"no ptxas report for {fn.__name__}:\n{log.getvalue()}")
    return compiled, sum(spills)


# resources of every specialisation compiled in this process, by (arch, specialisation): shapes whose padded
# tiles agree (r = 48 and 64) compile once
_COMPILED: dict[tuple, KernelResources] = {}


def compile_launches(launches: list[Launch], arch: int = 90, fp16_as: str = "fp16") -> list[KernelResources]:
    """Compile each distinct recorded specialisation for sm_<arch>; returns their resource usage.

    fp16_as="bf16" compiles fp16 pointers as bf16: the interpreter cannot run bf16 (`ska_triton` widens it
    to fp32 there), so bf16 launches are recorded with fp16 data, which takes the same code path."""
    kernels = _load(interpret=False)
    seen: dict[tuple, KernelResources] = {}
    for rec in launches:
        fn = getattr(kernels, rec.name)
        values = dict(zip(fn.arg_names, rec.args))
        constexprs = {k: v for k, v in rec.kwargs.items() if k not in _LAUNCH_OPTIONS}
        # like the JIT launcher: an int argument equal to 1 is compiled as a constant, unless do_not_specialize
        constexprs.update({k: 1 for k, v in values.items()
                           if type(v) is int and v == 1 and k not in fn.do_not_specialize})
        signature = {name: "constexpr" if name in constexprs else mangle_type(values[name]).replace("fp16", fp16_as)
                     for name in fn.arg_names}
        options = {name: rec.kwargs[name] for name in _LAUNCH_OPTIONS if name in rec.kwargs}
        num_warps = options.setdefault("num_warps", 4)
        key = (rec.name, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        if (arch, key) not in _COMPILED:
            compiled, spilled = _compile(fn, signature, constexprs, arch, options)
            usage = _resource_usage(compiled.asm["cubin"])
            hidden = ("ACC", "DOT_PRECISION", *_LAUNCH_OPTIONS)
            shown = ", ".join(f"{k}={v}" for k, v in rec.kwargs.items() if k not in hidden)
            _COMPILED[arch, key] = KernelResources(rec.name, shown, num_warps, usage["REG"], spilled,
                                                   compiled.metadata.shared, usage["STACK"] + usage["LOCAL"])
        seen[key] = _COMPILED[arch, key]
    return list(seen.values())


# (r, P) of the report: the matched configuration r = P at 32, 64 and 128 (an 8B model's width) and the
# paper's 180M configuration r = 48, P = 64
REPORT_SHAPES = ((32, 32), (48, 64), (64, 64), (128, 128))


def sm90_report(shapes: tuple[tuple[int, int], ...] = REPORT_SHAPES, chunk: int = 64, power: int = 2,
                decode: bool = False) -> list[tuple[int, int, KernelResources]]:
    """(r, P, resources) of every kernel a bf16 forward+backward of `ska()` launches (S = chunk, K = power) in
    chunk_causal mode and in prefix mode (whose slots are sequences: R, then a chunk-parallel readout), and of
    the separate statistics and scan stages that context parallelism runs (`context_parallel.py`: chunk rows
    joined across ranks), compiled for sm_90; with `decode`, of decoding instead (two heads): `ska_step`'s kernel and
    `ska_step_slots`' kernel with its recompute of the listed chunk completions (the dense forward, listed).
    The launches are recorded without running them (bf16 is recorded as fp16, see `compile_launches`)."""
    import torch

    from .. import StateSlots, ska, ska_prefill, ska_step, ska_step_slots
    from .function import NORM_KEYS, ChunkStatistics, ChunkTable, SegmentScan

    rows = []
    for rank, value_dim in shapes:
        heads = 2 if decode else 1  # decode: two heads, or B·H would be a compile-time 1
        q, k = (torch.zeros(1, 2 * chunk, heads, rank, dtype=torch.float16, requires_grad=True) for _ in range(2))
        v = torch.zeros(1, 2 * chunk, heads, value_dim, dtype=torch.float16, requires_grad=True)
        eta, gamma = torch.ones(heads, requires_grad=True), torch.ones(heads, requires_grad=True)
        with recording(run=False) as launches:
            if decode:
                q, k, v, eta, gamma = (x.detach() for x in (q, k, v, eta, gamma))
                _, state = ska_prefill(q[:, :1], k[:, :1], v[:, :1], eta=eta, gamma=gamma, chunk_size=chunk,
                                       power=power)
                ska_step(q[:, 1], k[:, 1], v[:, 1], state, eta=eta, gamma=gamma, backend="triton")
                slots = StateSlots(3, heads, rank, value_dim, state.options, torch.float32, q.device)
                ska_step_slots(q[0, :2], k[0, :2], v[0, :2], slots, torch.tensor([2, 0]), eta=eta, gamma=gamma,
                               backend="triton")
            else:
                for mode in ("chunk_causal", "prefix"):
                    y = ska(q, k, v, eta=eta, gamma=gamma, chunk_size=chunk, power=power, mode=mode, backend="triton")
                    y.float().sum().backward()
                table = ChunkTable.build(2 * chunk, chunk, None, q.device)
                chunk_rows, chunk_max = ChunkStatistics.apply(k, v, None, table, NORM_KEYS["causal_max"])
                for total in (True, False):  # context parallelism: the local totals, then the visible statistics
                    sums, maxima = SegmentScan.apply(chunk_rows, chunk_max, table, total, total)
                    (sums.sum() + maxima.sum()).backward(retain_graph=True)
        rows += [(rank, value_dim, res) for res in compile_launches(launches, arch=90, fp16_as="bf16")]
    return rows
