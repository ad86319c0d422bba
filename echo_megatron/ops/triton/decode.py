"""Host side of the Triton decode step (SPEC §4): one `decode_step_kernel` launch per token (`step.py`), plus
the dense kernel's readout recompute (`readout_matrix_fwd_kernel`) once per chunk.

* `step_triton` is `ops.decode.step` (a new `SKAState`; the old one is left unchanged): a token that does
  not complete its chunk is one launch; the last token of a chunk adds the recompute of R for all rows.
* `step_slots_triton` is `ops.decode.step_slots` (requests in the slots of a serving engine, each at its own
  position, updated in place): the step kernel appends the (slot, head) pairs that complete their chunk to a
  list on the device, and the dense kernel recomputes R for those only. Three launches (a zeroed counter,
  the step, the recompute), no host read, no shape that depends on data.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..chunked import Statistics
from ..decode import SKAState, StateSlots, statistics_views
from .function import _block, _tl_dtype, empty, launch_readout_matrices, visible_readout_matrices
from .runtime import interpreted, kernels_for, launch, launches_run

# entries of one [BN, BR] tile of the step kernel on a GPU (r = 128: 8 rows a tile), from the sm_90 report:
# 2048 spills 4 bytes at r = 128 (at 4 or 8 warps, in one mode or the other)
STEP_TILE_ELEMENTS = 1024
STEP_WARPS = 4


def _head_stride(x: Tensor) -> int:
    """The stride between consecutive (batch, head) matrices of x [B, H, a, b] (a size-1 dim's stride is arbitrary)."""
    return x.stride(0) if x.shape[1] == 1 else x.stride(1)


def _per_head(x: Tensor) -> Tensor:
    """x [B, H, a, b] with a flat stride per (batch, head) and row-major [a, b] matrices (a copy otherwise)."""
    batch, heads, rows, cols = x.shape
    flat = x.stride(3) == 1 and x.stride(2) == cols and (batch == 1 or x.stride(0) == heads * _head_stride(x))
    return x if flat else x.contiguous()


def _launch_step(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, y: Tensor, state_in: tuple, state_out: tuple, *,
                 rows: Tensor | None = None, tokens: Tensor | None = None, fold_list: Tensor | None = None,
                 fold_count: Tensor | None = None, fold: bool = False, chunk_size: int) -> None:
    """One decode_step_kernel launch. state_in: (readout, partial Statistics, last_key, completed Statistics);
    state_out: (partial Statistics, last_key, completed Statistics); `tokens` given: per-row positions."""
    batch, heads, rank = q.shape
    value_dim = v.shape[-1]
    readout, partial, last_key, completed = state_in
    partial_out, last_out, completed_out = state_out
    matrices_in = [_per_head(x) for x in (readout, *partial[:3], *completed[:3])]
    matrices_out = [_per_head(x) for x in (*partial_out[:3], *completed_out[:3])]
    assert all(a is b for a, b in zip(matrices_out, (*partial_out[:3], *completed_out[:3]))), \
        "the kernel writes the output statistics in place: they must be laid out per (batch, head)"
    block_r, block_p = _block(rank), _block(value_dim)
    if interpreted(q.device) and launches_run():  # not when recording launches to compile them for a GPU
        tile_rows = max(block_r, block_p)  # the interpreter: whole matrices per step (fewer interpreted ops)
    else:
        tile_rows = max(1, min(max(block_r, block_p), STEP_TILE_ELEMENTS // block_r))
    dummy = y
    launch(kernels_for(q.device).decode_step_kernel, (batch * heads,),
           q, k, v, eta, y, dummy if rows is None else rows, dummy if tokens is None else tokens,
           dummy if fold_list is None else fold_list, dummy if fold_count is None else fold_count,
           matrices_in[0], *matrices_in[1:4], partial.max_norm.contiguous(), last_key.contiguous(),
           *matrices_in[4:], completed.max_norm.contiguous(),
           *matrices_out[:3], partial_out.max_norm, last_out, *matrices_out[3:], completed_out.max_norm,
           heads, rank, value_dim, chunk_size,
           q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), y.stride(0), y.stride(1),
           *(_head_stride(x) for x in matrices_in), *(_head_stride(x) for x in matrices_out),
           HAS_ROWS=rows is not None, PER_ROW=tokens is not None, FOLD=fold, BR=block_r, BP=block_p,
           BN=tile_rows, ACC=_tl_dtype(readout.dtype), num_warps=STEP_WARPS)


def _widened(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """bf16 token data widened to fp32 under the interpreter (exact; its bf16 support is unreliable)."""
    if q.dtype == torch.bfloat16 and interpreted(q.device):
        return q.float(), k.float(), v.float()
    return q, k, v


def step_triton(q: Tensor, k: Tensor, v: Tensor, state: SKAState, *, eta: Tensor, gamma: Tensor
                ) -> tuple[Tensor, SKAState]:
    """`ops.decode.step` through the kernels: q, k [B, H, r]; v [B, H, P] -> (y [B, H, P] in q's dtype, new state)."""
    batch, heads, rank = q.shape
    value_dim = v.shape[-1]
    out_dtype = q.dtype
    q, k, v = _widened(q, k, v)
    work = state.readout.dtype
    fold = state.position + 1 == state.chunk_size
    y = empty((batch, heads, value_dim), q.dtype, q.device)

    def new_statistics() -> tuple[Tensor, Statistics]:
        rows = empty((batch, heads, 2 * rank * rank + value_dim * rank), work, q.device)
        return rows, statistics_views(rows, empty((batch, heads), work, q.device), rank)

    partial = new_statistics()[1]
    last_key = empty((batch, heads, rank), work, q.device)
    completed_rows, completed = new_statistics() if fold else (None, state.completed)
    _launch_step(q, k, v, eta.contiguous(), y, (state.readout, state.partial, state.last_key, state.completed),
                 (partial, last_key, completed), fold=fold, chunk_size=state.chunk_size)
    if not fold:
        return y.to(out_dtype), replace(state, partial=partial, last_key=last_key, position=state.position + 1)
    readout = visible_readout_matrices(completed_rows[:, :, None], completed.max_norm[:, :, None], gamma.to(work),
                                       rank=rank, value_dim=value_dim, power=state.power, eps=state.eps,
                                       norm=state.norm, power_iters=state.power_iters)[:, :, 0]
    return y.to(out_dtype), replace(state, completed=completed, partial=partial, last_key=last_key, readout=readout,
                                    position=0)


def step_slots_triton(q: Tensor, k: Tensor, v: Tensor, slots: StateSlots, rows: Tensor, *, eta: Tensor,
                      gamma: Tensor) -> Tensor:
    """`ops.decode.step_slots` through the kernels: q, k [B, H, r], v [B, H, P], rows [B] -> y [B, H, P]."""
    batch, heads, rank = q.shape
    value_dim = v.shape[-1]
    out_dtype = q.dtype
    q, k, v = _widened(q, k, v)
    options = slots.options
    y = empty((batch, heads, value_dim), q.dtype, q.device)
    fold_list = empty((batch * heads,), torch.int32, q.device)
    fold_count = torch.zeros(1, dtype=torch.int32, device=q.device)
    _launch_step(q, k, v, eta.contiguous(), y, (slots.readout, slots.partial, slots.last_key, slots.completed),
                 (slots.partial, slots.last_key, slots.completed), rows=rows, tokens=slots.tokens,
                 fold_list=fold_list, fold_count=fold_count, chunk_size=options["chunk_size"])
    launch_readout_matrices(slots.completed_rows[:, :, None], slots.completed.max_norm[:, :, None],
                            gamma.to(slots.readout.dtype), slots.readout[:, :, None], rank=rank, value_dim=value_dim,
                            power=options["power"], eps=options["eps"], norm=options["norm"],
                            power_iters=options["power_iters"], listed=(fold_list, fold_count, batch * heads))
    return y.to(out_dtype)

