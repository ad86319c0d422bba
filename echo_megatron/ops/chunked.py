"""Vectorised PyTorch SKA (SPEC §2–3): the CPU path and the reference for the Triton kernels.

Pipeline, all batched over (batch, head, chunk):
  chunk layout → per-chunk statistics (G_j, M_j, C_j, m_j) → visible statistics (exclusive prefix
  over chunks for chunk_causal, per-sequence totals for prefix) → readout matrices R (dense r×r
  algebra) → Y_c = η R_c Q_c.
Memory is O(B·H·(T·(r+P) + NC·(r²+P·r))): no T×T and no per-token r×r buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import JITTER, MAX_JITTER_ROUNDS, ridge_and_jitter_scale


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and solves run in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class ChunkLayout:
    """Where each token sits in the padded chunk grid [NC, S] of one batch row.

    Every sequence (a batch row, or a `cu_seqlens` segment of a packed row) starts its own
    chunk grid; `segments` lists the chunk range [c0, c1) of each sequence.
    """

    seq_len: int
    chunk_size: int
    num_chunks: int
    segments: tuple[tuple[int, int], ...]
    seq_starts: Tensor | None  # [N] first token of each packed sequence (None: one sequence per row)
    token_slot: Tensor | None  # [T] slot (chunk·S + offset) of each token; None: slot == token
    chunk_segment: Tensor  # [NC] sequence index of each chunk

    @staticmethod
    def build(seq_len: int, chunk_size: int, cu_seqlens: Tensor | None, device: torch.device) -> "ChunkLayout":
        if cu_seqlens is None:
            num_chunks = math.ceil(seq_len / chunk_size)
            return ChunkLayout(seq_len, chunk_size, num_chunks, ((0, num_chunks),), None, None,
                               torch.zeros(num_chunks, dtype=torch.long, device=device))
        bounds = cu_seqlens.to(device=device, dtype=torch.long)
        lengths = bounds[1:] - bounds[:-1]
        chunks_per_seq = torch.div(lengths + chunk_size - 1, chunk_size, rounding_mode="floor")
        chunk_offsets = F.pad(chunks_per_seq.cumsum(0), (1, 0))
        offsets = chunk_offsets.tolist()
        num_chunks = offsets[-1]
        token_seq = torch.searchsorted(bounds[1:], torch.arange(seq_len, device=device), right=True)
        token_slot = chunk_offsets[token_seq] * chunk_size + torch.arange(seq_len, device=device) - bounds[token_seq]
        chunk_segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), chunks_per_seq)
        segments = tuple((a, b) for a, b in zip(offsets[:-1], offsets[1:]))
        return ChunkLayout(seq_len, chunk_size, num_chunks, segments, bounds[:-1], token_slot, chunk_segment)

    def to_chunks(self, x: Tensor) -> Tensor:
        """[B, T, H, d] -> [B, NC, S, H, d], zero-padded."""
        batch, _, heads, width = x.shape
        slots = self.num_chunks * self.chunk_size
        if self.token_slot is None:
            grid = F.pad(x, (0, 0, 0, 0, 0, slots - self.seq_len))
        else:
            grid = x.new_zeros(batch, slots, heads, width).index_copy(1, self.token_slot, x)
        return grid.view(batch, self.num_chunks, self.chunk_size, heads, width)

    def from_chunks(self, grid: Tensor) -> Tensor:
        """[B, NC, S, H, d] -> [B, T, H, d]."""
        flat = grid.flatten(1, 2)
        if self.token_slot is None:
            return flat[:, : self.seq_len]
        return flat.index_select(1, self.token_slot)

    def previous_keys(self, k: Tensor) -> Tensor:
        """z_{t-1} for every token t, zero at each sequence start: [B, T, H, r]."""
        prev = F.pad(k, (0, 0, 0, 0, 1, 0))[:, :-1]
        if self.seq_starts is not None:
            prev = prev.index_fill(1, self.seq_starts, 0.0)
        return prev


class Statistics(NamedTuple):
    """Sums of SPEC §2 over token sets; leading dims [B, H, N] (N chunks or sequences)."""

    gram: Tensor  # G [..., r, r]
    lag: Tensor  # M [..., r, r]
    cross: Tensor  # C [..., P, r]
    max_norm: Tensor  # max ‖z‖ [...]


def chunk_statistics(k: Tensor, v: Tensor, layout: ChunkLayout, mask: Tensor | None) -> Statistics:
    """Per-chunk statistics of the visible tokens. k: [B, T, H, r]; v: [B, T, H, P] (work dtype).

    The lag pair (z_t, z_{t-1}) belongs to the chunk of t, so chunk j's M joins it to chunk j-1.
    A masked token contributes nothing (its pairs included).
    """
    if mask is not None:
        weight = mask.to(k.dtype)[:, :, None, None]
        k, v = k * weight, v * weight
    keys = layout.to_chunks(k)
    prev = layout.to_chunks(layout.previous_keys(k))
    values = layout.to_chunks(v)
    gram = torch.einsum("bcshi,bcshj->bhcij", keys, keys)
    lag = torch.einsum("bcshi,bcshj->bhcij", keys, prev)
    cross = torch.einsum("bcshp,bcshj->bhcpj", values, keys)
    max_norm = torch.linalg.vector_norm(keys, dim=-1).amax(dim=2).transpose(1, 2)
    return Statistics(gram, lag, cross, max_norm)


class InitialStatistics(NamedTuple):
    """What precedes each sequence of a layout (context parallelism: segments held by other ranks).

    totals: statistics of every earlier token, leading dims [B, H, N] (N sequences of the layout);
    join_lag: the lag pair z_first z_prevᵀ joining each sequence to the token before it [B, H, N, r, r]
    (zero where there is none); it belongs to the sequence's chunk 0, like a pair at a chunk boundary.
    """

    totals: Statistics
    join_lag: Tensor


def _exclusive_prefix(stats: Statistics, layout: ChunkLayout, initial: InitialStatistics | None = None) -> Statistics:
    """Statistics of all earlier chunks of the same sequence, per chunk: [B, H, NC, ...].

    With `initial`, sequence n also sees `initial.totals[:, :, n]`, and its chunk 0 holds `initial.join_lag`.
    """

    def shift(x: Tensor) -> Tensor:  # inclusive scan -> exclusive scan, along dim 2
        return torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], dim=2)

    pieces: list[list[Tensor]] = [[], [], [], []]
    for n, (c0, c1) in enumerate(layout.segments):
        sums = [x[:, :, c0:c1] for x in stats[:3]]
        if initial is not None:
            sums[1] = torch.cat([sums[1][:, :, :1] + initial.join_lag[:, :, n, None], sums[1][:, :, 1:]], dim=2)
        for i, x in enumerate(sums):
            before = shift(x.cumsum(dim=2))
            pieces[i].append(before if initial is None else before + initial.totals[i][:, :, n, None])
        before = shift(stats.max_norm[:, :, c0:c1].cummax(dim=2).values)
        pieces[3].append(before if initial is None else torch.maximum(before, initial.totals.max_norm[:, :, n, None]))
    return Statistics(*(torch.cat(p, dim=2) for p in pieces))


def _per_sequence(x: Tensor, layout: ChunkLayout, reduce: str) -> Tensor:
    """Reduce [B, H, NC, ...] over the chunks of each sequence ("sum" or "amax") -> [B, H, N, ...].

    An empty sequence reduces to zeros.
    """
    empty = x.new_zeros(x.shape[:2] + x.shape[3:])
    return torch.stack([getattr(x[:, :, c0:c1], reduce)(dim=2) if c1 > c0 else empty
                        for c0, c1 in layout.segments], dim=2)


def _sequence_totals(stats: Statistics, layout: ChunkLayout) -> Statistics:
    """Statistics of each whole sequence: [B, H, N, ...]."""
    return Statistics(*(_per_sequence(x, layout, "sum") for x in stats[:3]),
                      _per_sequence(stats.max_norm, layout, "amax"))


def _sequence_max_norm(k: Tensor, layout: ChunkLayout) -> Tensor:
    """max ‖z_t‖ over every token (masked or not) of each sequence: [B, H, N]."""
    per_chunk = torch.linalg.vector_norm(layout.to_chunks(k), dim=-1).amax(dim=2).transpose(1, 2)
    return _per_sequence(per_chunk, layout, "amax")


def cholesky_with_jitter(g_ridge: Tensor, scale: Tensor) -> Tensor:
    """Batched cholesky(G̃); a matrix where it fails is retried alone with G̃ + 1e-4·s·I (×10 per round),
    and as a last resort with a further 1e-4·max_i G̃_ii (rounding in G at a scale far above m²)."""
    chol, info = torch.linalg.cholesky_ex(g_ridge)
    eye = torch.eye(g_ridge.shape[-1], dtype=g_ridge.dtype, device=g_ridge.device)
    added = torch.zeros_like(scale)
    jitter = JITTER
    for _ in range(MAX_JITTER_ROUNDS):
        failed = info > 0
        if not bool(failed.any()):
            return chol
        added = torch.where(failed, jitter * scale, added)
        chol, info = torch.linalg.cholesky_ex(g_ridge + added[..., None, None] * eye)
        jitter *= 10.0
    failed = info > 0
    if bool(failed.any()):
        largest = g_ridge.diagonal(dim1=-2, dim2=-1).amax(dim=-1)
        added = torch.where(failed, added + JITTER * largest, added)
        chol, info = torch.linalg.cholesky_ex(g_ridge + added[..., None, None] * eye)
    if bool((info > 0).any()):
        raise torch.linalg.LinAlgError("SKA: G̃ is not positive definite even with jitter")
    return chol


@torch.no_grad()
def spectral_norm_estimate(whitened: Tensor, power_iters: int) -> Tensor:
    """Batched power iteration of SPEC §2 step 4 (no gradient): [..., r, r] -> σ [...]."""
    r = whitened.shape[-1]
    vec = torch.full(whitened.shape[:-1], 1.0 / math.sqrt(r), dtype=whitened.dtype, device=whitened.device)

    def normalised(x: Tensor) -> Tensor:
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return torch.where(n > 0, x / torch.where(n > 0, n, 1.0), 0.0)

    for _ in range(power_iters):
        u = normalised((whitened @ vec[..., None])[..., 0])
        vec = normalised((whitened.mT @ u[..., None])[..., 0])
    return torch.linalg.vector_norm((whitened @ vec[..., None])[..., 0], dim=-1)


def readout_matrices(
    stats: Statistics, gamma: Tensor, *, power: int, eps: float, norm: str, power_iters: int
) -> Tensor:
    """R = a^K · C L⁻ᵀ W^K L⁻¹ with W = L⁻¹ M L⁻ᵀ, LLᵀ = sym(G) + λI (SPEC §2).

    stats: leading dims [...]; gamma broadcastable to [...]. Returns R [..., P, r].
    """
    gram = stats.gram
    r = gram.shape[-1]
    ridge, scale = ridge_and_jitter_scale(stats.max_norm, norm, eps)
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    g_ridge = 0.5 * (gram + gram.mT) + ridge[..., None, None] * eye
    chol = cholesky_with_jitter(g_ridge, scale)
    half = torch.linalg.solve_triangular(chol, stats.lag, upper=False)  # L⁻¹ M
    whitened = torch.linalg.solve_triangular(chol, half.mT, upper=False).mT  # L⁻¹ M L⁻ᵀ
    sigma = spectral_norm_estimate(whitened, power_iters)
    a = gamma / sigma.clamp_min(1.0)
    readout = torch.linalg.solve_triangular(chol.mT, stats.cross, upper=True, left=False)  # C L⁻ᵀ
    for _ in range(power):
        readout = readout @ whitened
    readout = torch.linalg.solve_triangular(chol, readout, upper=False, left=False)  # · L⁻¹
    return readout * (a**power)[..., None, None]


def forward_with_statistics(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *, chunk_size: int, power: int,
    eps: float, norm: str, mode: str, mask: Tensor | None, cu_seqlens: Tensor | None, power_iters: int,
) -> tuple[Tensor, Statistics]:
    """SKA forward in the work dtype; also returns the per-chunk statistics (for prefill)."""
    layout = ChunkLayout.build(q.shape[1], chunk_size, cu_seqlens, q.device)
    per_chunk = chunk_statistics(k, v, layout, mask)
    if mode == "chunk_causal":
        visible = _exclusive_prefix(per_chunk, layout)
        chunk_group = None
    else:
        visible = _sequence_totals(per_chunk, layout)
        chunk_group = layout.chunk_segment
    if norm == "sequence_max":
        seq_max = _sequence_max_norm(k, layout)
        if chunk_group is None:  # one value per chunk
            seq_max = seq_max.index_select(2, layout.chunk_segment)
        visible = visible._replace(max_norm=seq_max)
    heads = q.shape[2]
    readout = readout_matrices(visible, gamma.view(1, heads, 1), power=power, eps=eps, norm=norm,
                               power_iters=power_iters)
    if chunk_group is not None:
        readout = readout.index_select(2, chunk_group)
    y = torch.einsum("bhcpr,bcshr->bcshp", readout, layout.to_chunks(q)) * eta[:, None]
    return layout.from_chunks(y), per_chunk


def ska_chunked(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *, chunk_size: int = 64, power: int = 2,
    eps: float = 1e-3, norm: str = "causal_max", mode: str = "chunk_causal", mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None, power_iters: int = 6,
) -> Tensor:
    """Chunked SKA. q, k: [B, T, H, r]; v: [B, T, H, P]; eta, gamma: [H] -> y [B, T, H, P] (input dtype).

    Same semantics as `ska_reference`; inputs are assumed validated (see `echo_megatron.ops.ska`).
    """
    work = work_dtype(q.dtype)
    y, _ = forward_with_statistics(q.to(work), k.to(work), v.to(work), eta.to(work), gamma.to(work), chunk_size=chunk_size,
                    power=power, eps=eps, norm=norm, mode=mode, mask=mask, cu_seqlens=cu_seqlens,
                    power_iters=power_iters)
    return y.to(q.dtype)
