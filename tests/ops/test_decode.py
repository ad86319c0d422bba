"""Constant-memory decoding equals the parallel chunked forward (SPEC §4)."""

from __future__ import annotations

import pytest
import torch

from echo_megatron.ops import SKAState, ska, ska_prefill, ska_step

from .common import make_inputs, rel_err


def _prefill_then_decode(inputs: dict, prompt_len: int, **options) -> tuple[torch.Tensor, list[int]]:
    """Outputs of prefill(prompt) + one step per remaining token, and state.nbytes after each step."""
    q, k, v, eta, gamma = (inputs[n] for n in ("q", "k", "v", "eta", "gamma"))
    y, state = ska_prefill(q[:, :prompt_len], k[:, :prompt_len], v[:, :prompt_len], eta=eta, gamma=gamma,
                           **options)
    outputs, sizes = [y], [state.nbytes]
    for t in range(prompt_len, q.shape[1]):
        y_t, state = ska_step(q[:, t], k[:, t], v[:, t], state, eta=eta, gamma=gamma)
        outputs.append(y_t[:, None])
        sizes.append(state.nbytes)
    return torch.cat(outputs, dim=1), sizes


@pytest.mark.parametrize("prompt_len", [0, 1, 63, 64, 130])
@pytest.mark.parametrize("power,norm", [(2, "causal_max"), (1, "none"), (0, "causal_max")])
def test_prefill_plus_steps_equals_parallel_forward_fp64(prompt_len, power, norm):
    inputs = make_inputs(2, prompt_len + 200 if prompt_len < 64 else 260, 3, 5, 7, seed=prompt_len)
    options = dict(chunk_size=16, power=power, norm=norm)
    decoded, sizes = _prefill_then_decode(inputs, prompt_len, **options)
    parallel = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], **options)
    assert rel_err(decoded, parallel) <= 1e-11
    assert len(set(sizes)) == 1


def test_decode_fp32_and_default_chunk():
    inputs = make_inputs(1, 200, 2, 24, 32, dtype=torch.float32, seed=1)
    decoded, _ = _prefill_then_decode(inputs, 70)
    parallel = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"])
    assert decoded.dtype == torch.float32
    assert rel_err(decoded, parallel) <= 1e-4


def test_decode_half_precision_inputs_keep_fp32_state():
    inputs = make_inputs(1, 40, 2, 8, 8, dtype=torch.bfloat16, seed=2)
    decoded, _ = _prefill_then_decode(inputs, 5, chunk_size=8)
    parallel = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], chunk_size=8)
    _, state = ska_prefill(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"])
    assert decoded.dtype == torch.bfloat16 and state.readout.dtype == torch.float32
    assert rel_err(decoded, parallel) <= 1e-2


def test_state_size_is_the_documented_count():
    batch, heads, rank, value_dim = 2, 3, 5, 7
    inputs = make_inputs(batch, 10, heads, rank, value_dim, dtype=torch.float32)
    _, state = ska_prefill(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"])
    floats_per_head = 4 * rank**2 + 3 * value_dim * rank + rank + 2
    assert isinstance(state, SKAState)
    assert state.nbytes == batch * heads * floats_per_head * 4


def test_empty_prompt_state_reads_zero():
    inputs = make_inputs(1, 3, 2, 4, 3)
    y, state = ska_prefill(inputs["q"][:, :0], inputs["k"][:, :0], inputs["v"][:, :0], eta=inputs["eta"],
                           gamma=inputs["gamma"])
    assert y.shape == (1, 0, 2, 3) and state.position == 0
    y_t, _ = ska_step(inputs["q"][:, 0], inputs["k"][:, 0], inputs["v"][:, 0], state, eta=inputs["eta"],
                      gamma=inputs["gamma"])
    assert torch.equal(y_t, torch.zeros_like(y_t))
