"""Finite inputs never produce NaN/Inf: zero, repeated and extreme-norm keys, half-precision inputs."""

from __future__ import annotations

import pytest
import torch

from echo_megatron.ops import ska, ska_prefill, ska_step

CASES_PER_DTYPE = 70  # x 3 dtypes = 210 seeded cases


def _adversarial_keys(gen: torch.Generator, shape: tuple[int, ...], kind: int, log10_scale: float,
                      log10_range: tuple[float, float] = (-6.0, 6.0)) -> torch.Tensor:
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


def _fuzz_case(seed: int, dtype: torch.dtype) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    seq_len = int(torch.randint(1, 90, (1,), generator=gen))
    heads, rank, value_dim = 2, int(torch.randint(1, 9, (1,), generator=gen)), 3
    # fp16 holds magnitudes up to 65504: keep its keys in [1e-3, 1e2]; fp32/bf16 span [1e-6, 1e6].
    low, high = (-3.0, 2.0) if dtype == torch.float16 else (-6.0, 6.0)
    log10_scale = float(low + (high - low) * torch.rand((), generator=gen))
    kind = int(torch.randint(0, 6, (1,), generator=gen))
    shape = (1, seq_len, heads, rank)
    k = _adversarial_keys(gen, shape, kind, log10_scale, (low, high))
    q = k.clone() if seed % 2 else torch.randn(shape, generator=gen) * 10.0**log10_scale
    v = torch.randn(1, seq_len, heads, value_dim, generator=gen)
    tensors = {"q": q, "k": k, "v": v}
    tensors = {n: x.to(dtype).requires_grad_() for n, x in tensors.items()}
    params = {"eta": torch.full((heads,), 1.5, requires_grad=True),
              "gamma": torch.full((heads,), 1.01, requires_grad=True)}
    options = dict(chunk_size=int(torch.randint(1, 20, (1,), generator=gen)), power=seed % 4,
                   norm=("causal_max", "none")[seed % 5 == 0], mode=("chunk_causal", "prefix")[seed % 7 == 0])
    return {**tensors, **params}, options


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fuzz_outputs_and_gradients_are_finite(dtype):
    """Outputs are finite; gradients are finite, except that an fp16 gradient larger than fp16's
    range (65504, e.g. d y / d k for keys of norm 1e-3) is ±inf as fp16 overflow dictates — never NaN."""
    for seed in range(CASES_PER_DTYPE):
        inputs, options = _fuzz_case(seed, dtype)
        assert all(torch.isfinite(x).all() for x in inputs.values())
        y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], **options)
        assert y.dtype == dtype
        assert torch.isfinite(y).all(), (seed, options)
        grads = torch.autograd.grad(y.float().sum(), list(inputs.values()), allow_unused=True, materialize_grads=True)
        for name, g in zip(inputs, grads):
            ok = ~torch.isnan(g) if g.dtype == torch.float16 else torch.isfinite(g)
            assert ok.all(), (seed, name, options)


@pytest.mark.parametrize("kind", range(6))
def test_decode_is_finite_on_adversarial_keys(kind):
    gen = torch.Generator().manual_seed(kind)
    k = _adversarial_keys(gen, (1, 50, 2, 4), kind, 5.0)
    q, v = k.clone(), torch.randn(1, 50, 2, 3, generator=gen)
    eta, gamma = torch.ones(2), torch.ones(2)
    y, state = ska_prefill(q[:, :20], k[:, :20], v[:, :20], eta=eta, gamma=gamma, chunk_size=8)
    assert torch.isfinite(y).all()
    for t in range(20, 50):
        y_t, state = ska_step(q[:, t], k[:, t], v[:, t], state, eta=eta, gamma=gamma)
        assert torch.isfinite(y_t).all()
