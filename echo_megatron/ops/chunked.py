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

from .reference import JITTER, MAX_JITTER_ROUNDS, NORM_FLOOR


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and solves run in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class ChunkLayout:
    """Where each token sits in the padded chunk grid [NC, S] of one batch row.

    Every sequence (a batch row, or a `cu_seqlens` segment of a packed row) starts its own
    chunk grid; `segments` lists the chunk range [c0, c1) of each sequence. Building the layout of
    packed sequences reads the chunk offsets on the host (`.tolist()`): the number of chunks sizes
    every buffer of the torch path, so it cannot stay on the device.
    """

    seq_len: int
    chunk_size: int
    num_chunks: int
    segments: tuple[tuple[int, int], ...]
    start_slots: Tensor | None  # [N] slot of each packed sequence's first token (None: one sequence per row)
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
        # an empty sequence has no slot: point it at slot 0, which always starts a sequence
        start_slots = torch.where(lengths > 0, chunk_offsets[:-1] * chunk_size, 0)
        return ChunkLayout(seq_len, chunk_size, num_chunks, segments, start_slots, token_slot, chunk_segment)

    def to_chunks(self, x: Tensor) -> Tensor:
        """[B, T, H, d] -> [B, H, NC, S, d] (head-major, contiguous), zero-padded."""
        batch, _, heads, width = x.shape
        slots = self.num_chunks * self.chunk_size
        by_head = x.transpose(1, 2)
        if self.token_slot is None:  # one copy: F.pad writes a contiguous result
            grid = F.pad(by_head, (0, 0, 0, slots - self.seq_len)) if slots > self.seq_len else by_head.contiguous()
        else:
            grid = x.new_zeros(batch, heads, slots, width).index_copy(2, self.token_slot, by_head)
        return grid.view(batch, heads, self.num_chunks, self.chunk_size, width)

    def from_chunks(self, grid: Tensor) -> Tensor:
        """[B, H, NC, S, d] -> [B, T, H, d] (contiguous)."""
        flat = grid.flatten(2, 3)
        flat = flat[:, :, : self.seq_len] if self.token_slot is None else flat.index_select(2, self.token_slot)
        return flat.transpose(1, 2).contiguous()

    def previous_keys(self, keys: Tensor, before: Tensor | None = None) -> Tensor:
        """z_{t-1} in the slot of every token t, zero at each sequence start: [B, H, NC, S, r] -> same.

        before [B, H, r]: the key preceding slot 0 (a block of a longer sequence); None: slot 0 starts a sequence.
        """
        flat = keys.flatten(2, 3)
        if before is None:
            prev = F.pad(flat, (0, 0, 1, 0))[:, :, :-1]
        else:
            prev = torch.cat([before[:, :, None], flat[:, :, :-1]], dim=2)
        if self.start_slots is not None:
            prev = prev.index_fill(2, self.start_slots, 0.0)
        return prev.view(keys.shape)


class Statistics(NamedTuple):
    """Sums of SPEC §2 over token sets; leading dims [B, H, N] (N chunks or sequences)."""

    gram: Tensor  # G [..., r, r]
    lag: Tensor  # M [..., r, r]
    cross: Tensor  # C [..., P, r]
    max_norm: Tensor  # max ‖z‖ [...]


def chunk_statistics(k: Tensor, v: Tensor, layout: ChunkLayout, mask: Tensor | None) -> Statistics:
    """Per-chunk statistics of the visible tokens [B, H, NC, ...]. k: [B, T, H, r]; v: [B, T, H, P] (work dtype).

    The lag pair (z_t, z_{t-1}) belongs to the chunk of t, so chunk j's M joins it to chunk j-1.
    A masked token contributes nothing (its pairs included).
    """
    keys, values = layout.to_chunks(k), layout.to_chunks(v)
    if mask is not None:
        weight = layout.to_chunks(mask.to(k.dtype)[:, :, None, None])  # [B, 1, NC, S, 1]
        keys, values = keys * weight, values * weight
    gram, lag, cross = _ChunkSums.apply(keys, layout.previous_keys(keys), values)
    max_norm = torch.linalg.vector_norm(keys, dim=-1).amax(dim=-1)
    return Statistics(gram, lag, cross, max_norm)


