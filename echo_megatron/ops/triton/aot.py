"""Ahead-of-time compilation of the SKA kernels for an NVIDIA GPU, on a machine without one.

Triton ships `ptxas` and `cuobjdump`, so the exact specialisations a call launches (recorded while it
runs under the interpreter, `runtime.recording`) can be compiled for sm_90 (H100) here, proving that
the compiled path builds and reporting what decides its speed: registers per thread, spilled bytes
(STACK/LOCAL) and shared memory per program.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

from .runtime import Launch, _load

_LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass(frozen=True)
class KernelResources:
    """Resource usage of one compiled specialisation."""

    name: str
    constexprs: str  # the compile-time constants that distinguish it
    num_warps: int
    registers: int  # per thread
    spill_bytes: int  # stack + local memory per thread
    shared_bytes: int  # dynamic shared memory per program


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


def compile_launches(launches: list[Launch], arch: int = 90, fp16_as: str = "fp16") -> list[KernelResources]:
    """Compile each distinct recorded specialisation for sm_<arch>; returns their resource usage.

    fp16_as="bf16" compiles fp16 pointers as bf16: the interpreter cannot run bf16 (`ska_triton` widens it
    to fp32 there), so bf16 launches are recorded with fp16 data, which takes the same code path."""
    kernels = _load(interpret=False)
    target = GPUTarget("cuda", arch, 32)
    seen: dict[tuple, KernelResources] = {}
    for rec in launches:
        fn = getattr(kernels, rec.name)
        values = dict(zip(fn.arg_names, rec.args))
        constexprs = {k: v for k, v in rec.kwargs.items() if k not in _LAUNCH_OPTIONS}
        # like the JIT launcher: an int argument equal to 1 is compiled as a constant
        constexprs.update({k: 1 for k, v in values.items() if type(v) is int and v == 1})
        signature = {name: "constexpr" if name in constexprs else mangle_type(values[name]).replace("fp16", fp16_as)
                     for name in fn.arg_names}
        num_warps = rec.kwargs.get("num_warps", 4)
        key = (rec.name, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))), num_warps)
        if key in seen:
            continue
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target,
                                  options=dict(num_warps=num_warps))
        usage = _resource_usage(compiled.asm["cubin"])
        hidden = ("ACC", "DOT_PRECISION", *_LAUNCH_OPTIONS)
        shown = ", ".join(f"{k}={v}" for k, v in rec.kwargs.items() if k not in hidden)
        seen[key] = KernelResources(rec.name, shown, num_warps, usage["REG"], usage["STACK"] + usage["LOCAL"],
                                    compiled.metadata.shared)
    return list(seen.values())
