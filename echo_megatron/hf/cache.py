"""The generation cache of an SKA layer: constant-size `SKAState`s, registered with transformers' cache machinery.

`SKACacheLayer` is a `CacheLayerMixin` with `_layer_type = "ska"`, so `DynamicCache(config=...)` builds one for
every `"ska"` entry of `config.layer_types`. It holds no keys or values: per batch row the decode state of
`echo_megatron.ops` (sums over completed chunks and the current chunk, the last key, the cached readout) and a
token count. Its size does not depend on the number of tokens seen.

Left padding: `SKAState.position` is one integer per state, so rows are kept in groups that share it. A row
with p leading pad tokens is prefilled on its tokens p: only (its chunk grid starts at its first real token,
exactly as if it were alone); rows with equal padding share one state. Beam search and batch expansion
re-select rows across groups (`reorder_cache`, `batch_repeat_interleave`, `batch_select_indices`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from echo_megatron.ops import SKAState, ska, ska_prefill, ska_step


def left_padding_groups(padding_mask: Tensor | None, batch: int, seq_len: int) -> list[tuple[Tensor, int]]:
    """Rows grouped by their number of leading pad tokens: [(row indices [n], pad count)].

    padding_mask: [B, T] (1 = token, 0 = padding) or None (no padding). Only left padding is supported:
    once a row's tokens start, every later position must be a token.
    """
    if padding_mask is None:
        return [(torch.arange(batch), 0)]
    if tuple(padding_mask.shape) != (batch, seq_len):
        raise ValueError(f"attention_mask must have shape [batch, seq_len] = {(batch, seq_len)} for SKA layers, "
                         f"got {tuple(padding_mask.shape)}")
    tokens = padding_mask.to(torch.bool).cpu()
    pads = (~tokens).to(torch.int64).cumprod(dim=1).sum(dim=1)  # leading zeros per row
    after_start = torch.arange(seq_len)[None, :] >= pads[:, None]
    if not bool(tokens[after_start].all()):
        raise ValueError("SKA layers support left padding only: attention_mask must be 0 before a row's first "
                         "token and 1 from there on")
    return [(torch.nonzero(pads == pad).flatten(), int(pad)) for pad in torch.unique(pads).tolist()]


def ska_left_padded(q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, **ska_kwargs) -> Tensor:
    """Full-sequence `ska` where each row starts at its first token (pad positions output 0).

    q, k: [B, T, H, r]; v: [B, T, H, P] -> y [B, T, H, P].
    """
    batch, seq_len = q.shape[:2]
    groups = left_padding_groups(padding_mask, batch, seq_len)
    if len(groups) == 1 and groups[0][1] == 0:
        return ska(q, k, v, **ska_kwargs)
    y = v.new_zeros(v.shape)
    for rows, pad in groups:
        rows = rows.to(q.device)
        if pad < seq_len:
            y[rows, pad:] = ska(q[rows, pad:], k[rows, pad:], v[rows, pad:], **ska_kwargs)
    return y


def _select_rows(state: SKAState, index: Tensor) -> SKAState:
    """The state of rows `index` (batch axis 0 of every tensor the state holds)."""
    def pick(value):
        if isinstance(value, Tensor):
            return value.index_select(0, index.to(value.device))
        if isinstance(value, tuple) and value and all(isinstance(x, Tensor) for x in value):
            return type(value)(*(pick(x) for x in value))
        return value

    return dataclasses.replace(state, **{f.name: pick(getattr(state, f.name)) for f in dataclasses.fields(state)})


class SKACacheLayer(CacheLayerMixin):
    """Cache of one SKA layer: groups of rows [(rows [n], SKAState of those rows)] and the tokens seen."""

    _layer_type = "ska"
    is_compileable = False
    is_croppable = False
    supports_early_init = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.groups: list[tuple[Tensor, SKAState]] = []
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """SKA layers hold no keys or values; their state is created by the first forward."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        raise TypeError("SKACacheLayer holds no keys/values: SKA layers call `forward` on it, not `update`")

    # ------------------------------------------------------------------ the SKA forward with this cache
    def forward(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, *, eta: Tensor, gamma: Tensor,
                options: dict) -> Tensor:
        """q, k: [B, T, H, r]; v: [B, T, H, P] -> y [B, T, H, P]: a prefill on the first call (per padding group),
        then decode steps, each equal to the full-sequence forward at that position."""
        batch, seq_len = q.shape[:2]
        if not self.groups:
            y = v.new_zeros(v.shape)
            for rows, pad in left_padding_groups(padding_mask, batch, seq_len):
                rows = rows.to(q.device)
                y_rows, state = ska_prefill(q[rows, pad:], k[rows, pad:], v[rows, pad:], eta=eta, gamma=gamma,
                                            **options)
                y[rows, pad:] = y_rows
                self.groups.append((rows, state))
            self.is_initialized = True
        else:
            if padding_mask is not None and not bool(padding_mask.all()):
                raise ValueError("SKA layers cannot take padding after the prompt: pad on the left of the prompt")
            if sum(len(rows) for rows, _ in self.groups) != batch:
                raise ValueError(f"the SKA cache holds {self.batch_size} rows but the input has {batch}")
            y = torch.stack([self._step(q[:, t], k[:, t], v[:, t], eta, gamma) for t in range(seq_len)], dim=1)
        self.seen_tokens += seq_len
        return y

    def _step(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, gamma: Tensor) -> Tensor:
        """One token for every row: q, k [B, H, r]; v [B, H, P] -> y [B, H, P]."""
        y = v.new_empty(v.shape)
        for i, (rows, state) in enumerate(self.groups):
            y[rows], state = ska_step(q[rows], k[rows], v[rows], state, eta=eta, gamma=gamma)
            self.groups[i] = (rows, state)
        return y

    # ------------------------------------------------------------------ transformers' cache API
    @property
    def batch_size(self) -> int:
        return sum(len(rows) for rows, _ in self.groups)

    @property
    def nbytes(self) -> int:
        """Bytes of state held (independent of the number of tokens seen)."""
        return sum(state.nbytes for _, state in self.groups)

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.groups, self.seen_tokens, self.is_initialized = [], 0, False

    def offload(self) -> None:
        """Nothing to offload: the state is constant-size."""

    def prefetch(self) -> None:
        """Nothing to prefetch: the state is never offloaded."""

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("an SKA cache cannot be cropped: its state sums every token seen (like Mamba's)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i of the new cache is row `beam_idx[i]` of the old one (beam search)."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (in that order, repeats allowed), regrouping them by their state."""
        if not self.groups:
            return
        indices = indices.detach().to("cpu", torch.int64)
        group_of = torch.empty(self.batch_size, dtype=torch.int64)
        local_of = torch.empty(self.batch_size, dtype=torch.int64)
        for g, (rows, _) in enumerate(self.groups):
            group_of[rows.cpu()] = g
            local_of[rows.cpu()] = torch.arange(len(rows))
        selected = []
        for g, (rows, state) in enumerate(self.groups):
            new_rows = torch.nonzero(group_of[indices] == g).flatten()
            if len(new_rows):
                selected.append((new_rows.to(rows.device), _select_rows(state, local_of[indices[new_rows]])))
        self.groups = selected


__all__ = ["SKACacheLayer", "left_padding_groups", "ska_left_padded"]
