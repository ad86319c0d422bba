"""Compiled or interpreted: one set of Triton kernels for CUDA and CPU tensors.

`triton.jit` decides when a function is decorated whether it is compiled (`JITFunction`) or run by the
Triton interpreter (`InterpretedFunction`, under TRITON_INTERPRET=1); that is why the interpreter is
normally switched on before triton is imported. Instead of asking users to do that, this module:

* loads the kernel sources (`kernels.py`, `dense.py`, then `step.py`, executed in one namespace so that the dense
  kernels use the token kernels' helpers) as a private module per mode (`kernels_for`): compiled for
  CUDA tensors, and for CPU tensors a second copy of the same sources decorated with TRITON_INTERPRET
  set only for the duration of that import (`triton.knobs.runtime.scope()`);
* runs interpreted launches (`launch`) with triton.language's own @jit helpers (`tl.sum`, `tl.max`,
  `tl.zeros`, …) temporarily exposed as interpreted functions — those were decorated when triton was
  imported, compiled unless TRITON_INTERPRET=1 was already set (then there is nothing to swap).

So `backend="triton"` works on CPU tensors in any process, in any import order, and CPU and CUDA calls
can alternate; other Triton users in the process (mamba_ssm, Megatron) are unaffected. The interpreter
computes bf16 `tl.dot` wrongly: use fp16/fp32/fp64 on CPU.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_SOURCES = tuple(Path(__file__).with_name(name) for name in ("kernels.py", "dense.py", "step.py"))


@lru_cache(maxsize=None)
def _load(interpret: bool) -> ModuleType:
    name = f"{__package__}._kernels_{'interpreted' if interpret else 'compiled'}"
    module = ModuleType(name)
    module.__file__ = str(_SOURCES[0])
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        sys.modules[name] = module
        for source in _SOURCES:  # compiled with their own file names: Triton reads each kernel's source back
            exec(compile(source.read_text(), str(source), "exec"), module.__dict__)
    return module


def interpreted(device: torch.device) -> bool:
    """Whether kernels for tensors on `device` run under the Triton interpreter."""
    return device.type != "cuda" or bool(triton.knobs.runtime.interpret)


def kernels_for(device: torch.device) -> ModuleType:
    """The kernels module for tensors on `device`: compiled for CUDA, interpreted otherwise."""
    return _load(interpreted(device))


@lru_cache(maxsize=None)
def _as_interpreted(function: JITFunction) -> InterpretedFunction:
    return InterpretedFunction(function.fn)


# what the interpreter patches while it runs (nested calls of interpreted helpers never undo theirs)
_LANGUAGE_OBJECTS = (tl, tl.core, tl.math, tl.standard, tl.core.tensor, tl.core.dtype, tl.core.tensor_descriptor_base)


@contextmanager
def _interpreted_language() -> Iterator[None]:
    """Run with triton.language's compiled @jit helpers replaced by interpreted twins; on exit restore
    every attribute of triton.language that changed, so compiled kernels built later are unaffected.
    (Names the interpreter adds to a module's globals stay: its cached rewritten functions use them.)"""
    saved = [(obj, dict(vars(obj))) for obj in _LANGUAGE_OBJECTS]
    try:
        for name, member in vars(tl).copy().items():
            if isinstance(member, JITFunction):
                setattr(tl, name, _as_interpreted(member))
        yield
    finally:
        for obj, attrs in saved:
            for name, value in attrs.items():
                if vars(obj).get(name) is not value:
                    setattr(obj, name, value)


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch (see `recording`)."""

    name: str
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


_recorders: list[tuple[list[Launch], bool]] = []


@contextmanager
def recording(run: bool = True) -> Iterator[list[Launch]]:
    """Collect every launch made inside the block, e.g. to compile them ahead of time. With run=False the
    kernels do not run (their outputs keep whatever the allocation held): enough to learn which
    specialisations a call launches, at no interpreter cost."""
    launches: list[Launch] = []
    _recorders.append((launches, run))
    try:
        yield launches
    finally:
        _recorders.remove((launches, run))


def launches_run() -> bool:
    """False inside `recording(run=False)`: launches are only recorded (e.g. to be compiled for a GPU)."""
    return all(run for _, run in _recorders)


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), skipped for an empty grid; interpreted kernels see an interpretable tl."""
    if not all(g > 0 for g in grid):
        return
    for launches, _ in _recorders:
        launches.append(Launch(kernel.__name__, grid, args, kwargs))
    if not launches_run():
        return
    if isinstance(kernel, InterpretedFunction):
        with _interpreted_language():
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
