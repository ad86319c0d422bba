"""Input factories and error metrics shared by the operator tests."""

from __future__ import annotations

import torch
from torch import Tensor

from echo_megatron.ops import ska

GRAD_NAMES = ("q", "k", "v", "eta", "gamma")


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


def forward_and_grads(inputs: dict, backend: str, **options) -> list[Tensor]:
    """y and the gradients of a fixed weighted sum of y w.r.t. q, k, v, eta, gamma (zeros where unused)."""
    y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend=backend,
            **options)
    weights = torch.linspace(-1.0, 2.0, y.numel(), dtype=y.dtype).view_as(y)
    grads = torch.autograd.grad((y * weights).sum(), [inputs[n] for n in GRAD_NAMES], allow_unused=True,
                                materialize_grads=True)
    return [y.detach(), *grads]


def adversarial_keys(gen: torch.Generator, shape: tuple[int, ...], kind: int, log10_scale: float,
                     log10_range: tuple[float, float] = (-6.0, 6.0)) -> Tensor:
    """Keys of one of six kinds (0 zero, 1 repeated, 2 zeros then large, 3 spread norms, 4 low rank, 5 iid)."""
    keys = torch.randn(shape, generator=gen) * 10.0**log10_scale
    if kind == 0:  # all zero
        return torch.zeros(shape)
    if kind == 1:  # one key repeated: G is rank one
        return keys[:, :1].expand(shape).clone()
    if kind == 2:  # a zero stretch followed by large keys
        keys[:, : shape[1] // 2] = 0
    if kind == 3:  # norms spread over the whole range within a sequence
        low, high = log10_range
        keys = torch.randn(shape, generator=gen) * 10.0 ** (low + (high - low) * torch.rand(shape[:3] + (1,), generator=gen))
    if kind == 4:  # low rank: every key in a 2-D subspace
        basis = torch.randn(2, shape[-1], generator=gen)
        keys = (keys[..., :2] @ basis) * 10.0**log10_scale
    return keys


def fuzz_case(seed: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """A seeded adversarial case: inputs (q, k, v, eta, gamma; requiring grad) and `ska` options."""
    gen = torch.Generator().manual_seed(seed)
    seq_len = int(torch.randint(1, 90, (1,), generator=gen))
    heads, rank, value_dim = 2, int(torch.randint(1, 9, (1,), generator=gen)), 3
    # fp16 holds magnitudes up to 65504: keep its keys in [1e-3, 1e2]; fp32/bf16 span [1e-6, 1e6].
    low, high = (-3.0, 2.0) if dtype == torch.float16 else (-6.0, 6.0)
    log10_scale = float(low + (high - low) * torch.rand((), generator=gen))
    kind = int(torch.randint(0, 6, (1,), generator=gen))
    shape = (1, seq_len, heads, rank)
    k = adversarial_keys(gen, shape, kind, log10_scale, (low, high))
    q = k.clone() if seed % 2 else torch.randn(shape, generator=gen) * 10.0**log10_scale
    v = torch.randn(1, seq_len, heads, value_dim, generator=gen)
    tensors = {"q": q, "k": k, "v": v}
    tensors = {n: x.to(dtype).requires_grad_() for n, x in tensors.items()}
    params = {"eta": torch.full((heads,), 1.5, requires_grad=True),
              "gamma": torch.full((heads,), 1.01, requires_grad=True)}
    options = dict(chunk_size=int(torch.randint(1, 20, (1,), generator=gen)), power=seed % 4,
                   norm=("causal_max", "none")[seed % 5 == 0], mode=("chunk_causal", "prefix")[seed % 7 == 0])
    return {**tensors, **params}, options
