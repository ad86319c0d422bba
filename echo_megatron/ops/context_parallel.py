"""Context-parallel SKA (SPEC §3 "Context parallel"): exact chunk_causal SKA on Megatron's load-balanced CP
layout, exchanging O(H·(2r² + P·r)) numbers per sequence and layer, whatever the sequence length.

Layout (`megatron.core.utils.get_batch_on_this_cp_rank`): with CP size c every sequence is cut into 2c equal
segments and rank i holds segments i and 2c−1−i, concatenated. Packed THD batches (per-document balancing,
Transformer Engine's `thd_get_partitioned_indices`) cut every document (padded length a multiple of 2c) the
same way; the rank's tokens are its two segments of document 0, then of document 1, and so on.

Per layer:
  1. per-chunk statistics of the local tokens, every local segment on its own chunk grid (`chunked`);
  2. per-segment totals (G, M, C sums, the max key norm m) and each segment's first and last key;
  3. one all-gather of those over the CP group; its backward sums the gradients of the gathered copies over
     the group (an all-to-all, the traffic of a reduce-scatter), so the backward pass is exact too;
  4. in global segment order: the exclusive prefix of the totals, with the lag pair z_first(s) z_last(s−1)ᵀ
     that joins segment s to s−1 counted in segment s (its chunk 0), exactly once;
  5. the local chunk scan starting from those prefixes, readout.

Backends: "torch" composes `echo_megatron.ops.chunked` (the scan takes the prefixes as `initial`); "triton"
composes the Triton stages of `echo_megatron.ops.triton.function` (statistics, segmented scan, dense algebra,
readout kernels, unchanged) and adds the prefixes and join pairs to the scan's input and output with PyTorch
ops; "auto" is Triton on CUDA tensors, torch otherwise. Modes: chunk_causal with norm "causal_max" or "none"
(sequence_max and prefix mode are non-causal and not offered under CP); no mask. Decode is unaffected.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .chunked import (
    ChunkLayout,
    InitialStatistics,
    Statistics,
    _sequence_totals,
    exclusive_prefix,
    chunk_statistics,
    readout_matrices,
    work_dtype,
)
from .validation import DECODE_NORMS, check_heads, check_options

CP_NORMS = DECODE_NORMS  # the causal norms: m over the visible tokens, or no norm
CP_BACKENDS = ("auto", "torch", "triton")


def check_context_parallel_layout(seq_length: int, cp_size: int, chunk_size: int) -> None:
    """Config-time check: Megatron cuts each sequence of `seq_length` tokens into 2·cp_size segments, and each
    segment must be a whole number of SKA chunks (the chunk grid runs on across segments)."""
    if cp_size > 1 and seq_length % (2 * cp_size * chunk_size):
        raise ValueError(
            f"context parallelism with SKA: seq_length ({seq_length}) must be a multiple of 2 · context_parallel_size"
            f" · ska_chunk_size = 2·{cp_size}·{chunk_size} = {2 * cp_size * chunk_size} (Megatron cuts each sequence"
            f" into {2 * cp_size} segments and each must hold whole chunks of {chunk_size} tokens)")


class _AllGather(torch.autograd.Function):
    """[...] -> [c, ...] over `group`; backward: rank j receives every rank's gradient of slice j (an all-to-all,
    as a reduce-scatter moves: (c−1)·size per rank; gloo has no reduce-scatter) and sums them."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        received = [torch.empty_like(grad[0]) for _ in range(grad.shape[0])]
        dist.all_to_all(received, [g.contiguous() for g in grad.unbind(0)], group=ctx.group)
        return torch.stack(received).sum(dim=0), None


