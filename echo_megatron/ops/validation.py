"""Argument checks shared by every SKA entry point and backend: errors name the parameter and what is allowed.

Two tiers. The default checks read only shapes, dtypes, devices and Python scalars: no host sync, so
`ska()` can run inside a CUDA graph. `validate=True` adds the data-dependent checks (finite q/k/v,
0/1 mask values, well-formed cu_seqlens), each a device-to-host read.

Semantics shared by every backend (reference, torch, triton):
* dtype: q, k, v are promoted to their common dtype (`torch.promote_types`), never downcast; the output
  has that dtype; statistics run in fp32 (fp64 for fp64). eta and gamma are cast to that work dtype.
* device: every tensor argument must be on q's device (a clear error, not a failure inside a kernel).
* non-finite input: NaN/Inf in q, k or v gives NaN in every output that reads it (the statistics of the
  chunks after it, its own output for q); no error, because detecting it needs a host sync. Note that the
  fast paths apply a mask by multiplying, so NaN in a *masked* token still reaches them (the reference skips
  it); `validate=True` rejects non-finite q, k, v anywhere, masked or not.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

MODES = ("chunk_causal", "prefix")
NORMS = ("causal_max", "sequence_max", "none")
DECODE_NORMS = ("causal_max", "none")
BACKENDS = ("auto", "torch", "reference", "triton")
DECODE_BACKENDS = ("auto", "torch", "triton")
MAX_POWER = 8  # K: the Triton kernels unroll the filter power (forward and backward)
MAX_POWER_ITERS = 32  # the Triton forward unrolls the power iteration

_warned_sequence_max = False


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> None:
    _check_choice("backend", backend, allowed)


def _check_float_tensor(name: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")


def check_options(*, chunk_size: int, power: int, eps: float, norm: str, power_iters: int,
                  norms: tuple[str, ...] = NORMS) -> None:
    """Validate the scalar options of the operator."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if isinstance(power, bool) or not isinstance(power, int) or not 0 <= power <= MAX_POWER:
        raise ValueError(f"power must be an int in [0, {MAX_POWER}], got {power!r}")
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or not 0 <= power_iters <= MAX_POWER_ITERS:
        raise ValueError(f"power_iters must be an int in [0, {MAX_POWER_ITERS}], got {power_iters!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    _check_choice("norm", norm, norms)


def check_heads(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *, token_axes: int) -> None:
    """q, k: [..., H, r]; v: [..., H, P] with `token_axes` leading axes; eta, gamma: [H]."""
    for name, x in (("q", q), ("k", k), ("v", v), ("eta", eta), ("gamma", gamma)):
        _check_float_tensor(name, x)
    rank = token_axes + 2
    layout = "[B, T, H, r]" if token_axes == 2 else "[B, H, r]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != rank:
            raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {tuple(x.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape {layout}, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must have shape {tuple(q.shape[:-1]) + ('P',)} to match q, got {tuple(v.shape)}")
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"head widths must be >= 1, got r={q.shape[-1]} and P={v.shape[-1]}")
    heads = q.shape[-2]
    for name, x in (("eta", eta), ("gamma", gamma)):
        if x.shape != (heads,):
            raise ValueError(f"{name} must have shape [H] = ({heads},), got {tuple(x.shape)}")
    check_devices(q, k=k, v=v, eta=eta, gamma=gamma)


def check_devices(q: Tensor, **tensors: Tensor | None) -> None:
    """Every given tensor must be on q's device."""
    for name, x in tensors.items():
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}: all SKA inputs must be on one device")


def promote(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v cast to their common dtype (an fp64 k with fp32 q computes in fp64; nothing is downcast)."""
    if q.dtype == k.dtype == v.dtype:  # the common case, without the two (dispatched) promote_types calls
        return q, k, v
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check_finite(**tensors: Tensor) -> None:
    """validate=True only (a host sync per tensor): NaN/Inf raise instead of propagating."""
    for name, x in tensors.items():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf (found by validate=True; without it they give NaN outputs)")


def check_sequence_inputs(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *, chunk_size: int, power: int,
    eps: float, norm: str, mode: str, mask: Tensor | None, cu_seqlens: Tensor | None,
    power_iters: int, backend: str, validate: bool = False,
) -> None:
    """Validate the arguments of `ska` (see its docstring for the shapes); `validate` adds the
    data-dependent checks (host syncs)."""
    check_heads(q, k, v, eta, gamma, token_axes=2)
    check_options(chunk_size=chunk_size, power=power, eps=eps, norm=norm, power_iters=power_iters)
    _check_choice("mode", mode, MODES)
    _check_choice("backend", backend, BACKENDS)
    batch, seq_len = q.shape[:2]
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.shape != (batch, seq_len):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a tensor of shape [B, T] = ({batch}, {seq_len}), got {shape}")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, batch)
    check_devices(q, mask=mask, cu_seqlens=cu_seqlens)
    if not isinstance(validate, bool):
        raise ValueError(f"validate must be a bool, got {validate!r}")
    if validate:
        check_finite(q=q, k=k, v=v)
        if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must contain only 0/1 (or False/True) values")
        if cu_seqlens is not None:
            _check_cu_seqlens_values(cu_seqlens, seq_len)
    if norm == "sequence_max" and mode == "chunk_causal":
        _warn_sequence_max()


def _check_cu_seqlens(cu_seqlens: Tensor, batch: int) -> None:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N+1] with N >= 1 sequences")
    if cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens (packed sequences) requires batch size B == 1, got B = {batch}")


def _check_cu_seqlens_values(cu_seqlens: Tensor, seq_len: int) -> None:
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if bounds[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at T = {seq_len}, got {bounds[-1]}")


def _warn_sequence_max() -> None:
    global _warned_sequence_max
    if not _warned_sequence_max:
        _warned_sequence_max = True
        warnings.warn(
            'norm="sequence_max" with mode="chunk_causal" takes the key-norm maximum over the whole '
            "sequence, so every output depends on future tokens (non-causal; paper-faithful only). "
            'Use norm="causal_max" for language-model training.',
            UserWarning,
            stacklevel=4,
        )
