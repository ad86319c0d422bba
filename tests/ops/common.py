"""Input factories and error metrics shared by the operator tests."""

from __future__ import annotations

import torch
from torch import Tensor


def make_inputs(batch: int, seq_len: int, heads: int, rank: int, value_dim: int, *, dtype=torch.float64,
                seed: int = 0, requires_grad: bool = False) -> dict[str, Tensor]:
    """iid Gaussian q, k, v [B, T, H, ·] and per-head eta, gamma in their layer ranges."""
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(
        q=torch.randn(batch, seq_len, heads, rank, generator=gen, dtype=torch.float64),
        k=torch.randn(batch, seq_len, heads, rank, generator=gen, dtype=torch.float64),
        v=torch.randn(batch, seq_len, heads, value_dim, generator=gen, dtype=torch.float64),
        eta=0.5 + torch.rand(heads, generator=gen, dtype=torch.float64),
        gamma=1.0 + 0.5 * torch.rand(heads, generator=gen, dtype=torch.float64),
    )
    return {name: x.to(dtype).requires_grad_(requires_grad) for name, x in tensors.items()}


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute when expected is all zero)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().item()
    return (actual.double() - expected.double()).abs().max().item() / (scale if scale > 0 else 1.0)
