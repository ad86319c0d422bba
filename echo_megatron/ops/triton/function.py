"""Host side of the Triton SKA: chunk table, kernel launches, one autograd Function per stage.

Pipeline (SPEC §3), every stage a Triton kernel forward and backward:

    k, v ──VisibleStatistics──▶ visible statistics (sums of the chunk statistics (G_j, M_j, C_j) before each
                                slot) [B, H, NSLOT, D] and their max key norm per slot (slot = chunk for
                                chunk_causal, sequence for prefix): one walk over the chunks each way
         ──ReadoutMatrices──▶ R [B, H, NSLOT, P, r]
    q ───Readout──▶ y = η R_slot(c) q [B, T, H, P]

The walk is what `SegmentScan` makes of `ChunkStatistics`' per-chunk rows [B, H, NC, D], without those rows
(or their gradients, for r and P <= 64) reaching memory; context parallelism, which joins chunk rows across
ranks, runs the two stages. Where slots are chunks the last two are one launch each way (`ChunkReadout`):
every dense program reads its chunk out from the R it has just written, and keeps dR on chip in the backward.
Without context parallelism the chunk_causal path is one autograd node (`ChunkCausal`), two launches each way:
the walk writes the visible statistics of one chunk in G only (`chunks_per_block`), and each dense program,
taking G consecutive chunks in turn, recomputes the others' from k and v on chip, forward and backward.
Torch only allocates the kernel outputs and sums the partials of dη and dγ̂ over batch and chunks (and,
in prefix mode's backward, adds the per-chunk dR of each sequence, `index_add_`); the chunk table is
built once per shape (`ChunkTable.build`), so a warm call spends no torch op on it. For r > 128 or
P > 128 the dense algebra runs in PyTorch (`chunked.readout_matrices`, autograd) with a warning.
"""

from __future__ import annotations

import functools

import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..chunked import ChunkLayout, Statistics, readout_matrices, work_dtype
from ..reference import JITTER, MAX_JITTER_ROUNDS, NORM_FLOOR
from .runtime import interpreted, kernels_for, launch, launches_run

MAX_DENSE_RANK = 128  # r handled by the dense kernels (dense.py)
MAX_DENSE_VALUE = 128  # P handled by the dense kernels
DENSE_SQUARE_SLOTS = 14  # [r, r] workspace matrices per dense program (dense.py: `_workspace`)
DENSE_BLOCK = 16  # diagonal block of the blocked Cholesky
# tile of the dense products, 16 except where the sm_90 report says otherwise: at r = 32 the backward
# spills 76 bytes with 16-tiles (through the noinline calls' frames) and none with 32-tiles, while the
# forward spills with 32-tiles
DENSE_TILE = {("bwd", 32): 32}
DENSE_TILE_DEFAULT = 16
# under the interpreter: tiles of up to 64 (4-16x fewer interpreted ops; the tiling itself is tested at
# 16-tiles on awkward sizes by tests/ops/test_triton_dense.py)
INTERPRETED_DENSE_TILE = 64
# Persistent dense programs per SM: what the sm_90 report fits at every width (the chunk_causal kernels, which read
# out, hold 2 at r <= 64 and at r = 128); more would only wait, each with its (14 r² + 2 P r)-float workspace.
DENSE_PROGRAMS_PER_SM = 2
INTERPRETED_DENSE_PROGRAMS = 3  # CPU: a few programs, so that each walks several slots (as on a GPU)
# Launch tuning, from the sm_90 resource report of `aot.py` (registers, spills, shared memory):
COLUMN_BLOCK = 32  # output columns per program in readout_bwd_kernel
# columns of y (forward) or dq (backward) at a time in a dense kernel's read-out (`ChunkReadout`), from the sm_90
# report: with 32 columns of dq the backward spills 36 bytes at r = 32 and 184 at r = 128, with 16 none
READ_OUT_COLUMNS = {"fwd": 32, "bwd": 16}
STATS_COLUMN_BLOCK = 64  # statistics columns per program in the forward (r = 128: two programs per chunk)
WALK_COLUMNS = 32  # statistics columns per program of visible_stats_fwd_kernel
# chunk_causal: consecutive chunks a dense program takes in turn, the walk writing the first one's visible statistics
# and the program recomputing the others' from k and v (`chunks_per_block`): at most this many, and under the
# interpreter this many (so that the operator tests cover blocks, partial ones and sequences starting inside them)
MAX_BLOCK_CHUNKS = 8
INTERPRETED_BLOCK_CHUNKS = 3
# (tokens, statistics columns) at a time when a dense program recomputes visible statistics (`_advance_visible`), by
# the widest tile max(r, P) padded: the sm_90 report's spill-free choice (the dense kernels sit at 255 registers; at
# width 64, 32 tokens or 16 columns spill 32-680 bytes). tl.dot takes 8 columns (only its inner size must be >= 16).
RECOMPUTE_TILING = {32: (16, 16), 64: (16, 8), 128: (16, 8)}
# visible_stats_bwd_kernel's (columns per program, warps) by its widest tile max(r, P) padded, from the sm_90 report;
# at 128 every tiling tried spills (12-804 bytes: 16 or 32 columns at 4, 8 or 16 warps), so there the backward is
# the two stages' (segment_scan_kernel's reverse, chunk_stats_bwd_kernel)
WALK_BWD_TILING = {16: (16, 4), 32: (16, 4), 64: (16, 4)}
# chunk_stats_bwd_kernel's (columns per program, warps) by tile width max(r, P) padded: the sm_90 report's
# spill-free choice (16 columns at 4 warps spill 108 bytes at width 64; 32 columns spill 12 at width 32 and
# 4-8 at width 128)
STATS_BWD_TILING = {32: (16, 4), 64: (32, 8), 128: (16, 4)}
TOKENS_PER_STEP = {"stats_fwd": 32, "stats_bwd": 32, "readout_fwd": 32, "readout_bwd": 32}
WARPS = {"stats_fwd": 8, "stats_bwd": 8, "dense": 4, "readout_fwd": 4, "readout_bwd": 8}
NORM_KEYS = {"none": 1, "causal_max": 1, "sequence_max": 2}  # which key norms the statistics kernel takes

