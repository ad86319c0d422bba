"""One semantics across backends (issue 11): the same adversarial input through reference, torch and Triton
(interpreter, fp32) gives the same result or the same error; the default path reads no tensor on the host."""

from __future__ import annotations

import pytest
import torch

from echo_megatron.ops import ska, ska_prefill, ska_step
from echo_megatron.ops.chunked import ChunkLayout, cholesky_with_jitter, chunk_statistics, exclusive_prefix

from .common import make_inputs, rel_err

BACKENDS = ("reference", "torch", "triton")


def _run(inputs: dict, backend: str, **options) -> torch.Tensor:
    return ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend=backend,
               **options)


def _assert_same(outputs: dict[str, torch.Tensor], tol: float) -> None:
    """Same NaN pattern, same dtype, and the finite entries agree within tol (relative to their max)."""
    base = outputs["reference"]
    for backend, y in outputs.items():
        assert y.dtype == base.dtype, (backend, y.dtype, base.dtype)
        assert torch.equal(torch.isnan(y), torch.isnan(base)), backend
        finite = torch.isfinite(base)
        assert torch.isfinite(y[finite]).all(), backend
        assert rel_err(y[finite], base[finite]) <= tol, (backend, rel_err(y[finite], base[finite]))


@pytest.mark.parametrize("case", ["nan_key", "inf_value", "nan_query", "nan_key_prefix", "inf_key_none"])
def test_non_finite_inputs_give_nan_where_read_in_every_backend(case):
    """NaN/Inf propagate (no error, no host sync): to every later chunk through the statistics, to one
    output through a query. The earlier chunks and the other head stay finite and equal."""
    inputs = make_inputs(1, 40, 2, 4, 3, dtype=torch.float32, seed=1)
    options = dict(chunk_size=8, power=2)
    poison = {"nan_key": ("k", float("nan")), "inf_value": ("v", float("inf")), "nan_query": ("q", float("nan")),
              "nan_key_prefix": ("k", float("nan")), "inf_key_none": ("k", float("inf"))}[case]
    inputs[poison[0]][0, 13, 0, 1] = poison[1]
    if case == "nan_key_prefix":
        options["mode"] = "prefix"
    if case == "inf_key_none":
        options["norm"] = "none"
    outputs = {b: _run(inputs, b, **options) for b in BACKENDS}
    _assert_same(outputs, 1e-4)
    nan_tokens = torch.isnan(outputs["reference"][0, :, 0]).any(dim=-1)
    expected = torch.zeros(40, dtype=torch.bool)
    if case == "nan_query":
        expected[13] = True
    elif case == "nan_key_prefix":
        expected[:] = True
    else:
        expected[16:] = True  # chunk 1 holds token 13; chunks 2… read it
    assert torch.equal(nan_tokens, expected)
    assert torch.isfinite(outputs["reference"][0, :, 1]).all()


def test_validate_rejects_non_finite_inputs_in_every_backend():
    inputs = make_inputs(1, 20, 2, 4, 3, dtype=torch.float32)
    inputs["v"][0, 3, 1, 0] = float("nan")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="v contains NaN or Inf"):
            _run(inputs, backend, validate=True)
    with pytest.raises(ValueError, match="v contains NaN or Inf"):
        ska_prefill(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], validate=True)