class _ChunkSums(torch.autograd.Function):
    """Chunk grids Z (keys), Z₋ (previous keys), V [..., S, ·] -> G = ZᵀZ, M = ZᵀZ₋, C = VᵀZ [..., ·, r].

    Backward in five batched matmuls, accumulated in place: dZ = Z(dG + dGᵀ) + Z₋dMᵀ + V dC, dZ₋ = Z dM, dV = Z dCᵀ.
    """

    @staticmethod
    def forward(ctx, keys: Tensor, prev: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(keys, prev, values)
        return keys.mT @ keys, keys.mT @ prev, values.mT @ keys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_gram: Tensor, d_lag: Tensor, d_cross: Tensor):
        keys, prev, values = ctx.saved_tensors
        d_keys = keys @ (d_gram + d_gram.mT)
        d_keys.add_(prev @ d_lag.mT).add_(values @ d_cross)
        return d_keys, keys @ d_lag, keys @ d_cross.mT


class _ExclusiveScan(torch.autograd.Function):
    """Exclusive prefix sum over dim 2 of [B, H, NC, ...], restarting at every sequence's first chunk.

    A loop of in-place adds over chunks: PyTorch's CPU cumsum along an outer dim is strided and
    accumulates in fp64, several times slower than this. Backward: the same scan, reversed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, starts: tuple[bool, ...], initial: Tensor | None = None) -> Tensor:
        """initial [B, H, ...]: what chunk 0 sees (the sum over earlier blocks of its sequence); None: zero."""
        out = torch.empty_like(x)
        for c in range(x.shape[2]):
            if c == 0 and initial is not None:
                out[:, :, c].copy_(initial)
            elif starts[c]:
                out[:, :, c].zero_()
            else:
                torch.add(out[:, :, c - 1], x[:, :, c - 1], out=out[:, :, c])
        ctx.starts, ctx.has_initial = starts, initial is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: Tensor):
        starts, last = ctx.starts, d_out.shape[2] - 1
        d_x = torch.empty_like(d_out)
        for c in range(last, -1, -1):  # d_x[c] = Σ d_out[c'] over later chunks c' of the same sequence
            if c == last or starts[c + 1]:
                d_x[:, :, c].zero_()
            elif c + 1 == last or starts[c + 2]:
                d_x[:, :, c].copy_(d_out[:, :, c + 1])
            else:
                torch.add(d_x[:, :, c + 1], d_out[:, :, c + 1], out=d_x[:, :, c])
        d_initial = None
        if ctx.has_initial:  # chunk 0's sequence: every chunk until the next start reads `initial`
            d_initial = d_out[:, :, 0] + d_x[:, :, 0]
        return d_x, None, d_initial


class InitialStatistics(NamedTuple):
    """What precedes each sequence of a layout (context parallelism: segments held by other ranks).

    totals: statistics of every earlier token, leading dims [B, H, N] (N sequences of the layout);
    join_lag: the lag pair z_first z_prevᵀ joining each sequence to the token before it [B, H, N, r, r]
    (zero where there is none); it belongs to the sequence's chunk 0, like a pair at a chunk boundary.
    """

    totals: Statistics
    join_lag: Tensor


def exclusive_prefix(stats: Statistics, layout: ChunkLayout, initial: InitialStatistics | None = None) -> Statistics:
    """The scan over chunks: statistics of all earlier chunks of the same sequence, per chunk [B, H, NC, ...].

    With `initial` (statistics held elsewhere: earlier context-parallel segments), sequence n also sees
    `initial.totals[:, :, n]` (max for `max_norm`), and its chunk 0 holds `initial.join_lag[:, :, n]`.
    """
    starts = [False] * layout.num_chunks
    for c0, c1 in layout.segments:
        if c1 > c0:
            starts[c0] = True
    lag = stats.lag
    if initial is not None:
        filled = [n for n, (c0, c1) in enumerate(layout.segments) if c1 > c0]
        first_chunks = torch.tensor([layout.segments[n][0] for n in filled], device=lag.device)
        lag = lag.index_add(2, first_chunks, initial.join_lag[:, :, filled])
    max_norm = torch.cat([torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1].cummax(dim=2).values], dim=2)
                          for x in (stats.max_norm[:, :, c0:c1] for c0, c1 in layout.segments)], dim=2)
    visible = Statistics(*(_ExclusiveScan.apply(x, tuple(starts)) for x in (stats.gram, lag, stats.cross)), max_norm)
    if initial is None:
        return visible
    before = initial.totals
    return Statistics(*(x + before[i].index_select(2, layout.chunk_segment) for i, x in enumerate(visible[:3])),
                      torch.maximum(visible.max_norm, before.max_norm.index_select(2, layout.chunk_segment)))


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
    per_chunk = torch.linalg.vector_norm(layout.to_chunks(k), dim=-1).amax(dim=-1)
    return _per_sequence(per_chunk, layout, "amax")


HOST_READ_FREE = ("cpu",)  # device types whose values the host reads without a device sync


def _may_be_true(flags: Tensor) -> bool:
    """`flags.any()` on the host where that is free (CPU); True on accelerators, to avoid a device sync."""
    return flags.device.type not in HOST_READ_FREE or bool(flags.any())


class Cholesky(NamedTuple):
    """cholesky(G̃ + s·I) with the jitter s = coef·m² + [last_resort]·1e-4·max_i G̃_ii actually added."""

    factor: Tensor  # L [..., r, r]; NaN where no jitter helped (non-finite statistics)
    coef: Tensor  # [...]
    last_resort: Tensor  # [...] bool


def cholesky_with_jitter(g_ridge: Tensor, scale: Tensor) -> Cholesky:
    """Batched cholesky(G̃); a matrix where it fails is retried alone with G̃ + 1e-4·s·I (×10 per round),
    and as a last resort with a further 1e-4·max_i G̃_ii (rounding in G at a scale far above m²).

    A matrix that fails every round (NaN/Inf statistics) gets a NaN factor: non-finite inputs give NaN
    outputs, without a host sync on accelerators.
    """
    chol, info = torch.linalg.cholesky_ex(g_ridge)
    eye = torch.eye(g_ridge.shape[-1], dtype=g_ridge.dtype, device=g_ridge.device)
    coef = torch.zeros_like(scale)
    last_resort = torch.zeros_like(scale, dtype=torch.bool)
    failed = info > 0
    for round_ in range(MAX_JITTER_ROUNDS + 1):
        if not _may_be_true(failed):
            return Cholesky(chol, coef, last_resort)
        if round_ < MAX_JITTER_ROUNDS:
            coef = torch.where(failed, JITTER * 10.0**round_, coef)
            jitter = coef * scale
        else:
            last_resort = failed
            jitter = coef * scale + torch.where(failed, JITTER * g_ridge.diagonal(dim1=-2, dim2=-1).amax(dim=-1), 0.0)
        retry, info = torch.linalg.cholesky_ex(g_ridge + jitter[..., None, None] * eye)
        chol = torch.where(failed[..., None, None], retry, chol)
        failed = failed & (info > 0)
    return Cholesky(torch.where(failed[..., None, None], torch.nan, chol), coef, last_resort)


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


class _ReadoutMatrices(torch.autograd.Function):
    """(G, M, C, m, γ̂, η) [..., ·] -> η·R [..., P, r] with a hand-written backward over the r×r algebra.

    With Λ = L⁻¹, W = L⁻¹ M L⁻ᵀ (two triangular solves: accurate for ill-conditioned G̃), X_0 = C Λᵀ,
    X_i = X_{i-1} W: R = a^K X_K Λ. The backward runs the chain in reverse with batched matmuls, then the
    Cholesky adjoint dG̃ = Λᵀ Φ(-tril(E)) Λ with E = dΛ Λᵀ assembled from the well-scaled W and X_0
    (Φ: lower triangle, halved diagonal, symmetrised), and routes tr(dG̃) to m through the ridge and jitter.
    a = γ̂ / max(1, σ), σ by power iteration without gradient (SPEC §2 step 4).
    """

    @staticmethod
    def forward(ctx, gram: Tensor, lag: Tensor, cross: Tensor, max_norm: Tensor, gamma: Tensor, eta: Tensor,
                power: int, eps: float, norm: str, power_iters: int) -> Tensor:
        scale = max_norm.clamp_min(NORM_FLOOR) ** 2
        ridge = torch.full_like(scale, eps) if norm == "none" else eps * scale
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        g_ridge = 0.5 * (gram + gram.mT) + ridge[..., None, None] * eye
        chol = cholesky_with_jitter(g_ridge, scale)
        inv = torch.linalg.solve_triangular(chol.factor, eye.expand_as(g_ridge), upper=False)  # Λ = L⁻¹
        whitened = torch.linalg.solve_triangular(chol.factor, lag, upper=False)  # L⁻¹ M
        whitened = torch.linalg.solve_triangular(chol.factor, whitened.mT, upper=False).mT  # L⁻¹ M L⁻ᵀ
        damping = spectral_norm_estimate(whitened, power_iters).clamp_min(1.0)  # max(1, σ)
        a = gamma / damping
        chain = [cross @ inv.mT]
        for _ in range(power):
            chain.append(chain[-1] @ whitened)
        unscaled = chain[-1] @ inv
        ctx.save_for_backward(lag, cross, max_norm, a, damping, eta, g_ridge.diagonal(dim1=-2, dim2=-1), inv,
                              whitened, chol.coef, chol.last_resort, unscaled, *chain)
        ctx.options = (power, eps, norm)
        return unscaled * (eta * a**power)[..., None, None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_readout: Tensor):
        lag, cross, max_norm, a, damping, eta, diagonal, inv, whitened, coef, last_resort, unscaled, *chain = \
            ctx.saved_tensors
        power, eps, norm = ctx.options
        d_factor = (d_readout * unscaled).sum(dim=(-2, -1))  # d (η a^K)
        d_x = (eta * a**power)[..., None, None] * (d_readout @ inv.mT)  # d X_K
        # E = dΛ Λᵀ from well-scaled factors (Λ M Λᵀ = W, C Λᵀ = X_0): explicit products with Λ would
        # amplify rounding by cond(L) in the ill-conditioned first chunks
        adjoint = chain[-1].mT @ d_x
        d_whitened = torch.zeros_like(whitened)
        for x in reversed(chain[:-1]):
            d_whitened += x.mT @ d_x
            d_x = d_x @ whitened.mT
        d_cross = d_x @ inv
        adjoint += d_x.mT @ chain[0]
        if power:
            adjoint += d_whitened @ whitened.mT + d_whitened.mT @ whitened
        d_lag = inv.mT @ d_whitened @ inv
        lower = -adjoint.tril()
        d_g = inv.mT @ (0.5 * (lower + lower.tril(-1).mT)) @ inv  # d G̃ (symmetric)
        d_shift = d_g.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
        # last resort: + 1e-4·max_i G̃_ii, the gradient split over tied diagonal entries (as torch.amax)
        d_largest = torch.where(last_resort, JITTER * d_shift, 0.0)
        hits = (diagonal == diagonal.amax(dim=-1, keepdim=True)).to(d_g.dtype)
        d_g.diagonal(dim1=-2, dim2=-1).add_(hits * (d_largest / hits.sum(dim=-1))[..., None])
        d_ridge = d_shift + d_largest
        d_scale = coef * d_shift + (0.0 if norm == "none" else eps * d_ridge)
        d_max_norm = torch.where(max_norm >= NORM_FLOOR, 2.0 * max_norm * d_scale, 0.0)
        d_gamma = d_factor * eta * power * a ** (power - 1) / damping if power else torch.zeros_like(a)
        return d_g, d_lag, d_cross, d_max_norm, d_gamma, d_factor * a**power, None, None, None, None


def readout_matrices(stats: Statistics, gamma: Tensor, eta: Tensor | None = None, *, power: int, eps: float,
                     norm: str, power_iters: int) -> Tensor:
    """η·R with R = a^K · C L⁻ᵀ W^K L⁻¹, W = L⁻¹ M L⁻ᵀ, LLᵀ = sym(G) + λI, a = γ̂ / max(1, σ) (SPEC §2).

    stats: leading dims [...]; gamma, eta (default 1) broadcastable to [...]. Returns [..., P, r].
    """
    lead = stats.gram.shape[:-2]
    eta = torch.ones((), dtype=stats.gram.dtype, device=stats.gram.device) if eta is None else eta
    return _ReadoutMatrices.apply(stats.gram, stats.lag, stats.cross, stats.max_norm.expand(lead),
                                  gamma.expand(lead), eta.expand(lead), power, eps, norm, power_iters)


class _ApplyReadout(torch.autograd.Function):
    """Query grid Q [..., S, r], readouts R [..., P, r] -> Y = Q Rᵀ [..., S, P].

    Autograd's bmm backward falls back to one matmul per matrix for these strides; this one is two batched
    matmuls: dQ = dY R, dR = dYᵀ Q.
    """

    @staticmethod
    def forward(ctx, queries: Tensor, readout: Tensor) -> Tensor:
        ctx.save_for_backward(queries, readout)
        return queries @ readout.mT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_y: Tensor):
        queries, readout = ctx.saved_tensors
        return d_y @ readout, d_y.mT @ queries


BLOCK_READOUTS = 128  # readout matrices (batch · head · chunk) per block of the chunk_causal pipeline


def _causal_in_blocks(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *, chunk_size: int, mask: Tensor | None,
    seq_max: Tensor | None, keep_statistics: bool, **readout_options,
) -> tuple[Tensor, Statistics | None]:
    """chunk_causal SKA of one sequence per batch row, run block by block over the chunks.

    Same arithmetic as the whole-sequence stages, in the same order (bitwise the same result): each block
    computes its chunk statistics, continues the exclusive prefix from the running totals of earlier blocks
    (`_ExclusiveScan(initial=...)`; a running `cummax` for the max norm), its readouts and its outputs.
    A block holds about BLOCK_READOUTS readouts, so the r×r temporaries of the dense algebra and its
    backward stay in cache instead of streaming T/S·r² buffers through memory at every stage (which
    made the whole-sequence path superlinear in T). Returns y [B, T, H, P] and, with `keep_statistics`,
    the per-chunk statistics [B, H, NC, ...].
    """
    batch, seq_len, heads, _ = q.shape
    block_tokens = chunk_size * max(1, BLOCK_READOUTS // (batch * heads))
    if mask is not None:
        weight = mask.to(k.dtype)[:, :, None, None]
        k, v = k * weight, v * weight
    eta, gamma = eta.view(1, heads, 1), gamma.view(1, heads, 1)
    running: Statistics | None = None  # sums over the chunks of earlier blocks; max norm over them
    last_key = None
    outputs, per_block = [], []
    for q_b, k_b, v_b in zip(*(x.split(block_tokens, dim=1) for x in (q, k, v))):
        layout = ChunkLayout.build(q_b.shape[1], chunk_size, None, q.device)
        keys, values = layout.to_chunks(k_b), layout.to_chunks(v_b)
        gram, lag, cross = _ChunkSums.apply(keys, layout.previous_keys(keys, last_key), values)
        max_norm = torch.linalg.vector_norm(keys, dim=-1).amax(dim=-1)
        starts = (running is None,) + (False,) * (layout.num_chunks - 1)
        sums = [_ExclusiveScan.apply(x, starts, None if running is None else running[i])
                for i, x in enumerate((gram, lag, cross))]
        # running max over [earlier blocks, this block's chunks]: cummax's tie rule (the later index) as
        # in the whole-sequence scan
        earlier = torch.zeros_like(max_norm[:, :, :1]) if running is None else running.max_norm[:, :, None]
        maxima = torch.cat([earlier, max_norm], dim=2).cummax(dim=2).values
        visible = Statistics(*sums, maxima[:, :, :-1] if seq_max is None else seq_max[:, :, None])
        readout = readout_matrices(visible, gamma, eta, **readout_options)
        outputs.append(layout.from_chunks(_ApplyReadout.apply(layout.to_chunks(q_b), readout)))
        running = Statistics(*(x[:, :, -1] + d[:, :, -1] for x, d in zip(sums, (gram, lag, cross))), maxima[:, :, -1])
        last_key = keys[:, :, -1, (q_b.shape[1] - 1) % chunk_size]
        if keep_statistics:
            per_block.append(Statistics(gram, lag, cross, max_norm))
    y = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    statistics = Statistics(*(torch.cat(x, dim=2) for x in zip(*per_block))) if keep_statistics else None
    return y, statistics


def forward_with_statistics(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *, chunk_size: int, power: int,
    eps: float, norm: str, mode: str, mask: Tensor | None, cu_seqlens: Tensor | None, power_iters: int,
    keep_statistics: bool = True,
) -> tuple[Tensor, Statistics | None]:
    """SKA forward in the work dtype; also returns the per-chunk statistics (for prefill; None without
    `keep_statistics`).

    Stages: `chunk_statistics` (per chunk) → `exclusive_prefix` (chunk_causal) or per-sequence totals
    (prefix) → `readout_matrices` → Y_c = η R_c Q_c. chunk_causal mode without packed sequences runs these
    stages block by block (`_causal_in_blocks`).
    """
    layout = ChunkLayout.build(q.shape[1], chunk_size, cu_seqlens, q.device)
    readout_options = dict(power=power, eps=eps, norm=norm, power_iters=power_iters)
    if mode == "chunk_causal" and cu_seqlens is None and q.shape[1] > 0:
        seq_max = _sequence_max_norm(k, layout)[:, :, 0] if norm == "sequence_max" else None
        return _causal_in_blocks(q, k, v, eta, gamma, chunk_size=chunk_size, mask=mask, seq_max=seq_max,
                                 keep_statistics=keep_statistics, **readout_options)
    per_chunk = chunk_statistics(k, v, layout, mask)
    if mode == "chunk_causal":
        visible = exclusive_prefix(per_chunk, layout)
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
    readout = readout_matrices(visible, gamma.view(1, heads, 1), eta.view(1, heads, 1), **readout_options)
    if chunk_group is not None:
        readout = readout.index_select(2, chunk_group)
    y = _ApplyReadout.apply(layout.to_chunks(q), readout)  # [B, H, NC, S, P]
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
                    power_iters=power_iters, keep_statistics=False)
    return y.to(q.dtype)
