"""Slow, obvious reference for Spectral Koopman Attention (SPEC §2–3).

Loops over batch, head and chunk; builds every visible token set explicitly and sums its
statistics token by token. Nothing here is fast; everything here is meant to be read next to
the spec. Works in float64 when given float64 inputs, otherwise in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NORM_FLOOR = 1e-6
JITTER = 1e-4
MAX_JITTER_ROUNDS = 6


def ridge_and_jitter_scale(max_key_norm: Tensor, norm: str, eps: float) -> tuple[Tensor, Tensor]:
    """(λ, s) with s = m², m = max(1e-6, max ‖z‖): λ = eps·s (max norms) or eps (norm="none").

    The Cholesky jitter is 1e-4·s in every mode: it must follow the scale of G even when the
    ridge does not (unnormalised large keys with norm="none").
    """
    scale = max_key_norm.clamp_min(NORM_FLOOR) ** 2
    ridge = torch.full_like(scale, eps) if norm == "none" else eps * scale
    return ridge, scale


def _cholesky_with_jitter(g_ridge: Tensor, scale: Tensor) -> Tensor:
    """cholesky(G̃), retried with G̃ + 1e-4·s·I (then ×10 per round) while it fails, and at last
    with a further 1e-4·max_i G̃_ii; NaN if that fails too."""
    eye = torch.eye(g_ridge.shape[-1], dtype=g_ridge.dtype, device=g_ridge.device)
    jitters = [0.0] + [JITTER * 10.0**i * scale for i in range(MAX_JITTER_ROUNDS)]
    jitters.append(jitters[-1] + JITTER * g_ridge.diagonal().max())
    for jitter in jitters:
        try:
            return torch.linalg.cholesky(g_ridge + jitter * eye)
        except torch.linalg.LinAlgError:
            continue
    return torch.full_like(g_ridge, torch.nan)  # NaN/Inf statistics: NaN outputs, as in every backend


def spectral_norm_estimate(w: Tensor, power_iters: int) -> float:
    """Power iteration of SPEC §2 step 4 on one r×r matrix, without gradient. 0 if a norm vanishes."""
    w = w.detach()
    r = w.shape[-1]
    v = torch.full((r,), 1.0 / math.sqrt(r), dtype=w.dtype, device=w.device)
    for _ in range(power_iters):
        u = w @ v
        if torch.linalg.vector_norm(u) == 0:
            return 0.0
        u = u / torch.linalg.vector_norm(u)
        v = w.T @ u
        if torch.linalg.vector_norm(v) == 0:
            return 0.0
        v = v / torch.linalg.vector_norm(v)
    return float(torch.linalg.vector_norm(w @ v))


def readout_matrix(
    g: Tensor, m_lag: Tensor, c: Tensor, max_key_norm: Tensor, gamma: Tensor,
    *, power: int, eps: float, norm: str, power_iters: int,
) -> Tensor:
    """R = C L⁻ᵀ (a W)^K L⁻¹ for one head (SPEC §2). g, m_lag: [r, r]; c: [P, r] -> [P, r]."""
    r = g.shape[-1]
    ridge, scale = ridge_and_jitter_scale(max_key_norm, norm, eps)
    eye = torch.eye(r, dtype=g.dtype, device=g.device)
    g_ridge = 0.5 * (g + g.T) + ridge * eye
    chol = _cholesky_with_jitter(g_ridge, scale)
    chol_inv = torch.linalg.inv(chol)
    whitened = chol_inv @ m_lag @ chol_inv.T
    sigma = spectral_norm_estimate(whitened, power_iters)
    a = gamma / max(1.0, sigma)
    readout = c @ chol_inv.T
    for _ in range(power):
        readout = readout @ (a * whitened)
    return readout @ chol_inv


def _visible_readout(
    k: Tensor, v: Tensor, visible: list[int], norm_tokens: list[int], gamma: Tensor, **opts
) -> Tensor:
    """Readout matrix from the statistics of an explicit visible token list (sorted positions)."""
    r, p = k.shape[-1], v.shape[-1]
    g = k.new_zeros(r, r)
    m_lag = k.new_zeros(r, r)
    c = k.new_zeros(p, r)
    visible_set = set(visible)
    for t in visible:
        g = g + torch.outer(k[t], k[t])
        c = c + torch.outer(v[t], k[t])
        if t - 1 in visible_set:
            m_lag = m_lag + torch.outer(k[t], k[t - 1])
    norms = [torch.linalg.vector_norm(k[t]) for t in norm_tokens]
    max_key_norm = torch.stack(norms).max() if norms else k.new_zeros(())
    return readout_matrix(g, m_lag, c, max_key_norm, gamma, **opts)


def _one_sequence(
    q: Tensor, k: Tensor, v: Tensor, visible_mask: list[bool], eta: Tensor, gamma: Tensor,
    *, chunk_size: int, mode: str, norm: str, **opts,
) -> Tensor:
    """One (sequence, head): q, k: [T, r]; v: [T, P] -> y [T, P]."""
    seq_len = q.shape[0]
    opts = dict(opts, norm=norm)
    y = q.new_zeros(seq_len, v.shape[-1])
    all_tokens = list(range(seq_len))
    if mode == "prefix":
        visible = [t for t in all_tokens if visible_mask[t]]
        norm_tokens = all_tokens if norm == "sequence_max" else visible
        readout = _visible_readout(k, v, visible, norm_tokens, gamma, **opts)
        for t in all_tokens:
            y[t] = eta * (readout @ q[t])
        return y
    for start in range(0, seq_len, chunk_size):
        visible = [t for t in range(start) if visible_mask[t]]
        norm_tokens = all_tokens if norm == "sequence_max" else visible
        readout = _visible_readout(k, v, visible, norm_tokens, gamma, **opts)
        for t in range(start, min(start + chunk_size, seq_len)):
            y[t] = eta * (readout @ q[t])
    return y


def ska_reference(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *,
    chunk_size: int = 64, power: int = 2, eps: float = 1e-3, norm: str = "causal_max",
    mode: str = "chunk_causal", mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
    power_iters: int = 6,
) -> Tensor:
    """Reference SKA. q, k: [B, T, H, r]; v: [B, T, H, P]; eta, gamma: [H] -> y [B, T, H, P].

    Inputs are assumed validated (see `echo_megatron.ops.ska`). A token with mask 0 adds
    nothing to any statistic (a lag pair needs both ends visible) but still gets an output.
    With "sequence_max" m is taken over every token of the sequence, mask or not.
    """
    out_dtype = q.dtype
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(work), k.to(work), v.to(work)
    eta, gamma = eta.to(work), gamma.to(work)
    batch, seq_len, heads, _ = q.shape
    if cu_seqlens is None:
        segments = [(b, 0, seq_len) for b in range(batch)]
    else:
        bounds = cu_seqlens.tolist()
        segments = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
    opts = dict(chunk_size=chunk_size, power=power, eps=eps, norm=norm, mode=mode,
                power_iters=power_iters)
    y = q.new_zeros(batch, seq_len, heads, v.shape[-1])
    for b, start, end in segments:
        visible = [True] * (end - start) if mask is None else [bool(w) for w in mask[b, start:end]]
        for h in range(heads):
            y[b, start:end, h] = _one_sequence(
                q[b, start:end, h], k[b, start:end, h], v[b, start:end, h], visible,
                eta[h], gamma[h], **opts)
    return y.to(out_dtype)
