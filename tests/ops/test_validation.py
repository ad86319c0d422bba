"""Every bad argument gets an error that names the parameter and what is allowed."""

from __future__ import annotations

import warnings

import pytest
import torch

from echo_megatron.ops import ska, ska_prefill, ska_step
from echo_megatron.ops import validation

from .common import make_inputs


@pytest.fixture
def inputs():
    return make_inputs(1, 10, 2, 4, 3, dtype=torch.float32)


def _call(inputs, **overrides):
    args = {**inputs, **overrides}
    return ska(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("overrides,match", [
    (dict(chunk_size=0), "chunk_size must be an int >= 1"),
    (dict(chunk_size=2.5), "chunk_size must be an int >= 1"),
    (dict(power=-1), r"power must be an int in \[0, 8\]"),
    (dict(power=9), r"power must be an int in \[0, 8\]"),
    (dict(power_iters=-2), r"power_iters must be an int in \[0, 32\]"),
    (dict(power_iters=33), r"power_iters must be an int in \[0, 32\]"),
    (dict(eps=0.0), "eps must be a finite number > 0"),
    (dict(eps=-1e-3), "eps must be a finite number > 0"),
    (dict(eps=float("inf")), "eps must be a finite number > 0"),
    (dict(eps=float("nan")), "eps must be a finite number > 0"),
    (dict(validate=1), "validate must be a bool"),
    (dict(mode="causal"), r"mode must be one of \('chunk_causal', 'prefix'\)"),
    (dict(norm="l2"), r"norm must be one of \('causal_max', 'sequence_max', 'none'\)"),
    (dict(backend="cuda"), r"backend must be one of \('auto', 'torch', 'reference', 'triton'\)"),
    (dict(mask=torch.ones(1, 9)), r"mask must be a tensor of shape \[B, T\] = \(1, 10\)"),
    (dict(mask=torch.full((1, 10), 0.5), validate=True), "mask must contain only 0/1"),
    (dict(cu_seqlens=torch.tensor([1, 10]), validate=True), "cu_seqlens must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 6, 4, 10]), validate=True), "cu_seqlens must be non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9]), validate=True), "cu_seqlens must end at T = 10"),
    (dict(mask=torch.ones(1, 10, device="meta")), "mask is on meta but q is on cpu"),
    (dict(cu_seqlens=torch.tensor([0, 10], device="meta")), "cu_seqlens is on meta but q is on cpu"),
    (dict(eta=torch.ones(2, device="meta")), "eta is on meta but q is on cpu"),
    (dict(cu_seqlens=torch.tensor([0.0, 10.0])), "cu_seqlens must have an integer dtype"),
    (dict(cu_seqlens=torch.tensor([[0, 10]])), "cu_seqlens must be a 1-D integer tensor"),
    (dict(eta=torch.ones(3)), r"eta must have shape \[H\] = \(2,\)"),
    (dict(gamma=torch.ones(1, 2)), r"gamma must have shape \[H\] = \(2,\)"),
])
def test_bad_options_name_the_parameter(inputs, overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(inputs, **overrides)


def test_cu_seqlens_requires_batch_one():
    batched = make_inputs(2, 10, 2, 4, 3)
    with pytest.raises(ValueError, match="requires batch size B == 1, got B = 2"):
        _call(batched, cu_seqlens=torch.tensor([0, 10]))


@pytest.mark.parametrize("name,value,match", [
    ("q", torch.ones(1, 10, 2), r"q must have shape \[B, T, H, r\]"),
    ("k", torch.ones(1, 10, 2, 5), "q and k must have the same shape"),
    ("v", torch.ones(1, 9, 2, 3), "v must have shape"),
])
def test_bad_shapes(inputs, name, value, match):
    with pytest.raises(ValueError, match=match):
        _call(inputs, **{name: value})


def test_integer_inputs_are_rejected(inputs):
    with pytest.raises(TypeError, match="q must have a floating dtype"):
        _call(inputs, q=torch.ones(1, 10, 2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        _call(inputs, v=[[1.0]])


def test_sequence_max_with_chunk_causal_warns_once(inputs, monkeypatch):
    monkeypatch.setattr(validation, "_warned_sequence_max", False)
    with pytest.warns(UserWarning, match="non-causal"):
        _call(inputs, norm="sequence_max")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call(inputs, norm="sequence_max")
        _call(inputs, norm="sequence_max", mode="prefix")


def test_decode_arguments(inputs):
    q, k, v, eta, gamma = (inputs[n] for n in ("q", "k", "v", "eta", "gamma"))
    with pytest.raises(ValueError, match=r"norm must be one of \('causal_max', 'none'\)"):
        ska_prefill(q, k, v, eta=eta, gamma=gamma, norm="sequence_max")
    _, state = ska_prefill(q, k, v, eta=eta, gamma=gamma)
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, r\]"):
        ska_step(q[:, 0, None], k[:, 0], v[:, 0], state, eta=eta, gamma=gamma)
    with pytest.raises(ValueError, match="to match the state"):
        ska_step(q[:, 0, :, :3], k[:, 0, :, :3], v[:, 0], state, eta=eta, gamma=gamma)
    with pytest.raises(TypeError, match="state must be an SKAState"):
        ska_step(q[:, 0], k[:, 0], v[:, 0], {}, eta=eta, gamma=gamma)