_warned_dense_fallback = False


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocation of every kernel output (tests swap in a NaN-filled one to catch unwritten entries)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=256)
def device_constants(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small read-only tensor of Python values on `device`, copied from the host once per
    (values, dtype, device) and reused: after a warm-up call no `ska()` call copies from the host, so the
    forward can be captured in a CUDA graph. The one copy is non-blocking (`torch.tensor(..., device=cuda)`
    would synchronise). A normal tensor even when first made under `torch.inference_mode`, so that a later
    training call can save it for the backward."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _block(n: int) -> int:
    """Padded block width: next power of two, at least 16 (the smallest `tl.dot` operand)."""
    return max(16, triton.next_power_of_2(n))


def _tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: 3 tf32 MMAs (fp32-level accuracy on tensor cores; plain tf32 would break the whitening)."""
    return "ieee" if dtype == torch.float64 else "tf32x3"


def _half(dtype: torch.dtype) -> bool:
    """fp16/bf16 token data: exact in tf32, so products with fp32 matrices need only two tf32 MMAs."""
    return dtype in (torch.float16, torch.bfloat16)


def _num_warps(kernel: str, *blocks: int) -> int:
    """WARPS[kernel] for wide tiles (a dimension of 64), 4 for narrow ones (<= 32), 8 at 128."""
    widest = max(blocks)
    return 4 if widest <= 32 else 8 if widest >= 128 else WARPS[kernel]


@dataclass(frozen=True)
class ChunkTable:
    """Token range of every chunk and chunk range of every sequence (shared by all batch rows), int32.

    Built from `chunked.ChunkLayout`, so both paths lay chunks out identically. Read-only: `build` hands
    out one cached table per shape.
    """

    chunk_size: int
    num_chunks: int
    num_segments: int
    start: Tensor  # [NC] first token of each chunk
    end: Tensor  # [NC] one past its last token
    seg_begin: Tensor  # [NC] first token of its sequence
    seg_end: Tensor  # [NC] one past the last token of its sequence
    segment: Tensor  # [NC] sequence index of each chunk
    seg_chunks: Tensor  # [N+1] chunk offsets of the sequences
    chunk_ids: Tensor  # [NC] 0 … NC-1 (slot of each chunk in chunk_causal mode)

    @staticmethod
    def build(seq_len: int, chunk_size: int, cu_seqlens: Tensor | None, device: torch.device) -> "ChunkTable":
        """The table of one sequence per batch row (cu_seqlens None) or of packed sequences, built once per
        (seq_len, chunk_size, device) — and per packing: packed sequences are keyed by `cu_seqlens` read on
        the host, as `ChunkLayout` reads their chunk offsets anyway — so that a warm call runs no torch op."""
        bounds = None if cu_seqlens is None else tuple(cu_seqlens.tolist())
        return _cached_chunk_table(seq_len, chunk_size, bounds, torch.device(device))

    def slots(self, total: bool) -> Tensor:
        """Slot read by each chunk: its sequence (prefix mode) or itself (chunk_causal)."""
        return self.segment if total else self.chunk_ids

    def num_slots(self, total: bool) -> int:
        return self.num_segments if total else self.num_chunks


@functools.lru_cache(maxsize=64)
def _cached_chunk_table(seq_len: int, chunk_size: int, bounds: tuple[int, ...] | None,
                        device: torch.device) -> ChunkTable:
    """Built on the host from `ChunkLayout`, copied to `device` without blocking; normal tensors even under
    `torch.inference_mode` (as `device_constants`)."""
    host = torch.device("cpu")
    with torch.inference_mode(False):
        layout = ChunkLayout.build(seq_len, chunk_size, None if bounds is None else torch.tensor(bounds), host)
        token_bounds = torch.tensor((0, seq_len) if bounds is None else bounds, dtype=torch.long)
        offsets = torch.tensor([c0 for c0, _ in layout.segments] + [layout.num_chunks], dtype=torch.long)
        segment = layout.chunk_segment
        chunk_ids = torch.arange(layout.num_chunks)
        start = token_bounds[segment] + (chunk_ids - offsets[segment]) * chunk_size
        seg_end = token_bounds[segment + 1]
        columns = (start, torch.minimum(start + chunk_size, seg_end), token_bounds[segment], seg_end, segment, offsets,
                   chunk_ids)
        on_device = [x.to(torch.int32).to(device, non_blocking=True) for x in columns]
    return ChunkTable(chunk_size, layout.num_chunks, len(layout.segments), *on_device)


def _token_block(kernel: str, chunk_size: int, block_r: int, block_p: int) -> int:
    """Tokens per inner step: the chunk (padded to >= 16), at most TOKENS_PER_STEP[kernel], half that for
    tiles 128 wide (r or P = 128: the token tiles then fit in registers)."""
    return min(_block(chunk_size), TOKENS_PER_STEP[kernel] // (2 if max(block_r, block_p) >= 128 else 1))


def _stats_bwd_tiling(block_r: int, block_p: int) -> tuple[int, int]:
    """(columns per program, warps) of chunk_stats_bwd_kernel, by its widest tile (STATS_BWD_TILING; wider
    than 128, outside the sm_90 report, as 128)."""
    return STATS_BWD_TILING[min(128, max(32, block_r, block_p))]


def _block_count(chunk_size: int, tokens: int) -> int:
    """Token tiles of a chunk, rounded up to a power of two (the length of a per-tile vector in a kernel)."""
    return triton.next_power_of_2(triton.cdiv(chunk_size, tokens))


def _strides(x: Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def _token_args(k: Tensor, v: Tensor, weights: Tensor | None) -> tuple:
    """(k, v, mask pointer, their strides) as the statistics kernels take them (any pointer when there is no
    mask: it is never read)."""
    w_strides = (0, 0) if weights is None else _strides(weights)
    return (k, v, k if weights is None else weights), (*_strides(k), *_strides(v), *w_strides)


class ChunkStatistics(torch.autograd.Function):
    """k [B, T, H, r], v [B, T, H, P] -> per-chunk (G, M, C) rows [B, H, NC, 2r² + P·r] and max ‖z‖ [B, H, NC]."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, weights: Tensor | None, table: ChunkTable, norm_keys: int):
        batch, _, heads, rank = k.shape
        value_dim = v.shape[-1]
        work = work_dtype(k.dtype)
        stats = empty((batch, heads, table.num_chunks, 2 * rank * rank + value_dim * rank), work, k.device)
        max_norm = empty((batch, heads, table.num_chunks), work, k.device)
        block_r, block_p = _block(rank), _block(value_dim)
        column_block = min(block_r, STATS_COLUMN_BLOCK)
        tokens, strides = _token_args(k, v, weights)
        launch(kernels_for(k.device).chunk_stats_fwd_kernel,
               (table.num_chunks, batch * heads, triton.cdiv(rank, column_block)),
               *tokens, stats, max_norm, table.start, table.end, table.seg_begin,
               heads, table.num_chunks, rank, value_dim, *strides,
               HAS_MASK=weights is not None, NORM_KEYS=norm_keys,
               BS=_token_block("stats_fwd", table.chunk_size, block_r, block_p), BR=block_r, BP=block_p, BN=column_block,
               ACC=_tl_dtype(work), DOT_PRECISION=_dot_precision(work),
               num_warps=_num_warps("stats_fwd", block_r, block_p))
        ctx.save_for_backward(k, v, weights)
        ctx.table, ctx.norm_keys = table, norm_keys
        return stats, max_norm

    @staticmethod
    def backward(ctx, d_stats: Tensor, d_max_norm: Tensor):
        k, v, weights = ctx.saved_tensors
        return *_launch_stats_bwd(k, v, weights, ctx.table, ctx.norm_keys, d_stats, d_max_norm), None, None, None


def _launch_stats_bwd(k: Tensor, v: Tensor, weights: Tensor | None, table: ChunkTable, norm_keys: int,
                      d_stats: Tensor, d_max_norm: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk_stats_bwd_kernel launch: (dk, dv) from the gradients of the chunk statistics rows [B, H, NC, D]
    and of the chunk max key norms [B, H, NC]."""
    batch, _, heads, rank = k.shape
    value_dim = v.shape[-1]
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    block_r, block_p = _block(rank), _block(value_dim)
    columns, warps = _stats_bwd_tiling(block_r, block_p)
    grid = (table.num_chunks, batch * heads, triton.cdiv(max(rank, value_dim), columns))
    tokens, strides = _token_args(k, v, weights)
    step = _token_block("stats_bwd", table.chunk_size, block_r, block_p)
    launch(kernels_for(k.device).chunk_stats_bwd_kernel, grid,
           *tokens, d_stats.contiguous(), d_max_norm.contiguous(), dk, dv, table.start, table.end, table.seg_begin,
           table.seg_end, heads, table.num_chunks, rank, value_dim, *strides, *_strides(dk), *_strides(dv),
           HAS_MASK=weights is not None, NORM_KEYS=norm_keys, BS=step, TILES=_block_count(table.chunk_size, step),
           BR=block_r, BP=block_p, BN=columns, ACC=_tl_dtype(d_stats.dtype),
           DOT_PRECISION=_dot_precision(d_stats.dtype), HALF_TOKENS=_half(k.dtype), num_warps=warps)
    return dk, dv


def _scan(rows: Tensor, chunk_max: Tensor, table: ChunkTable, *, total: bool, sequence_max: bool,
          d_slot_max: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One segment_scan_kernel launch. Forward: rows [B, H, NC, D], chunk_max [B, H, NC] -> (sums
    [B, H, NSLOT, D], slot maxima [B, H, NSLOT]). Reverse, given d_slot_max (rows = the sums' gradient;
    chunk_max as in the forward): -> (d_rows [B, H, NC, D], d_chunk_max [B, H, NC])."""
    reverse = d_slot_max is not None
    batch, heads, _, width = rows.shape
    out_rows = table.num_chunks if reverse else table.num_slots(total)
    out = empty((batch, heads, out_rows, width), rows.dtype, rows.device)
    max_out = empty((batch, heads, out_rows), chunk_max.dtype, rows.device)
    block = min(1024, _block(width))
    launch(kernels_for(rows.device).segment_scan_kernel, (batch * heads, triton.cdiv(width, block)),
           rows.contiguous(), out, chunk_max, d_slot_max.contiguous() if reverse else chunk_max, max_out,
           table.seg_chunks, table.num_segments, table.num_chunks, table.num_slots(total), width,
           TOTAL=total, MAX_TOTAL=sequence_max, REVERSE=reverse, BLOCK=block, ACC=_tl_dtype(rows.dtype), num_warps=4)
    return out, max_out


class SegmentScan(torch.autograd.Function):
    """Chunk statistics rows [B, H, NC, D] and chunk max key norms [B, H, NC] -> per slot, in one launch:
    the rows' exclusive prefix sum per sequence (slot = chunk) or, with `total`, the sequence's sum (slot =
    sequence) [B, H, NSLOT, D]; and the exclusive running max of the norms (torch.cummax's) or, with
    `total` or `sequence_max`, the sequence's max, per slot [B, H, NSLOT]. Max gradients follow torch: to the
    chunk cummax picks (the later one on ties), or split evenly over the chunks attaining the sequence max.
    The backward recomputes the maxima (saving an output would cost autograd two `detach` calls).
    """

    @staticmethod
    def forward(ctx, rows: Tensor, maxima: Tensor, table: ChunkTable, total: bool, sequence_max: bool):
        maxima = maxima.contiguous()
        ctx.save_for_backward(maxima)
        ctx.table, ctx.options = table, dict(total=total, sequence_max=sequence_max)
        return _scan(rows, maxima, table, total=total, sequence_max=sequence_max)

    @staticmethod
    def backward(ctx, d_sums: Tensor, d_slot_max: Tensor):
        (maxima,) = ctx.saved_tensors
        d_rows, d_maxima = _scan(d_sums, maxima, ctx.table, d_slot_max=d_slot_max, **ctx.options)
        return d_rows, d_maxima, None, None, None


def walks_backward(rank: int, value_dim: int) -> bool:
    """Whether `VisibleStatistics`' backward is one walk (visible_stats_bwd_kernel: r and P padded to <= 64) or the
    two stages' backward (`WALK_BWD_TILING`)."""
    return max(_block(rank), _block(value_dim)) in WALK_BWD_TILING


def _walk_forward(k: Tensor, v: Tensor, weights: Tensor | None, table: ChunkTable, norm_keys: int, total: bool,
                  sequence_max: bool, every: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """One visible_stats_fwd_kernel launch: (visible statistics [B, H, NSLOT, D] — with every > 1 (chunk_causal)
    only every `every`-th chunk's, [B, H, ⌈NC / every⌉, D] —, their max key norms [B, H, NSLOT], the chunk max
    key norms [B, H, NC])."""
    batch, _, heads, rank = k.shape
    value_dim = v.shape[-1]
    work = work_dtype(k.dtype)
    slots = table.num_slots(total)
    rows = slots if total else triton.cdiv(slots, every)
    visible = empty((batch, heads, rows, 2 * rank * rank + value_dim * rank), work, k.device)
    slot_max = empty((batch, heads, slots), work, k.device)
    chunk_max = empty((batch, heads, table.num_chunks), work, k.device)
    block_r, block_p = _block(rank), _block(value_dim)
    column_block = min(block_r, WALK_COLUMNS)
    tokens, strides = _token_args(k, v, weights)
    launch(kernels_for(k.device).visible_stats_fwd_kernel, (batch * heads, triton.cdiv(rank, column_block)),
           *tokens, visible, chunk_max, slot_max, table.start, table.end, table.seg_begin, table.seg_chunks,
           heads, table.num_segments, table.num_chunks, slots, every, rank, value_dim, *strides,
           HAS_MASK=weights is not None, NORM_KEYS=norm_keys, TOTAL=total, MAX_TOTAL=sequence_max,
           BS=_token_block("stats_fwd", table.chunk_size, block_r, block_p), BR=block_r, BP=block_p,
           BN=column_block, ACC=_tl_dtype(work), DOT_PRECISION=_dot_precision(work),
           num_warps=_num_warps("stats_fwd", block_r, block_p))
    return visible, slot_max, chunk_max


def _walk_backward(k: Tensor, v: Tensor, weights: Tensor | None, chunk_max: Tensor, table: ChunkTable,
                   norm_keys: int, total: bool, sequence_max: bool, d_visible: Tensor, d_slot_max: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """(dk, dv) from the gradients of every slot's visible statistics [B, H, NSLOT, D] and max key norm
    [B, H, NSLOT]: one visible_stats_bwd_kernel launch, or the two stages' where that walk would spill
    (`walks_backward`)."""
    batch, _, heads, rank = k.shape
    value_dim = v.shape[-1]
    block_r, block_p = _block(rank), _block(value_dim)
    if not walks_backward(rank, value_dim):
        d_rows, d_chunk_max = _scan(d_visible, chunk_max, table, total=total, sequence_max=sequence_max,
                                    d_slot_max=d_slot_max)
        return _launch_stats_bwd(k, v, weights, table, norm_keys, d_rows, d_chunk_max)
    columns, warps = WALK_BWD_TILING[max(block_r, block_p)]
    column_programs = triton.cdiv(max(rank, value_dim), columns)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    scratch = empty((batch * heads * column_programs * ((4 * block_r + block_p) * columns + table.num_chunks),),
                    chunk_max.dtype, k.device)
    tokens, strides = _token_args(k, v, weights)
    step = _token_block("stats_bwd", table.chunk_size, block_r, block_p)
    launch(kernels_for(k.device).visible_stats_bwd_kernel, (batch * heads, column_programs),
           *tokens, d_visible.contiguous(), chunk_max, d_slot_max.contiguous(), scratch, dk, dv, table.start,
           table.end, table.seg_begin, table.seg_chunks, heads, table.num_segments, table.num_chunks,
           table.num_slots(total), rank, value_dim, *strides, *_strides(dk), *_strides(dv),
           HAS_MASK=weights is not None, NORM_KEYS=norm_keys, TOTAL=total, MAX_TOTAL=sequence_max, BS=step,
           TILES=_block_count(table.chunk_size, step), BR=block_r, BP=block_p, BN=columns,
           ACC=_tl_dtype(chunk_max.dtype), DOT_PRECISION=_dot_precision(chunk_max.dtype), HALF_TOKENS=_half(k.dtype),
           num_warps=warps)
    return dk, dv


class VisibleStatistics(torch.autograd.Function):
    """k [B, T, H, r], v [B, T, H, P] -> what `SegmentScan` makes of `ChunkStatistics`' output, in one launch each
    way (`visible_stats_fwd_kernel`, `visible_stats_bwd_kernel`): visible statistics [B, H, NSLOT, D] and their
    max key norms [B, H, NSLOT], without the chunk rows or their gradients ever reaching memory."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, weights: Tensor | None, table: ChunkTable, norm_keys: int, total: bool,
                sequence_max: bool):
        visible, slot_max, chunk_max = _walk_forward(k, v, weights, table, norm_keys, total, sequence_max)
        ctx.save_for_backward(k, v, weights, chunk_max)
        ctx.table, ctx.options = table, (norm_keys, total, sequence_max)
        return visible, slot_max

    @staticmethod
    def backward(ctx, d_visible: Tensor, d_slot_max: Tensor):
        k, v, weights, chunk_max = ctx.saved_tensors
        dk, dv = _walk_backward(k, v, weights, chunk_max, ctx.table, *ctx.options, d_visible, d_slot_max)
        return dk, dv, None, None, None, None, None


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dense_launch(direction: str, device: torch.device, slots: int, block_r: int, block_p: int, work: torch.dtype
                  ) -> tuple[tuple[int], Tensor, dict]:
    """Grid, workspace and launch options of the persistent dense kernel of `direction` ("fwd" or "bwd")."""
    if interpreted(device):
        programs = min(slots, INTERPRETED_DENSE_PROGRAMS)
    else:
        programs = min(slots, _multiprocessors(device) * DENSE_PROGRAMS_PER_SM)
    if interpreted(device) and launches_run():  # not when recording launches to compile them for a GPU
        tile = min(block_r, INTERPRETED_DENSE_TILE)
    else:
        tile = DENSE_TILE.get((direction, block_r), DENSE_TILE_DEFAULT)
    workspace = empty((programs * ((DENSE_SQUARE_SLOTS + 2) * block_r + 3 * block_p) * block_r,), work, device)
    options = dict(SQUARE_SLOTS=DENSE_SQUARE_SLOTS, BR=block_r, BP=block_p, TILE=tile, ACC=_tl_dtype(work),
                   DOT_PRECISION=_dot_precision(work), num_warps=WARPS["dense"], num_stages=1)
    return (programs,), workspace, options


NO_READ_OUT = dict(READ_OUT=False, BS=16, BN=16, HALF_TOKENS=False)  # a dense kernel's read-out constexprs, unused


@dataclass(frozen=True)
class BlockKeys:
    """What a chunk_causal dense kernel needs to recompute visible statistics (`_visible_row` in dense.py): the
    keys, values and mask it reads them from and `every`, the chunks per block (the stats it is given hold each
    block's first chunk's row only)."""

    k: Tensor
    v: Tensor
    weights: Tensor | None
    every: int


def chunks_per_block(batch_heads: int, num_chunks: int, device: torch.device) -> int:
    """Chunks per block of the chunk_causal dense kernels on `device` (`gpu_chunks_per_block`);
    INTERPRETED_BLOCK_CHUNKS under the interpreter."""
    if interpreted(device):
        return INTERPRETED_BLOCK_CHUNKS
    return gpu_chunks_per_block(batch_heads, num_chunks, _multiprocessors(device))


def gpu_chunks_per_block(batch_heads: int, num_chunks: int, multiprocessors: int) -> int:
    """Chunks per block of the chunk_causal dense kernels on a GPU with `multiprocessors` SMs: as many as leave
    every resident dense program a block (B·H·⌈NC / G⌉ >= programs), at most MAX_BLOCK_CHUNKS; 1 (no
    recomputation) where chunks are too few."""
    programs = multiprocessors * DENSE_PROGRAMS_PER_SM
    return max(1, min(MAX_BLOCK_CHUNKS, batch_heads * num_chunks // programs))


def _block_keys_args(stats: Tensor, table: ChunkTable | None, keys: BlockKeys | None, rank: int, value_dim: int
                     ) -> tuple[list, dict]:
    """A dense kernel's K, V, WMASK, SEG_BEGIN, EVERY and token strides (placeholders, never read, and EVERY = 1
    without keys) and its recomputation constexprs (`RECOMPUTE_TILING`; the same without keys, so that context
    parallelism's launch is the compiled kernel of the compile report)."""
    step, columns = RECOMPUTE_TILING[min(128, max(32, _block(rank), _block(value_dim)))]
    options = dict(HAS_MASK=keys is not None and keys.weights is not None, STATS_BS=step, STATS_BN=columns)
    if keys is None:
        return [stats] * 4 + [1] + [0] * 10, options
    tokens, strides = _token_args(keys.k, keys.v, keys.weights)
    return [*tokens, table.seg_begin, keys.every, *strides], options


def _read_out_options(q: Tensor, value_dim: int, table: ChunkTable, backward: bool) -> dict:
    """Constexprs of a dense kernel that reads its chunk out (`ChunkReadout`): the token tile of the readout
    kernel it stands for and READ_OUT_COLUMNS columns of y (forward) or of dq (backward) at a time."""
    block_r, block_p = _block(q.shape[-1]), _block(value_dim)
    direction, width = ("bwd", block_r) if backward else ("fwd", block_p)  # dq's columns, or y's
    return dict(READ_OUT=True, BS=_token_block(f"readout_{direction}", table.chunk_size, block_r, block_p),
                BN=min(width, READ_OUT_COLUMNS[direction]), HALF_TOKENS=_half(q.dtype))


def launch_readout_matrices(stats: Tensor, max_norm: Tensor, gamma: Tensor, readout: Tensor, *, rank: int,
                            value_dim: int, power: int, eps: float, norm: str, power_iters: int,
                            listed: tuple[Tensor, Tensor, int] | None = None,
                            chunk_tokens: tuple[Tensor, Tensor, Tensor, ChunkTable] | None = None,
                            keys: BlockKeys | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One readout_matrix_fwd_kernel launch: R of each slot of stats [B, H, N, D] (raw max norms [B, H, N])
    into readout [B, H, N, P, r]. With listed = (slot list, slot count, at most how many), both on the device,
    only the listed flat slots (b·H + h)·N + n. With chunk_tokens = (q [B, T, H, r], η [H], y [B, T, H, P], chunk
    table), slots = chunks, each program also writes its chunk's y = η R q; with keys too, stats holds only every
    keys.every-th chunk's row [B, H, ⌈N / every⌉, D] (`BlockKeys`). Returns (params, L⁻¹, aux) for the backward
    (unlisted only)."""
    batch, heads, slots = max_norm.shape
    device, work = stats.device, stats.dtype
    params = device_constants((eps, JITTER, NORM_FLOOR, rank ** -0.5), work, device)
    every = 1 if keys is None else keys.every
    units = batch * heads * triton.cdiv(slots, every) if listed is None else listed[2]
    grid, workspace, options = _dense_launch("fwd", device, units, _block(rank), _block(value_dim), work)
    if listed is None:
        chol_inv = empty((batch, heads, slots, rank, rank), work, device)
        aux = empty((batch, heads, slots, 2), work, device)
        slot_list = slot_count = aux  # unused
    else:  # neither L⁻¹ nor aux is written (the kernel keeps L⁻¹ in its workspace)
        chol_inv = aux = workspace
        slot_list, slot_count = listed[:2]
    table = None
    if chunk_tokens is None:  # placeholders for Q, ETA, Y, CHUNK_START, CHUNK_END and the q, y strides
        token_args, read_out_options = [stats] * 5 + [0] * 8, NO_READ_OUT
    else:
        q, eta, y, table = chunk_tokens
        token_args = [q, eta, y, table.start, table.end, *_strides(q), *_strides(y)]
        read_out_options = _read_out_options(q, value_dim, table, backward=False)
    key_args, key_options = _block_keys_args(stats, table, keys, rank, value_dim)
    launch(kernels_for(device).readout_matrix_fwd_kernel, grid,
           stats, max_norm, gamma, params, readout, chol_inv, aux, workspace, heads, slots,
           batch * heads * slots, rank, value_dim, slot_list, slot_count, *token_args, *key_args,
           POWER=power, POWER_ITERS=power_iters, NORM_SCALED=norm != "none", JITTER_ROUNDS=MAX_JITTER_ROUNDS,
           BLOCK=DENSE_BLOCK, LISTED=listed is not None, **read_out_options, **key_options, **options)
    return params, chol_inv, aux


def _launch_readout_matrices_bwd(saved: tuple[Tensor, ...], d_readout: Tensor | None, *, rank: int, value_dim: int,
                                 power: int, chunk_tokens: tuple[Tensor, ...] | None = None,
                                 table: ChunkTable | None = None, keys: BlockKeys | None = None
                                 ) -> tuple[Tensor, Tensor, Tensor]:
    """One readout_matrix_bwd_kernel launch from the forward's saved (stats, max norms, γ̂, params, L⁻¹, aux) and
    dR [B, H, N, P, r]; or, slots = chunks, with chunk_tokens = (q, η, R, dy, dq, dη shares [B, H, N]) and the chunk
    table instead of dR (the kernel writes dq and dη's shares), and keys as the forward's. Returns (d_stats
    [B, H, N, D] — every slot's, keys or not —, d_max_norm [B, H, N], dγ̂ shares [B, H, N])."""
    stats, max_norm, gamma, params, chol_inv, aux = saved
    batch, heads, slots = max_norm.shape
    device, work = stats.device, stats.dtype
    d_stats = empty((batch, heads, slots, stats.shape[-1]), work, device)
    d_max_norm = empty((batch, heads, slots), work, device)
    d_gamma = empty((batch, heads, slots), work, device)
    every = 1 if keys is None else keys.every
    grid, workspace, options = _dense_launch("bwd", device, batch * heads * triton.cdiv(slots, every), _block(rank),
                                            _block(value_dim), work)
    if chunk_tokens is None:  # placeholders for Q, ETA, RMAT, DY, DQ, DETA, CHUNK_START, CHUNK_END and 3 × 4 strides
        d_readout, token_args, read_out_options = d_readout.contiguous(), [stats] * 8 + [0] * 12, NO_READ_OUT
    else:
        q, _, _, d_y, d_q, _ = chunk_tokens
        d_readout = stats  # unused: dR stays in the workspace
        token_args = [*chunk_tokens, table.start, table.end, *_strides(q), *_strides(d_y), *_strides(d_q)]
        read_out_options = _read_out_options(q, value_dim, table, backward=True)
    key_args, key_options = _block_keys_args(stats, table, keys, rank, value_dim)
    launch(kernels_for(device).readout_matrix_bwd_kernel, grid,
           stats, max_norm, gamma, params, chol_inv, aux, d_readout, d_stats, d_max_norm, d_gamma,
           workspace, heads, slots, batch * heads * slots, rank, value_dim, *token_args, *key_args, POWER=power,
           **read_out_options, **key_options, **options)
    return d_stats, d_max_norm, d_gamma


class ReadoutMatrices(torch.autograd.Function):
    """Visible statistics [B, H, N, D], raw max norms [B, H, N], γ̂ [H] -> R [B, H, N, P, r] (SPEC §2)."""

    @staticmethod
    def forward(ctx, stats: Tensor, max_norm: Tensor, gamma: Tensor, rank: int, value_dim: int, power: int,
                eps: float, norm: str, power_iters: int):
        stats, max_norm = stats.contiguous(), max_norm.contiguous()
        batch, heads, slots, _ = stats.shape
        readout = empty((batch, heads, slots, value_dim, rank), stats.dtype, stats.device)
        params, chol_inv, aux = launch_readout_matrices(stats, max_norm, gamma, readout, rank=rank,
                                                        value_dim=value_dim, power=power, eps=eps, norm=norm,
                                                        power_iters=power_iters)
        ctx.save_for_backward(stats, max_norm, gamma, params, chol_inv, aux)
        ctx.options = dict(rank=rank, value_dim=value_dim, power=power)
        return readout

    @staticmethod
    def backward(ctx, d_readout: Tensor):
        d_stats, d_max_norm, d_gamma = _launch_readout_matrices_bwd(ctx.saved_tensors, d_readout, **ctx.options)
        return d_stats, d_max_norm, d_gamma.sum(dim=(0, 2)), None, None, None, None, None, None


def _chunk_readout_forward(stats: Tensor, max_norm: Tensor, gamma: Tensor, q: Tensor, eta: Tensor, table: ChunkTable,
                           dense: dict, keys: BlockKeys | None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """y [B, T, H, P] from one readout_matrix_fwd_kernel launch that reads each chunk out; and what its backward
    (`_chunk_readout_backward`) needs. dense: rank, value_dim, power, eps, norm, power_iters."""
    stats, max_norm = stats.contiguous(), max_norm.contiguous()
    batch, heads, slots = max_norm.shape
    rank, value_dim = dense["rank"], dense["value_dim"]
    readout = empty((batch, heads, slots, value_dim, rank), stats.dtype, stats.device)
    y = empty((batch, q.shape[1], heads, value_dim), q.dtype, q.device)
    params, chol_inv, aux = launch_readout_matrices(stats, max_norm, gamma, readout, **dense,
                                                    chunk_tokens=(q, eta, y, table), keys=keys)
    return y, (stats, max_norm, gamma, params, chol_inv, aux, readout, q, eta)


def _chunk_readout_backward(saved: tuple[Tensor, ...], d_y: Tensor, table: ChunkTable, dense: dict,
                            keys: BlockKeys | None) -> tuple[Tensor, ...]:
    """`_chunk_readout_forward`'s backward, one readout_matrix_bwd_kernel launch: (d_stats [B, H, NC, D] of every
    chunk, d_max_norm [B, H, NC], dγ̂ [H], dq, dη [H])."""
    *saved, readout, q, eta = saved
    batch, heads, slots = readout.shape[:3]
    d_q = empty(q.shape, q.dtype, q.device)
    d_eta = empty((batch, heads, slots), readout.dtype, q.device)
    d_stats, d_max_norm, d_gamma = _launch_readout_matrices_bwd(
        tuple(saved), None, chunk_tokens=(q, eta, readout, d_y, d_q, d_eta), table=table, keys=keys,
        rank=dense["rank"], value_dim=dense["value_dim"], power=dense["power"])
    return d_stats, d_max_norm, d_gamma.sum(dim=(0, 2)), d_q, d_eta.sum(dim=(0, 2)).to(eta.dtype)


class ChunkReadout(torch.autograd.Function):
    """Visible statistics [B, H, NC, D], raw max norms [B, H, NC], γ̂ [H], q [B, T, H, r], η [H] -> y [B, T, H, P]
    (chunk_causal: one slot per chunk): R of every chunk (`ReadoutMatrices`) and its tokens' y = η R q
    (`Readout`) in one launch, and their backward in one: each dense program reads its chunk out from the R it
    has just written, and takes dR = η Σ dy qᵀ into its workspace, so that dR never reaches memory."""

    @staticmethod
    def forward(ctx, stats: Tensor, max_norm: Tensor, gamma: Tensor, q: Tensor, eta: Tensor, table: ChunkTable,
                rank: int, value_dim: int, power: int, eps: float, norm: str, power_iters: int):
        ctx.dense = dict(rank=rank, value_dim=value_dim, power=power, eps=eps, norm=norm, power_iters=power_iters)
        y, saved = _chunk_readout_forward(stats, max_norm, gamma, q, eta, table, ctx.dense, None)
        ctx.save_for_backward(*saved)
        ctx.table = table
        return y

    @staticmethod
    def backward(ctx, d_y: Tensor):
        return (*_chunk_readout_backward(ctx.saved_tensors, d_y, ctx.table, ctx.dense, None),
                None, None, None, None, None, None, None)


class ChunkCausal(torch.autograd.Function):
    """chunk_causal SKA with the dense kernels (r, P <= 128): q, k [B, T, H, r], v [B, T, H, P], η, γ̂ [H] ->
    y [B, T, H, P], in two launches each way. The walk (`VisibleStatistics`' kernels) writes the visible statistics
    of every `every`-th chunk only (`chunks_per_block`), and the dense kernels with their read-out
    (`ChunkReadout`'s) recompute the others from k and v, forward and backward, so that those rows never reach
    memory; the dense backward writes every chunk's statistics gradient, which the walk's backward reads."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, weights: Tensor | None,
                table: ChunkTable, norm_keys: int, sequence_max: bool, every: int, rank: int, value_dim: int,
                power: int, eps: float, norm: str, power_iters: int):
        block_starts, max_norm, chunk_max = _walk_forward(k, v, weights, table, norm_keys, False, sequence_max, every)
        ctx.dense = dict(rank=rank, value_dim=value_dim, power=power, eps=eps, norm=norm, power_iters=power_iters)
        y, saved = _chunk_readout_forward(block_starts, max_norm, gamma, q, eta, table, ctx.dense,
                                          BlockKeys(k, v, weights, every))
        ctx.save_for_backward(k, v, weights, chunk_max, *saved)
        ctx.table, ctx.walk, ctx.every = table, (norm_keys, False, sequence_max), every
        return y

    @staticmethod
    def backward(ctx, d_y: Tensor):
        k, v, weights, chunk_max, *saved = ctx.saved_tensors
        d_stats, d_max_norm, d_gamma, d_q, d_eta = _chunk_readout_backward(
            tuple(saved), d_y, ctx.table, ctx.dense, BlockKeys(k, v, weights, ctx.every))
        dk, dv = _walk_backward(k, v, weights, chunk_max, ctx.table, *ctx.walk, d_stats, d_max_norm)
        return d_q, dk, dv, d_eta, d_gamma, *([None] * 11)


class Readout(torch.autograd.Function):
    """q [B, T, H, r], R [B, H, NSLOT, P, r], η [H] (any float dtype, cast in the kernel) -> y [B, T, H, P] =
    η R_slot(c) q (dtype of q)."""

    @staticmethod
    def forward(ctx, q: Tensor, readout: Tensor, eta: Tensor, table: ChunkTable, total: bool):
        readout = readout.contiguous()
        batch, seq_len, heads, rank = q.shape
        value_dim = readout.shape[3]
        y = empty((batch, seq_len, heads, value_dim), q.dtype, q.device)
        block_r, block_p = _block(rank), _block(value_dim)
        launch(kernels_for(q.device).readout_fwd_kernel, (table.num_chunks, batch * heads),
               q, readout, eta, y, table.start, table.end, table.slots(total), heads, readout.shape[2], rank,
               value_dim, *_strides(q), *_strides(y),
               BS=_token_block("readout_fwd", table.chunk_size, block_r, block_p), BR=block_r, BP=block_p, ACC=_tl_dtype(readout.dtype),
               DOT_PRECISION=_dot_precision(readout.dtype), HALF_TOKENS=_half(q.dtype),
               num_warps=_num_warps("readout_fwd", block_r, block_p))
        ctx.save_for_backward(q, readout, eta)
        ctx.table, ctx.total = table, total
        return y

    @staticmethod
    def backward(ctx, d_y: Tensor):
        q, readout, eta = ctx.saved_tensors
        table, total = ctx.table, ctx.total
        batch, _, heads, rank = q.shape
        slots, value_dim = readout.shape[2], readout.shape[3]
        work = readout.dtype
        dq = empty(q.shape, q.dtype, q.device)
        d_chunk = empty((batch, heads, table.num_chunks, value_dim, rank), work, q.device)
        column_blocks = triton.cdiv(rank, COLUMN_BLOCK)
        d_eta = empty((batch, heads, table.num_chunks, column_blocks), work, q.device)
        block_r, block_p = _block(rank), _block(value_dim)
        launch(kernels_for(q.device).readout_bwd_kernel, (table.num_chunks, batch * heads, column_blocks),
               q, readout, eta, d_y, dq, d_chunk, d_eta, table.start, table.end, table.slots(total),
               heads, table.num_chunks, slots, rank, value_dim, *_strides(q), *_strides(d_y), *_strides(dq),
               BS=_token_block("readout_bwd", table.chunk_size, block_r, block_p), BR=block_r, BP=block_p, BN=COLUMN_BLOCK,
               ACC=_tl_dtype(work), DOT_PRECISION=_dot_precision(work), HALF_TOKENS=_half(q.dtype),
               num_warps=_num_warps("readout_bwd", block_r, block_p))
        if total:
            d_readout = d_chunk.new_zeros(readout.shape).index_add_(2, table.segment, d_chunk)
        else:
            d_readout = d_chunk
        return dq, d_readout, d_eta.sum(dim=(0, 2, 3)).to(eta.dtype), None, None


def dense_kernels_fit(rank: int, value_dim: int) -> bool:
    """Whether the dense kernels (dense.py) take r and P; wider, the dense algebra runs in PyTorch."""
    return rank <= MAX_DENSE_RANK and value_dim <= MAX_DENSE_VALUE


def _warn_dense_fallback(rank: int, value_dim: int) -> None:
    global _warned_dense_fallback
    if not _warned_dense_fallback:
        _warned_dense_fallback = True
        warnings.warn(
            f"SKA Triton: the dense r×r kernels handle r <= {MAX_DENSE_RANK} and P <= {MAX_DENSE_VALUE}, got "
            f"r={rank}, P={value_dim}; the readout matrices (Cholesky, W, R) run in PyTorch instead. "
            "Statistics, scan and readout stay in Triton.",
            UserWarning,
            stacklevel=3,
        )


def visible_readout_matrices(
    visible: Tensor, max_norm: Tensor, gamma: Tensor, *, rank: int, value_dim: int, power: int, eps: float,
    norm: str, power_iters: int,
) -> Tensor:
    """R [B, H, N, P, r] from visible statistics rows [B, H, N, D]: Triton for r, P <= 128, else torch."""
    if dense_kernels_fit(rank, value_dim):
        return ReadoutMatrices.apply(visible, max_norm, gamma, rank, value_dim, power, eps, norm, power_iters)
    _warn_dense_fallback(rank, value_dim)
    lead = visible.shape[:3]
    square = rank * rank
    stats = Statistics(visible[..., :square].unflatten(-1, (rank, rank)),
                       visible[..., square:2 * square].unflatten(-1, (rank, rank)),
                       visible[..., 2 * square:].unflatten(-1, (value_dim, rank)), max_norm.expand(lead))
    return readout_matrices(stats, gamma.view(1, -1, 1), power=power, eps=eps, norm=norm, power_iters=power_iters)


def read_out(visible: Tensor, max_norm: Tensor, gamma: Tensor, q: Tensor, eta: Tensor, table: ChunkTable, *,
             total: bool, rank: int, value_dim: int, power: int, eps: float, norm: str, power_iters: int) -> Tensor:
    """y [B, T, H, P] = η R_slot(c) q [B, T, H, r] from the visible statistics [B, H, NSLOT, D] and their raw
    max norms [B, H, NSLOT] (γ̂ [H] in the work dtype): one launch each way (`ChunkReadout`) when slots are
    chunks and r, P <= 128; else the readout matrices (`visible_readout_matrices`), then `Readout` (prefix mode's
    slots are sequences, read out chunk-parallel)."""
    if not total and dense_kernels_fit(rank, value_dim):
        return ChunkReadout.apply(visible, max_norm, gamma, q, eta, table, rank, value_dim, power, eps, norm,
                                  power_iters)
    readout = visible_readout_matrices(visible, max_norm, gamma, rank=rank, value_dim=value_dim, power=power,
                                       eps=eps, norm=norm, power_iters=power_iters)
    return Readout.apply(q, readout, eta, table, total)


def ska_triton(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *, chunk_size: int, power: int, eps: float,
    norm: str, mode: str, mask: Tensor | None, cu_seqlens: Tensor | None, power_iters: int,
) -> Tensor:
    """SKA through the Triton kernels; same signature and semantics as `chunked.ska_chunked`.

    q, k: [B, T, H, r]; v: [B, T, H, P]; eta, gamma: [H] -> y [B, T, H, P] in q's dtype. Inputs are
    assumed validated (`echo_megatron.ops.ska`). CUDA tensors run compiled kernels, CPU tensors the same
    kernels under the Triton interpreter (see `runtime`; bf16 is widened to fp32 there, exactly, since the
    interpreter's bf16 `tl.dot` is wrong); fp16/bf16/fp32 statistics in fp32, fp64 in fp64.
    """
    if q.dtype == torch.bfloat16 and interpreted(q.device):
        # the interpreter computes bf16 tl.dot wrongly; bf16 values are exact in fp32, statistics are fp32
        y = ska_triton(q.float(), k.float(), v.float(), eta, gamma, chunk_size=chunk_size, power=power, eps=eps,
                       norm=norm, mode=mode, mask=mask, cu_seqlens=cu_seqlens, power_iters=power_iters)
        return y.to(torch.bfloat16)
    seq_len, rank = q.shape[1], q.shape[3]
    value_dim = v.shape[-1]
    work = work_dtype(q.dtype)
    table = ChunkTable.build(seq_len, chunk_size, cu_seqlens, q.device)
    total = mode == "prefix"
    weights = None if mask is None else mask.to(q.device)  # read through its strides, cast in the kernel
    # the visible keys' max norm (the ridge's scale with causal_max, the jitter's in every norm), or the sequence's
    sequence_max = norm == "sequence_max"
    if not total and dense_kernels_fit(rank, value_dim):
        every = chunks_per_block(q.shape[0] * q.shape[2], table.num_chunks, q.device)
        return ChunkCausal.apply(q, k, v, eta, gamma.to(work), weights, table, NORM_KEYS[norm], sequence_max, every,
                                 rank, value_dim, power, eps, norm, power_iters)
    visible, max_norm = VisibleStatistics.apply(k, v, weights, table, NORM_KEYS[norm], total, sequence_max)
    return read_out(visible, max_norm, gamma.to(work), q, eta, table, total=total, rank=rank, value_dim=value_dim,
                    power=power, eps=eps, norm=norm, power_iters=power_iters)
