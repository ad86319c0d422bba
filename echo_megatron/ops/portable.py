"""The SKA entry points of a model that runs without this package: torch only, chunk_causal, no Triton, no CP.

Same names and keyword signatures as `echo_megatron.ops` (`ska`, `ska_prefill`, `ska_step`, `SKAState`), so
the transformers model can call either. `echo_megatron.hf.remote_code` copies these definitions, and the
definitions of ops/ they reach, into the `modeling_echo_hybrid.py` of every exported `echo_hybrid` directory;
that file switches to `echo_megatron.ops` when the package is importable.
"""

from __future__ import annotations

from torch import Tensor

from .chunked import causal_in_blocks, work_dtype
from .decode import SKAState, prefill, step

PORTABLE_BACKENDS = ("auto", "torch")

ska_prefill = prefill
ska_step = step


def ska(q: Tensor, k: Tensor, v: Tensor, *, eta: Tensor, gamma: Tensor, chunk_size: int = 64, power: int = 2,
        eps: float = 1e-3, norm: str = "causal_max", power_iters: int = 6, backend: str = "auto") -> Tensor:
    """chunk_causal SKA on the vectorised PyTorch path: q, k [B, T, H, r]; v [B, T, H, P]; eta, gamma [H]
    -> y [B, T, H, P] in q's dtype (statistics in fp32, fp64 for fp64). norm: "causal_max" or "none"."""
    if backend not in PORTABLE_BACKENDS:
        raise ValueError(f"ska_backend must be one of {PORTABLE_BACKENDS} when echo_megatron is not installed "
                         f"(its kernels provide the others), got {backend!r}")
    work = work_dtype(q.dtype)
    y, _ = causal_in_blocks(q.to(work), k.to(work), v.to(work), eta.to(work), gamma.to(work), chunk_size=chunk_size,
                            mask=None, seq_max=None, keep_statistics=False, power=power, eps=eps, norm=norm,
                            power_iters=power_iters)
    return y.to(q.dtype)


__all__ = ["SKAState", "ska", "ska_prefill", "ska_step", "PORTABLE_BACKENDS"]