def test_jitter_follows_the_key_scale_in_every_backend():
    """Repeated keys of norm 1e8 make G̃ = n·zzᵀ + λI fail Cholesky even in fp64 (λ = 1e-3 absolute with
    norm="none"); the jitter 1e-4·m² then decides the result. Backends agree only if they use one rule
    (Triton's jitter used to be 1e-4 absolute with norm="none": a readout off by orders of magnitude)."""
    gen = torch.Generator().manual_seed(2)
    key = torch.randn(1, 1, 2, 6, generator=gen, dtype=torch.float64)
    inputs = dict(q=torch.randn(1, 48, 2, 6, generator=gen, dtype=torch.float64),
                  k=(1e8 * key / key.norm(dim=-1, keepdim=True)).expand(1, 48, 2, 6).clone(),
                  v=torch.randn(1, 48, 2, 3, generator=gen, dtype=torch.float64),
                  eta=torch.ones(2, dtype=torch.float64), gamma=torch.full((2,), 1.2, dtype=torch.float64))
    layout = ChunkLayout.build(48, 16, None, torch.device("cpu"))
    visible = exclusive_prefix(chunk_statistics(inputs["k"], inputs["v"], layout, None), layout)
    jittered = cholesky_with_jitter(visible.gram + 1e-3 * torch.eye(6), visible.max_norm**2).coef
    assert (jittered[..., 1:] > 0).all()  # the case exercises the jitter
    outputs = {b: _run(inputs, b, chunk_size=16, power=1, norm="none") for b in BACKENDS}
    _assert_same(outputs, 1e-8)
    assert outputs["reference"][0, 16:].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_promote_and_never_downcast(backend):
    """An fp64 k with fp32 q, v computes in fp64 (output fp64), exactly as all-fp64 inputs would."""
    inputs = make_inputs(1, 24, 2, 4, 3, dtype=torch.float64, seed=5)
    mixed = dict(inputs, q=inputs["q"].float(), v=inputs["v"].float())
    exact = dict(inputs, q=mixed["q"].double(), v=mixed["v"].double())
    if backend == "triton":  # the interpreter runs fp32/fp16: promotion to fp32 from fp16
        mixed = dict(mixed, q=mixed["q"].half(), k=mixed["k"].float(), v=mixed["v"].half())
        exact = dict(exact, q=mixed["q"].float(), k=mixed["k"], v=mixed["v"].float())
    y = _run(mixed, backend, chunk_size=8)
    expected = _run(exact, backend, chunk_size=8)
    assert y.dtype == expected.dtype
    assert torch.equal(y, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides,match", [
    (dict(power=9), r"power must be an int in \[0, 8\]"),
    (dict(power_iters=40), r"power_iters must be an int in \[0, 32\]"),
    (dict(eps=float("inf")), "eps must be a finite number > 0"),
    (dict(mask=torch.ones(1, 12, device="meta")), "mask is on meta but q is on cpu"),
    (dict(mask=torch.full((1, 12), 2.0), validate=True), "mask must contain only 0/1"),
    (dict(cu_seqlens=torch.tensor([0, 8, 4, 12]), validate=True), "cu_seqlens must be non-decreasing"),
])
def test_bad_arguments_fail_the_same_way_in_every_backend(backend, overrides, match):
    inputs = make_inputs(1, 12, 2, 4, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        _run(inputs, backend, **overrides)


def test_decode_state_on_another_device_is_rejected():
    inputs = make_inputs(1, 8, 2, 4, 3, dtype=torch.float32)
    _, state = ska_prefill(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"])
    step = {n: torch.ones(1, 2, 4, device="meta") for n in ("q", "k")}
    with pytest.raises(ValueError, match="k is on cpu but q is on meta|state is on cpu but q is on meta"):
        ska_step(step["q"], inputs["k"][:, 0], inputs["v"][:, 0], state, eta=inputs["eta"], gamma=inputs["gamma"])


@pytest.mark.parametrize("mode", ["chunk_causal", "prefix"])
@pytest.mark.parametrize("masked", [False, True])
def test_torch_path_reads_no_tensor_on_the_host(mode, masked):
    """Forward and backward on "meta" tensors (no data at all): any .item(), .tolist(), bool(tensor) or
    .all() on the host would raise. So the default torch path has no host sync (what remains with
    cu_seqlens: the chunk count, see `ChunkLayout`)."""
    meta = dict(device="meta")
    q = torch.randn(1, 40, 2, 4, **meta, requires_grad=True)
    k = torch.randn(1, 40, 2, 4, **meta, requires_grad=True)
    v = torch.randn(1, 40, 2, 3, **meta, requires_grad=True)
    mask = torch.ones(1, 40, **meta) if masked else None
    y = ska(q, k, v, eta=torch.ones(2, **meta), gamma=torch.ones(2, **meta), chunk_size=8, mode=mode, mask=mask,
            backend="torch")
    y.sum().backward()
    assert y.shape == (1, 40, 2, 3) and k.grad.shape == k.shape
