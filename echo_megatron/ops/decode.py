"""Constant-memory SKA decoding (SPEC §4): prefill + n steps == the chunked forward over T0 + n tokens.

The state holds raw sums over completed chunks, the same sums over the current partial chunk,
the last key (for the lag pair), the readout matrix R of the current chunk and the position in
the chunk. A step reads `y = η R q`, then writes the token into the partial sums; when the
chunk completes the partial sums are folded in and R is recomputed (O(r³), once per S tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from .chunked import Statistics, causal_in_blocks, readout_matrices, work_dtype


@dataclass(frozen=True)
class SKAState:
    """Decode state of one SKA layer, per (batch, head); tensors in fp32 (fp64 for fp64 inputs).

    Floats held per head: 4r² + 3Pr + r + 2, plus one Python int (`position`) for the batch.
    """

    chunk_size: int
    power: int
    eps: float
    norm: str
    power_iters: int
    completed: Statistics  # sums over completed chunks: G, M [B, H, r, r]; C [B, H, P, r]; m [B, H]
    partial: Statistics  # the same sums over the current, partial chunk
    last_key: Tensor  # [B, H, r] (zeros before the first token)
    readout: Tensor  # R of the current chunk [B, H, P, r]
    position: int  # tokens already in the current chunk, 0 <= position < chunk_size

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held (independent of the number of tokens seen)."""
        tensors = [*self.completed, *self.partial, self.last_key, self.readout]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def options(self) -> dict:
        names = ("chunk_size", "power", "eps", "norm", "power_iters")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in names}


def _zero_statistics(batch: int, heads: int, rank: int, value_dim: int, like: Tensor) -> Statistics:
    return Statistics(like.new_zeros(batch, heads, rank, rank), like.new_zeros(batch, heads, rank, rank),
                      like.new_zeros(batch, heads, value_dim, rank), like.new_zeros(batch, heads))


def _outer(a: Tensor, b: Tensor) -> Tensor:
    """[..., m], [..., n] -> [..., m, n]."""
    return a[..., :, None] * b[..., None, :]


def _add_token(partial: Statistics, k: Tensor, v: Tensor, last_key: Tensor) -> Statistics:
    """The partial sums with one more token: k, last_key [B, H, r], v [B, H, P] (the lag pair is (k, last_key))."""
    return Statistics(partial.gram + _outer(k, k), partial.lag + _outer(k, last_key), partial.cross + _outer(v, k),
                      torch.maximum(partial.max_norm, torch.linalg.vector_norm(k, dim=-1)))


def _fold(completed: Statistics, partial: Statistics) -> Statistics:
    """The completed sums with a finished chunk's partial sums folded in."""
    return Statistics(completed.gram + partial.gram, completed.lag + partial.lag, completed.cross + partial.cross,
                      torch.maximum(completed.max_norm, partial.max_norm))


def _readout(stats: Statistics, gamma: Tensor, options: dict) -> Tensor:
    return readout_matrices(stats, gamma.view(1, -1), power=options["power"], eps=options["eps"], norm=options["norm"],
                            power_iters=options["power_iters"])


def prefill(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor, *, chunk_size: int, power: int, eps: float,
    norm: str, power_iters: int,
) -> tuple[Tensor, SKAState]:
    """chunk_causal forward over a prompt plus the state after it. q, k: [B, T0, H, r]; v: [B, T0, H, P]."""
    batch, prompt_len, heads, rank = q.shape
    value_dim = v.shape[-1]
    out_dtype, work = q.dtype, work_dtype(q.dtype)
    q, k, v, eta, gamma = (x.to(work) for x in (q, k, v, eta, gamma))
    options = dict(chunk_size=chunk_size, power=power, eps=eps, norm=norm, power_iters=power_iters)
    full_chunks, position = divmod(prompt_len, chunk_size)
    zeros = _zero_statistics(batch, heads, rank, value_dim, k)
    if prompt_len == 0:
        y = v.new_zeros(batch, 0, heads, value_dim)
        completed, partial, last_key = zeros, zeros, k.new_zeros(batch, heads, rank)
    else:
        y, per_chunk = causal_in_blocks(q, k, v, eta, gamma, mask=None, seq_max=None, keep_statistics=True, **options)
        completed = Statistics(*(x[:, :, :full_chunks].sum(dim=2) for x in per_chunk[:3]),
                               per_chunk.max_norm[:, :, :full_chunks].amax(dim=2) if full_chunks else zeros.max_norm)
        partial = Statistics(*(x[:, :, full_chunks] for x in per_chunk)) if position else zeros
        last_key = k[:, -1]
    state = SKAState(**options, completed=completed, partial=partial, last_key=last_key,
                     readout=_readout(completed, gamma, options), position=position)
    return y.to(out_dtype), state


