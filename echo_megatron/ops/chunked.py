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

    def to_chunks(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """[B, T, H, d] -> [B, H, NC, S, d] (head-major, contiguous, or written into `out`), zero-padded."""
        batch, _, heads, width = x.shape
        if out is None:
            out = x.new_empty(batch, heads, self.num_chunks, self.chunk_size, width)
        flat, by_head = out.flatten(2, 3), x.transpose(1, 2)
        if self.token_slot is None:
            flat[:, :, : self.seq_len].copy_(by_head)
            flat[:, :, self.seq_len:].zero_()
        else:
            flat.zero_().index_copy_(2, self.token_slot, by_head)
        return out

    def from_chunks(self, grid: Tensor, out: Tensor | None = None) -> Tensor:
        """[B, H, NC, S, d] -> [B, T, H, d] (contiguous, or written into `out`)."""
        flat = grid.flatten(2, 3)
        flat = flat[:, :, : self.seq_len] if self.token_slot is None else flat.index_select(2, self.token_slot)
        return flat.transpose(1, 2).contiguous() if out is None else out.copy_(flat.transpose(1, 2))

    def previous_keys(self, keys: Tensor, before: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """z_{t-1} in the slot of every token t, zero at each sequence start: [B, H, NC, S, r] -> same (or `out`).

        before [B, H, r]: the key preceding slot 0 (a block of a longer sequence); None: slot 0 starts a sequence.
        """
        if out is None:
            out = torch.empty_like(keys)
        flat, out_flat = keys.flatten(2, 3), out.flatten(2, 3)
        if flat.shape[2] == 0:  # no chunks (an empty sequence)
            return out
        out_flat[:, :, 1:].copy_(flat[:, :, :-1])
        if before is None:
            out_flat[:, :, 0].zero_()
        else:
            out_flat[:, :, 0].copy_(before)
        if self.start_slots is not None:
            out_flat.index_fill_(2, self.start_slots, 0.0)
        return out

    def chunk_max_norm(self, k: Tensor) -> Tensor:
        """max ‖z‖ over the tokens of each chunk: [B, T, H, r] -> [B, H, NC] (0 for an empty chunk)."""
        return self.to_chunks(torch.linalg.vector_norm(k, dim=-1)[..., None]).amax(dim=(-2, -1))

    def token_grid(self, k: Tensor, v: Tensor, before: Tensor | None = None) -> Tensor:
        """The chunk grid [Z | Z₋ | V] [B, H, NC, S, 2r + P] of keys, previous keys and values (no autograd).

        k: [B, T, H, r]; v: [B, T, H, P]; before as in `previous_keys`.
        """
        batch, _, heads, rank = k.shape
        grid = k.new_empty(batch, heads, self.num_chunks, self.chunk_size, 2 * rank + v.shape[-1])
        self.to_chunks(k, out=grid[..., :rank])
        self.to_chunks(v, out=grid[..., 2 * rank:])
        self.previous_keys(grid[..., :rank], before, out=grid[..., rank:2 * rank])
        return grid


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
    k, v = _masked(k, v, mask)
    keys = layout.to_chunks(k)
    grid = torch.cat([keys, layout.previous_keys(keys), layout.to_chunks(v)], dim=-1)
    stacked = _ChunkSums.apply(grid, k.shape[-1])
    return Statistics(*_unstack(stacked, k.shape[-1]), layout.chunk_max_norm(k))


def _masked(k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Keys and values of masked tokens (mask [B, T] = 0) set to zero, so they and their pairs add nothing."""
    if mask is None:
        return k, v
    weight = mask.to(k.dtype)[:, :, None, None]
    return k * weight, v * weight


def _unstack(stacked: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """[..., 2r + P, r] = [G; Mᵀ; C] -> views (G, M, C)."""
    return stacked[..., :rank, :], stacked[..., rank:2 * rank, :].mT, stacked[..., 2 * rank:, :]


def _stack(gram: Tensor, lag: Tensor, cross: Tensor) -> Tensor:
    """(G, M, C) -> [..., 2r + P, r] = [G; Mᵀ; C] (the inverse of `_unstack`)."""
    return torch.cat([gram, lag.mT, cross], dim=-2)


def _chunk_sums(grid: Tensor, rank: int) -> Tensor:
    """Chunk grids A = [Z | Z₋ | V] [..., S, 2r + P] -> Aᵀ Z = [G; Mᵀ; C] [..., 2r + P, r] (one batched matmul):
    G = ZᵀZ, M = ZᵀZ₋, C = VᵀZ."""
    return grid.mT @ grid[..., :rank]


def _chunk_sums_backward(grid: Tensor, rank: int, d_stacked: Tensor) -> Tensor:
    """d [G; Mᵀ; C] -> dA = Z dSᵀ, plus A dS on the Z columns (Z is both factors): two batched matmuls."""
    lead = grid.shape[:-2]
    grid, d_stacked = grid.reshape(-1, *grid.shape[-2:]), d_stacked.reshape(-1, *d_stacked.shape[-2:])
    d_grid = torch.bmm(grid[..., :rank], d_stacked.mT)
    d_grid[..., :rank] += torch.bmm(grid, d_stacked)
    return d_grid.view(*lead, *d_grid.shape[-2:])


class _ChunkSums(torch.autograd.Function):
    """`_chunk_sums` with its hand-written backward."""

    @staticmethod
    def forward(ctx, grid: Tensor, rank: int) -> Tensor:
        ctx.save_for_backward(grid)
        ctx.rank = rank
        return _chunk_sums(grid, rank)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_stacked: Tensor):
        return _chunk_sums_backward(*ctx.saved_tensors, ctx.rank, d_stacked), None


def _exclusive_scan(x: Tensor, starts: tuple[bool, ...], initial: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exclusive prefix sum over dim 2 of [B, H, NC, ...], restarting at every sequence's first chunk; also
    the inclusive total of the last sequence [B, H, ...] (the running sum a next block continues from).

    initial [B, H, ...]: what chunk 0 sees (the sum over earlier blocks of its sequence); None: zero.
    A loop of adds over chunks: PyTorch's CPU cumsum along an outer dim is strided and accumulates in
    fp64, several times slower than this.
    """
    out = torch.empty_like(x)
    outs, xs = out.unbind(2), x.unbind(2)
    for c in range(len(xs)):
        if c == 0 and initial is not None:
            outs[c].copy_(initial)
        elif starts[c]:
            outs[c].zero_()
        else:
            torch.add(outs[c - 1], xs[c - 1], out=outs[c])
    total = outs[-1] + xs[-1] if xs else x.new_zeros(x.shape[:2] + x.shape[3:])
    return out, total


def _exclusive_scan_backward(d_out: Tensor | None, d_total: Tensor | None, starts: tuple[bool, ...],
                             has_initial: bool) -> tuple[Tensor | None, Tensor | None]:
    """(d_x, d_initial) of `_exclusive_scan`: the same scan, reversed. d_out, d_total: None = zero."""
    if d_out is None and d_total is None:
        return None, None
    last = len(starts) - 1
    if d_out is None:  # [B, H, NC, ...] from the total's [B, H, ...]
        d_out = d_total.new_zeros(()).expand(*d_total.shape[:2], len(starts), *d_total.shape[2:])
    d_x = d_out.new_empty(d_out.shape)
    d_xs, d_outs = d_x.unbind(2), d_out.unbind(2)
    # d_x[c] = Σ d_out[c'] over later chunks c' of the same sequence (+ d_total in the last sequence)
    zero_after = d_total is None  # d_x[c + 1] is known to be zero
    for c in range(last, -1, -1):
        if c == last:
            if zero_after:
                d_xs[c].zero_()
            else:
                d_xs[c].copy_(d_total)
        elif starts[c + 1]:
            d_xs[c].zero_()
            zero_after = True
        elif zero_after:
            d_xs[c].copy_(d_outs[c + 1])
            zero_after = False
        else:
            torch.add(d_xs[c + 1], d_outs[c + 1], out=d_xs[c])
    # chunk 0's sequence: every chunk until the next start reads `initial`
    d_initial = d_outs[0] + d_xs[0] if has_initial else None
    return d_x, d_initial


class _ExclusiveScan(torch.autograd.Function):
    """`_exclusive_scan` with its backward."""

    @staticmethod
    def forward(ctx, x: Tensor, starts: tuple[bool, ...], initial: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        ctx.starts, ctx.has_initial = starts, initial is not None
        return _exclusive_scan(x, starts, initial)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: Tensor | None, d_total: Tensor | None):
        d_x, d_initial = _exclusive_scan_backward(d_out, d_total, ctx.starts, ctx.has_initial)
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
    visible = Statistics(*(_ExclusiveScan.apply(x, tuple(starts))[0] for x in (stats.gram, lag, stats.cross)), max_norm)
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
    per_chunk = layout.chunk_max_norm(k)
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
    """Batched power iteration of SPEC §2 step 4 (no gradient): [N, r, r] -> σ [N]."""
    r = whitened.shape[-1]
    vec = torch.full((*whitened.shape[:-1], 1), 1.0 / math.sqrt(r), dtype=whitened.dtype, device=whitened.device)

    def normalised(x: Tensor) -> Tensor:  # x / ‖x‖, and 0 where ‖x‖ = 0
        n = torch.linalg.vector_norm(x, dim=-2, keepdim=True)
        return x.div_(torch.where(n > 0, n, 1.0))

    for _ in range(power_iters):
        u = normalised(torch.bmm(whitened, vec))
        vec = normalised(torch.bmm(whitened.mT, u))
    return torch.linalg.vector_norm(torch.bmm(whitened, vec), dim=(-2, -1))


class _Readout(NamedTuple):
    """What `_readout_backward` needs of `_readout_forward`'s work; shapes [N, ·]."""

    max_norm: Tensor
    a: Tensor
    damping: Tensor
    eta: Tensor
    diagonal: Tensor  # of G̃
    inv: Tensor  # Λ
    whitened: Tensor  # W
    coef: Tensor
    last_resort: Tensor
    unscaled: Tensor  # X_K Λ
    chain: tuple[Tensor, ...]  # X_0 … X_K


def _readout_forward(gram: Tensor, lag: Tensor, cross: Tensor, max_norm: Tensor, gamma: Tensor, eta: Tensor,
                     power: int, eps: float, norm: str, power_iters: int) -> tuple[Tensor, _Readout]:
    """(G, M, C [N, ·, r], m, γ̂, η [N]) -> (η·R [N, P, r], saved for the backward). See `_ReadoutMatrices`."""
    scale = max_norm.clamp_min(NORM_FLOOR) ** 2
    ridge = torch.full_like(scale, eps) if norm == "none" else eps * scale
    g_ridge = (gram + gram.mT).mul_(0.5)  # sym(G) + λI
    g_ridge.diagonal(dim1=-2, dim2=-1).add_(ridge[:, None])
    chol = cholesky_with_jitter(g_ridge, scale)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # right-hand solves (X A = B): with these memory layouts LAPACK needs no transposed copies (2-3x faster)
    inv = torch.linalg.solve_triangular(chol.factor, eye.expand_as(g_ridge), upper=False, left=False)  # Λ = L⁻¹
    upper = chol.factor.mT
    whitened = torch.linalg.solve_triangular(upper, lag, upper=True, left=False)  # M L⁻ᵀ
    whitened = torch.linalg.solve_triangular(upper, whitened.mT, upper=True, left=False).mT  # L⁻¹ M L⁻ᵀ
    damping = spectral_norm_estimate(whitened, power_iters).clamp_min(1.0)  # max(1, σ)
    a = gamma / damping
    chain = [torch.bmm(cross, inv.mT)]
    for _ in range(power):
        chain.append(torch.bmm(chain[-1], whitened))
    unscaled = torch.bmm(chain[-1], inv)
    saved = _Readout(max_norm, a, damping, eta, g_ridge.diagonal(dim1=-2, dim2=-1), inv, whitened, chol.coef,
                     chol.last_resort, unscaled, tuple(chain))
    return unscaled * (eta * a**power)[:, None, None], saved


def _accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in place, [N, ·, ·] (`baddbmm` with out=acc: torch's FlopCounterMode counts it, not `baddbmm_`)."""
    torch.baddbmm(acc, a, b, out=acc)


def _readout_backward(saved: _Readout, d_readout: Tensor, power: int, eps: float,
                      norm: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """d η·R [N, P, r] -> (dG, dM, dC, dm, dγ̂, dη) of `_readout_forward`."""
    max_norm, a, damping, eta, diagonal, inv, whitened, coef, last_resort, unscaled, chain = saved
    d_factor = (d_readout * unscaled).sum(dim=(-2, -1))  # d (η a^K)
    d_x = torch.bmm(d_readout, inv.mT).mul_((eta * a**power)[:, None, None])  # d X_K
    # E = dΛ Λᵀ from well-scaled factors (Λ M Λᵀ = W, C Λᵀ = X_0): explicit products with Λ would
    # amplify rounding by cond(L) in the ill-conditioned first chunks
    adjoint = torch.bmm(chain[-1].mT, d_x)
    d_whitened = torch.zeros_like(whitened)
    for x in reversed(chain[:-1]):
        _accumulate_product(d_whitened, x.mT, d_x)
        d_x = torch.bmm(d_x, whitened.mT)
    d_cross = torch.bmm(d_x, inv)
    _accumulate_product(adjoint, d_x.mT, chain[0])
    if power:
        _accumulate_product(adjoint, d_whitened, whitened.mT)
        _accumulate_product(adjoint, d_whitened.mT, whitened)
    d_lag = torch.bmm(torch.bmm(inv.mT, d_whitened), inv)
    phi = adjoint.tril(-1)  # Φ(-tril(E)) = -(strict lower + its transpose + diagonal) / 2
    phi = phi + phi.mT
    phi.diagonal(dim1=-2, dim2=-1).copy_(adjoint.diagonal(dim1=-2, dim2=-1))
    d_g = torch.bmm(torch.bmm(inv.mT, phi.mul_(-0.5)), inv)  # d G̃ (symmetric)
    d_shift = d_g.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    # last resort: + 1e-4·max_i G̃_ii, the gradient split over tied diagonal entries (as torch.amax)
    d_largest = torch.where(last_resort, JITTER * d_shift, 0.0)
    hits = (diagonal == diagonal.amax(dim=-1, keepdim=True)).to(d_g.dtype)
    d_g.diagonal(dim1=-2, dim2=-1).add_(hits * (d_largest / hits.sum(dim=-1))[:, None])
    d_ridge = d_shift + d_largest
    d_scale = coef * d_shift + (0.0 if norm == "none" else eps * d_ridge)
    d_max_norm = torch.where(max_norm >= NORM_FLOOR, 2.0 * max_norm * d_scale, 0.0)
    d_gamma = d_factor * eta * power * a ** (power - 1) / damping if power else torch.zeros_like(a)
    return d_g, d_lag, d_cross, d_max_norm, d_gamma, d_factor * a**power


class _ReadoutMatrices(torch.autograd.Function):
    """(G, M, C, m, γ̂, η) [N, ·] -> η·R [N, P, r] with a hand-written backward over the r×r algebra.

    With Λ = L⁻¹, W = L⁻¹ M L⁻ᵀ (two triangular solves: accurate for ill-conditioned G̃), X_0 = C Λᵀ,
    X_i = X_{i-1} W: R = a^K X_K Λ. The backward runs the chain in reverse with batched matmuls, then the
    Cholesky adjoint dG̃ = Λᵀ Φ(-tril(E)) Λ with E = dΛ Λᵀ assembled from the well-scaled W and X_0
    (Φ: lower triangle, halved diagonal, symmetrised), and routes tr(dG̃) to m through the ridge and jitter.
    a = γ̂ / max(1, σ), σ by power iteration without gradient (SPEC §2 step 4). Products are `bmm` and
    in-place accumulations on [N, ·, ·] (fewer passes over the r×r buffers than out-of-place sums).
    """

    @staticmethod
    def forward(ctx, gram: Tensor, lag: Tensor, cross: Tensor, max_norm: Tensor, gamma: Tensor, eta: Tensor,
                power: int, eps: float, norm: str, power_iters: int) -> Tensor:
        readout, saved = _readout_forward(gram, lag, cross, max_norm, gamma, eta, power, eps, norm, power_iters)
        ctx.save_for_backward(*saved[:-1], *saved.chain)
        ctx.options = (power, eps, norm)
        return readout

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_readout: Tensor):
        fields = ctx.saved_tensors
        saved = _Readout(*fields[:len(_Readout._fields) - 1], fields[len(_Readout._fields) - 1:])
        return (*_readout_backward(saved, d_readout, *ctx.options), None, None, None, None)


def readout_matrices(stats: Statistics, gamma: Tensor, eta: Tensor | None = None, *, power: int, eps: float,
                     norm: str, power_iters: int) -> Tensor:
    """η·R with R = a^K · C L⁻ᵀ W^K L⁻¹, W = L⁻¹ M L⁻ᵀ, LLᵀ = sym(G) + λI, a = γ̂ / max(1, σ) (SPEC §2).

    stats: leading dims [...]; gamma, eta (default 1) broadcastable to [...]. Returns [..., P, r].
    """
    lead = stats.gram.shape[:-2]
    eta = torch.ones((), dtype=stats.gram.dtype, device=stats.gram.device) if eta is None else eta
    flat = [x.reshape(-1, *x.shape[-2:]) for x in stats[:3]]
    scalars = [x.expand(lead).reshape(-1) for x in (stats.max_norm, gamma, eta)]
    readout = _ReadoutMatrices.apply(*flat, *scalars, power, eps, norm, power_iters)
    return readout.view(*lead, *readout.shape[-2:])


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
        d_y = d_y.contiguous()  # a broadcast gradient (of a sum, say) would send bmm down a slow path
        return d_y @ readout, d_y.mT @ queries


BLOCK_READOUTS = 128  # readout matrices (batch · head · chunk) per block of the chunk_causal pipeline


class _CausalBlocks(torch.autograd.Function):
    """chunk_causal SKA of one sequence per batch row, block by block over the chunks, as one autograd node.

    q, k, v [B, T, H, ·] (work dtype, masked tokens zeroed), visible max norm [B, H, NC], γ̂, η [H] -> y [B, T, H, P].
    Each block of `block_tokens` tokens builds its token grid [Z | Z₋ | V], its chunk statistics [G; Mᵀ; C]
    (one matmul), continues their exclusive prefix from the running total of the earlier blocks (one scan),
    computes its readouts and its outputs; the backward walks the blocks in reverse, carrying the gradient of
    that running total and of the key each block's first lag pair borrows from the block before. A block
    holds about BLOCK_READOUTS readouts, so the r×r temporaries of the dense algebra and its backward stay in
    cache instead of streaming T/S·r² buffers through memory at every stage (which made the whole-sequence
    path superlinear in T), and the token tensors are written in place, block by block, in both directions.
    `statistics` (a list, or None) receives each block's per-chunk [G; Mᵀ; C] [B, H, nb, 2r + P, r].
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, visible_max: Tensor, gamma: Tensor, eta: Tensor,
                chunk_size: int, block_tokens: int, options: tuple, statistics: list | None) -> Tensor:
        batch, seq_len, heads, rank = k.shape
        y = q.new_empty(batch, seq_len, heads, v.shape[-1])
        gamma, eta = gamma.view(1, heads, 1), eta.view(1, heads, 1)
        keep = any(ctx.needs_input_grad[:6])  # without gradients nothing outlives its block
        running, last_key, saved, blocks = None, None, [], []
        for t0 in range(0, seq_len, block_tokens):
            t1 = min(t0 + block_tokens, seq_len)
            layout = ChunkLayout.build(t1 - t0, chunk_size, None, q.device)
            grid = layout.token_grid(k[:, t0:t1], v[:, t0:t1], last_key)
            queries = layout.to_chunks(q[:, t0:t1])
            stacked = _chunk_sums(grid, rank)
            starts = (running is None,) + (False,) * (layout.num_chunks - 1)
            sums, running = _exclusive_scan(stacked, starts, running)
            lead = sums.shape[:-2]  # [B, H, nb]
            c0 = t0 // chunk_size
            scalars = (x.expand(lead).reshape(-1) for x in (visible_max[:, :, c0:c0 + layout.num_chunks], gamma, eta))
            readout, block_saved = _readout_forward(*(x.reshape(-1, *x.shape[-2:]) for x in _unstack(sums, rank)),
                                                    *scalars, *options)
            readout = readout.view(*lead, *readout.shape[-2:])
            layout.from_chunks(queries @ readout.mT, out=y[:, t0:t1])
            if keep:
                saved += [grid, queries, readout, *block_saved[:-1], *block_saved.chain]
            blocks.append((t0, t1, c0, layout, starts))
            last_key = grid[:, :, -1, (t1 - t0 - 1) % chunk_size, :rank]
            if statistics is not None:
                statistics.append(stacked)
        ctx.save_for_backward(*saved)
        ctx.blocks, ctx.options, ctx.shapes = blocks, options, (q.shape, k.shape, v.shape, visible_max.shape)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_y: Tensor):
        q_shape, k_shape, v_shape, max_shape = ctx.shapes
        rank = k_shape[-1]
        d_q, d_k, d_v = (d_y.new_empty(shape) for shape in (q_shape, k_shape, v_shape))
        d_visible_max = d_y.new_empty(max_shape)
        d_gamma = d_eta = 0.0
        per_block = len(ctx.saved_tensors) // len(ctx.blocks)
        d_running = None  # gradient of the running total the next block started from
        d_borrowed = None  # gradient of the key the next block borrowed for its first lag pair
        for i in reversed(range(len(ctx.blocks))):
            t0, t1, c0, layout, starts = ctx.blocks[i]
            grid, queries, readout, *fields = ctx.saved_tensors[i * per_block:(i + 1) * per_block]
            block_saved = _Readout(*fields[:len(_Readout._fields) - 1], tuple(fields[len(_Readout._fields) - 1:]))
            d_outputs = layout.to_chunks(d_y[:, t0:t1])
            layout.from_chunks(d_outputs @ readout, out=d_q[:, t0:t1])
            lead = readout.shape[:-2]
            d_readout = (d_outputs.mT @ queries).view(-1, *readout.shape[-2:])
            d_gram, d_lag, d_cross, d_max, d_gamma_b, d_eta_b = _readout_backward(block_saved, d_readout,
                                                                                  *ctx.options[:3])
            d_sums = _stack(d_gram, d_lag, d_cross)
            d_stacked, d_running = _exclusive_scan_backward(d_sums.view(*lead, *d_sums.shape[-2:]), d_running,
                                                            starts, i > 0)
            d_grid = _chunk_sums_backward(grid, rank, d_stacked).flatten(2, 3)  # [B, H, slots, 2r + P]
            d_keys, d_prev = d_grid[..., :rank], d_grid[..., rank:2 * rank]  # prev[j] = keys[j - 1]
            d_keys[:, :, :-1] += d_prev[:, :, 1:]
            if d_borrowed is not None:
                d_keys[:, :, t1 - t0 - 1] += d_borrowed
            d_borrowed = d_prev[:, :, 0]
            grid_shape = (*lead, layout.chunk_size)
            layout.from_chunks(d_keys.view(*grid_shape, rank), out=d_k[:, t0:t1])
            layout.from_chunks(d_grid[..., 2 * rank:].view(*grid_shape, -1), out=d_v[:, t0:t1])
            d_visible_max[:, :, c0:c0 + layout.num_chunks] = d_max.view(lead)
            d_gamma = d_gamma + d_gamma_b.view(lead).sum(dim=(0, 2))
            d_eta = d_eta + d_eta_b.view(lead).sum(dim=(0, 2))
        return d_q, d_k, d_v, d_visible_max, d_gamma, d_eta, None, None, None, None


def causal_in_blocks(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *, chunk_size: int, mask: Tensor | None,
    seq_max: Tensor | None, keep_statistics: bool, power: int, eps: float, norm: str, power_iters: int,
) -> tuple[Tensor, Statistics | None]:
    """chunk_causal SKA of one sequence per batch row, run block by block over the chunks (`_CausalBlocks`).

    Same sums in the same order as the whole-sequence stages (bitwise the same outputs; gradients up to the
    order of summation across blocks). The max norm of the visible chunks is one `cummax` over all chunks
    (its tie rule as in the whole-sequence scan). Returns
    y [B, T, H, P] and, with `keep_statistics`, the per-chunk statistics [B, H, NC, ...].
    """
    batch, seq_len, heads, _ = q.shape
    k, v = _masked(k, v, mask)
    max_norm = ChunkLayout.build(seq_len, chunk_size, None, k.device).chunk_max_norm(k)  # [B, H, NC]
    if seq_max is None:  # over the chunks before each chunk
        visible_max = torch.cat([torch.zeros_like(max_norm[:, :, :1]), max_norm[:, :, :-1]], dim=2).cummax(dim=2).values
    else:
        visible_max = seq_max[:, :, None].expand_as(max_norm)
    block_tokens = chunk_size * max(1, BLOCK_READOUTS // (batch * heads))
    per_block = [] if keep_statistics else None
    y = _CausalBlocks.apply(q, k, v, visible_max, gamma, eta, chunk_size, block_tokens,
                            (power, eps, norm, power_iters), per_block)
    if not keep_statistics:
        return y, None
    return y, Statistics(*_unstack(torch.cat(per_block, dim=2), k.shape[-1]), max_norm)


def forward_with_statistics(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *, chunk_size: int, power: int,
    eps: float, norm: str, mode: str, mask: Tensor | None, cu_seqlens: Tensor | None, power_iters: int,
    keep_statistics: bool = True,
) -> tuple[Tensor, Statistics | None]:
    """SKA forward in the work dtype; also returns the per-chunk statistics (for prefill; None without
    `keep_statistics`).

    Stages: `chunk_statistics` (per chunk) → `exclusive_prefix` (chunk_causal) or per-sequence totals
    (prefix) → `readout_matrices` → Y_c = η R_c Q_c. chunk_causal mode without packed sequences runs these
    stages block by block (`causal_in_blocks`).
    """
    layout = ChunkLayout.build(q.shape[1], chunk_size, cu_seqlens, q.device)
    readout_options = dict(power=power, eps=eps, norm=norm, power_iters=power_iters)
    if mode == "chunk_causal" and cu_seqlens is None and q.shape[1] > 0:
        seq_max = _sequence_max_norm(k, layout)[:, :, 0] if norm == "sequence_max" else None
        return causal_in_blocks(q, k, v, eta, gamma, chunk_size=chunk_size, mask=mask, seq_max=seq_max,
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
