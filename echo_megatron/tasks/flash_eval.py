"""Long-context evaluation of Megatron softmax attention through PyTorch's flash SDPA kernel.

Megatron-Core's local ``DotProductAttention`` (the CPU spec) materialises the [b·heads, T, T] score
matrix in a persistent global buffer: at T = 4096, batch 16, 4 heads that is 4.3 GB and ~20 s per
layer call on 2 CPU cores, against ~1.3 s for ``F.scaled_dot_product_attention``'s flash kernel
(equal q/k/v head widths, causal, no T×T matrix). Inside :func:`flash_core_attention` every local
``DotProductAttention`` of a model in eval mode computes the same function (causal softmax, the
module's ``softmax_scale``, no dropout) with the flash kernel forced; the test suite checks that it
matches Megatron's path. Evaluation only: the NIAH benchmark trains with Megatron's own kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch.nn.attention import SDPBackend, sdpa_kernel


def _flash_forward(module: DotProductAttention):
    """A drop-in ``forward`` for ``module``: q, k, v [T, b, heads, hn] -> context [T, b, heads·hn]."""

    def forward(query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if module.training or packed_seq_params is not None or attention_bias is not None:
            raise ValueError("flash_core_attention: eval mode only, without packed sequences or attention bias")
        if getattr(module, "softmax_offset", None) is not None:
            raise ValueError("flash_core_attention: softmax offsets (softmax_type != 'vanilla') are not supported")
        groups = module.num_attention_heads_per_partition // module.num_query_groups_per_partition
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, T, hn]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=module.softmax_scale)
        t, b = query.shape[:2]
        return context.permute(2, 0, 1, 3).reshape(t, b, module.hidden_size_per_partition)

    return forward


@contextmanager
def flash_core_attention(model: torch.nn.Module) -> Iterator[int]:
    """Route every ``DotProductAttention`` of ``model`` through flash SDPA; yields how many were routed."""
    modules = [m for m in model.modules() if type(m) is DotProductAttention]
    for m in modules:
        m.forward = _flash_forward(m)
    try:
        yield len(modules)
    finally:
        for m in modules:
            del m.forward