def local_segment_bounds(local_len: int, cp_size: int, cu_seqlens: Tensor | None, device: torch.device) -> Tensor:
    """Boundaries [2N+1] of this rank's segments in its local tokens (N sequences: 1 per batch row, or the
    documents of a packed row; `cu_seqlens` are the global, padded, document offsets)."""
    if cu_seqlens is None:
        if local_len % 2:
            raise ValueError(f"context parallelism: the local sequence ({local_len} tokens) must hold two equal segments")
        return torch.tensor([0, local_len // 2, local_len], device=device)
    bounds = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = bounds[1:] - bounds[:-1]
    if bool((lengths % (2 * cp_size)).any()):
        raise ValueError(f"context parallelism with packed sequences: every (padded) document length must be a "
                         f"multiple of 2·cp_size = {2 * cp_size}, got lengths {lengths.tolist()}")
    segment = torch.div(lengths, 2 * cp_size, rounding_mode="floor")
    local_bounds = torch.cat([bounds.new_zeros(1), segment.repeat_interleave(2).cumsum(0)])
    if int(local_bounds[-1]) != local_len:
        raise ValueError(f"context parallelism with packed sequences: cu_seqlens cover {int(bounds[-1])} tokens, so "
                         f"this rank should hold {int(bounds[-1]) // cp_size}, got {local_len}")
    return local_bounds


def _flat_rows(stats: Statistics) -> Tensor:
    """G | M | C flattened per row, the Triton stages' layout: [..., 2r² + P·r]."""
    return torch.cat([stats.gram.flatten(-2), stats.lag.flatten(-2), stats.cross.flatten(-2)], dim=-1)


def _segment_payload(rows: Tensor, max_norm: Tensor, k: Tensor, bounds: Tensor) -> Tensor:
    """Per-local-segment totals rows [B, H, 2N, 2r² + P·r] and max norms [B, H, 2N], plus each segment's first
    and last key (k [B, T, H, r], work dtype) -> what is all-gathered: [B, H, 2N, 2r² + P·r + 1 + 2r]."""
    filled = (bounds[1:] > bounds[:-1]).to(k.dtype)[None, :, None, None]  # empty segments have no edge keys
    first = k.index_select(1, bounds[:-1].clamp(max=k.shape[1] - 1)) * filled
    last = k.index_select(1, (bounds[1:] - 1).clamp(min=0)) * filled
    return torch.cat([rows, max_norm[..., None], first.transpose(1, 2), last.transpose(1, 2)], dim=-1)


def _initial_statistics(gathered: Tensor, cp_rank: int, rank: int, value_dim: int) -> InitialStatistics:
    """gathered [c, B, H, 2N, F] (every rank's segment totals) -> what precedes each of this rank's segments."""
    cp_size, batch, heads, pieces, _ = gathered.shape
    per_rank = gathered.view(cp_size, batch, heads, pieces // 2, 2, -1)
    # Global segment s lives on rank s (first half) or rank 2c-1-s (second half), as local segment 0 or 1.
    ordered = torch.stack([per_rank[s, :, :, :, 0] if s < cp_size else per_rank[2 * cp_size - 1 - s, :, :, :, 1]
                           for s in range(2 * cp_size)], dim=3)  # [B, H, N, 2c, F]
    r2, pr = rank * rank, value_dim * rank
    gram, lag, cross, max_norm, first, last = ordered.split([r2, r2, pr, 1, rank, rank], dim=-1)
    last_before = torch.cat([torch.zeros_like(last[..., :1, :]), last[..., :-1, :]], dim=3)
    join = torch.einsum("...i,...j->...ij", first, last_before)  # z_first(s) z_last(s-1)ᵀ, zero for s = 0
    lag = lag.unflatten(-1, (rank, rank)) + join
    sums = [gram.unflatten(-1, (rank, rank)), lag, cross.unflatten(-1, (value_dim, rank))]
    before = [torch.cat([torch.zeros_like(x[:, :, :, :1]), x.cumsum(dim=3)[:, :, :, :-1]], dim=3) for x in sums]
    norm = max_norm[..., 0]
    norm_before = torch.cat([torch.zeros_like(norm[..., :1]), norm.cummax(dim=3).values[..., :-1]], dim=3)
    mine = torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank], device=gathered.device)

    def local(x: Tensor) -> Tensor:  # [B, H, N, 2c, ...] -> this rank's segments [B, H, 2N, ...]
        return x.index_select(3, mine).flatten(2, 3)

    totals = Statistics(*(local(x) for x in before), local(norm_before))
    return InitialStatistics(totals, local(join))


def ska_context_parallel(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *, cp_group: dist.ProcessGroup | None,
    chunk_size: int = 64, power: int = 2, eps: float = 1e-3, norm: str = "causal_max",
    cu_seqlens: Tensor | None = None, power_iters: int = 6, backend: str = "auto",
) -> Tensor:
    """chunk_causal SKA on this rank's part of Megatron's CP layout; equals `ska` on the whole sequences.

    Args:
        q, k: [B, T_local, H, r]; v: [B, T_local, H, P] — this rank's segments i and 2c−1−i of each sequence
            (T_local = T / c), or of each document of a packed row (B = 1).
        eta, gamma: [H]. cp_group: the context-parallel group (None: the default group).
        cu_seqlens: global (padded) document offsets [N+1] of a packed row, each length a multiple of 2c·S.
        backend: "auto" (Triton on CUDA tensors, else torch), "torch" or "triton" (interpreted on CPU).
        Other options as in `echo_megatron.ops.ska`; norm must be "causal_max" or "none".
    Returns:
        y [B, T_local, H, P] in the dtype of q (statistics in fp32, fp64 for fp64 inputs).
    """
    check_heads(q, k, v, eta, gamma, token_axes=2)
    check_options(chunk_size=chunk_size, power=power, eps=eps, norm=norm, power_iters=power_iters, norms=CP_NORMS)
    if backend not in CP_BACKENDS:
        raise ValueError(f"backend must be one of {CP_BACKENDS} under context parallelism, got {backend!r}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens (packed sequences) requires batch size B == 1, got B = {q.shape[0]}")
    bounds = local_segment_bounds(q.shape[1], dist.get_world_size(cp_group), cu_seqlens, q.device)
    lengths = (bounds[1:] - bounds[:-1]).tolist()
    if any(length % chunk_size for length in lengths):
        raise ValueError(f"context parallelism: every segment must be a multiple of chunk_size ({chunk_size}) tokens,"
                         f" got segment lengths {sorted(set(lengths))}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    run = _triton_path if backend == "triton" else _torch_path
    options = dict(chunk_size=chunk_size, power=power, eps=eps, norm=norm, power_iters=power_iters)
    return run(q, k, v, eta, gamma, bounds, cp_group, **options).to(q.dtype)


def _exchange(payload: Tensor, cp_group: dist.ProcessGroup | None, rank: int, value_dim: int) -> InitialStatistics:
    gathered = _AllGather.apply(payload, cp_group)
    return _initial_statistics(gathered, dist.get_rank(cp_group), rank, value_dim)


def _torch_path(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, bounds: Tensor,
                cp_group: dist.ProcessGroup | None, *, chunk_size: int, power: int, eps: float, norm: str,
                power_iters: int) -> Tensor:
    """`chunked` stages with the prefixes as the scan's `initial`; y in the work dtype."""
    work = work_dtype(q.dtype)
    q, k, v, eta, gamma = (x.to(work) for x in (q, k, v, eta, gamma))
    layout = ChunkLayout.build(q.shape[1], chunk_size, bounds, q.device)
    per_chunk = chunk_statistics(k, v, layout, None)
    totals = _sequence_totals(per_chunk, layout)
    initial = _exchange(_segment_payload(_flat_rows(totals), totals.max_norm, k, bounds), cp_group, k.shape[-1],
                        v.shape[-1])
    visible = exclusive_prefix(per_chunk, layout, initial)
    readout = readout_matrices(visible, gamma.view(1, -1, 1), eta.view(1, -1, 1), power=power, eps=eps, norm=norm,
                               power_iters=power_iters)
    return layout.from_chunks(layout.to_chunks(q) @ readout.mT)


def _triton_path(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, bounds: Tensor,
                 cp_group: dist.ProcessGroup | None, *, chunk_size: int, power: int, eps: float, norm: str,
                 power_iters: int) -> Tensor:
    """The Triton stages (as `ska_triton`), with the join pairs added to each segment's chunk-0 row before the
    scan and the prefixes added to its output; y in the work dtype."""
    from .triton.function import NORM_KEYS, ChunkStatistics, ChunkTable, SegmentScan, read_out

    if q.dtype == torch.bfloat16 and q.device.type == "cpu":  # the interpreter's bf16 tl.dot is wrong
        q, k, v = q.float(), k.float(), v.float()
    work = work_dtype(q.dtype)
    rank, value_dim = k.shape[-1], v.shape[-1]
    table = ChunkTable.build(q.shape[1], chunk_size, bounds, q.device)
    stats, chunk_max = ChunkStatistics.apply(k, v, None, table, NORM_KEYS[norm])
    totals, sequence_max = SegmentScan.apply(stats, chunk_max, table, True, True)
    initial = _exchange(_segment_payload(totals, sequence_max, k.to(work), bounds), cp_group, rank, value_dim)
    first_chunks = table.seg_chunks[:-1].long()
    join_rows = F.pad(initial.join_lag.flatten(-2), (rank * rank, value_dim * rank))
    visible, running_max = SegmentScan.apply(stats.index_add(2, first_chunks, join_rows), chunk_max, table, False,
                                             False)
    visible = visible + _flat_rows(initial.totals).index_select(2, table.segment)
    max_norm = torch.maximum(running_max, initial.totals.max_norm.index_select(2, table.segment))
    return read_out(visible, max_norm, gamma.to(work), q, eta.to(work), table, total=False, rank=rank,
                    value_dim=value_dim, power=power, eps=eps, norm=norm, power_iters=power_iters)