def step(q: Tensor, k: Tensor, v: Tensor, state: SKAState, *, eta: Tensor, gamma: Tensor) -> tuple[Tensor, SKAState]:
    """One token. q, k: [B, H, r]; v: [B, H, P] -> (y [B, H, P] in q's dtype, new state)."""
    work = state.readout.dtype
    q32, k32, v32 = q.to(work), k.to(work), v.to(work)
    y = torch.einsum("bhpr,bhr->bhp", state.readout, q32) * eta.to(work)[:, None]
    partial = _add_token(state.partial, k32, v32, state.last_key)
    position = state.position + 1
    if position < state.chunk_size:
        return y.to(q.dtype), replace(state, partial=partial, last_key=k32, position=position)
    completed = _fold(state.completed, partial)
    zeros = Statistics(*(torch.zeros_like(x) for x in partial))
    readout = _readout(completed, gamma.to(work), state.options)
    return y.to(q.dtype), replace(state, completed=completed, partial=zeros, last_key=k32, readout=readout,
                                  position=0)


def statistics_views(rows: Tensor, max_norm: Tensor, rank: int) -> Statistics:
    """Statistics stored as one row per (batch, head), rows [B, H, 2r² + P·r] = G | M | C (the layout the
    dense Triton kernel reads), as `Statistics` of views G, M [B, H, r, r], C [B, H, P, r] and max_norm [B, H]."""
    square = rank * rank
    return Statistics(rows[..., :square].unflatten(-1, (rank, rank)),
                      rows[..., square:2 * square].unflatten(-1, (rank, rank)),
                      rows[..., 2 * square:].unflatten(-1, (-1, rank)), max_norm)


class StateSlots:
    """Decode states of up to `slots` requests of one SKA layer (a serving engine's slots), stepped in place.

    completed / partial: `Statistics` (views into the rows `completed_rows` / `partial_rows`
    [n, H, 2r² + P·r], see `statistics_views`); last_key [n, H, r]; readout [n, H, P, r]; tokens [n, H]
    int64: tokens seen by the request (the same for every head; the position in the chunk is tokens % S).
    All on `device`, so that a step reads no value on the host.
    """

    def __init__(self, slots: int, heads: int, rank: int, value_dim: int, options: dict, dtype: torch.dtype,
                 device: torch.device):
        self.options = options

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(slots, heads, *shape, dtype=dtype, device=device)

        self.completed_rows, self.partial_rows = (zeros(2 * rank * rank + value_dim * rank) for _ in range(2))
        self.completed = statistics_views(self.completed_rows, zeros(), rank)
        self.partial = statistics_views(self.partial_rows, zeros(), rank)
        self.last_key = zeros(rank)
        self.readout = zeros(value_dim, rank)
        self.tokens = torch.zeros(slots, heads, dtype=torch.int64, device=device)

    def tensors(self) -> list[Tensor]:
        """The state tensors (not the token counts), each [n, H, ...]."""
        return [self.completed_rows, self.completed.max_norm, self.partial_rows, self.partial.max_norm,
                self.last_key, self.readout]

    @property
    def nbytes_per_request(self) -> int:
        """Bytes of one slot's state tensors (the token count is bookkeeping)."""
        return sum(t[0].nbytes for t in self.tensors())

    def zero(self, slots: Tensor) -> None:
        """Empty the states of `slots` [n] (device indices) for new requests."""
        for tensor in [*self.tensors(), self.tokens]:
            tensor[slots] = 0


def step_slots(q: Tensor, k: Tensor, v: Tensor, slots: StateSlots, rows: Tensor, *, eta: Tensor, gamma: Tensor
               ) -> Tensor:
    """One token for the requests in `rows` [B] (distinct slot indices, on the device), each at its own position
    in its chunk: q, k [B, H, r], v [B, H, P] -> y [B, H, P] (q's dtype); `slots` updated in place.

    Equal to `step` per request. No value is read on the host and no shape depends on data: the fold and the
    readout recompute run for every row and `torch.where` keeps them where the row completes its chunk (an
    O(r³) recompute per row and token: this is the reference and CPU path; the Triton kernel recomputes only
    the rows that complete, `triton.decode.step_slots_triton`)."""
    work = slots.readout.dtype
    q32, k32, v32 = q.to(work), k.to(work), v.to(work)
    readout, last_key = slots.readout[rows], slots.last_key[rows]
    y = torch.einsum("bhpr,bhr->bhp", readout, q32) * eta.to(work)[:, None]
    partial = _add_token(Statistics(*(x[rows] for x in slots.partial)), k32, v32, last_key)
    fold = slots.tokens[rows] % slots.options["chunk_size"] == slots.options["chunk_size"] - 1  # [B, H]
    c = Statistics(*(x[rows] for x in slots.completed))
    completed = _fold(c, partial)

    def where_fold(new: Tensor, old: Tensor) -> Tensor:
        return torch.where(fold.view(*fold.shape, *(1,) * (new.dim() - 2)), new, old)

    completed = Statistics(*(where_fold(new, old) for new, old in zip(completed, c)))
    partial = Statistics(*(where_fold(torch.zeros_like(x), x) for x in partial))
    for stored, new in zip([*slots.completed, *slots.partial], [*completed, *partial]):
        stored[rows] = new
    slots.last_key[rows] = k32
    slots.readout[rows] = where_fold(_readout(completed, gamma.to(work), slots.options), readout)
    slots.tokens[rows] += 1
    return y.to(q.dtype)
