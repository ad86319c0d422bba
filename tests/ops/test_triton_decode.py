"""The Triton decode step (issue 18 item 5) under the interpreter equals the torch step: `ska_step` (one launch
per token, plus the readout recompute at a chunk's end) and `ska_step_slots` (requests at different positions,
in place, recompute only for the rows that complete a chunk), on awkward sizes (r = 20, P = 12, several heads,
batch 2) and across chunk boundaries; prefill + steps equals the parallel forward."""

from __future__ import annotations

import pytest
import torch

from echo_megatron.ops import StateSlots, ska, ska_prefill, ska_step, ska_step_slots
from echo_megatron.ops.triton import runtime

from .common import make_inputs, rel_err

S = 4
OPTIONS = dict(chunk_size=S, power=2, eps=1e-3, norm="causal_max", power_iters=6)
# interpreter vs torch: the same sums in another order (y = η R q summed along r; the readout by the dense kernel)
# (relative to the largest entry; fp32: the dense kernel's tf32x3 readout against torch's fp32 one)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-4, torch.float16: 5e-3}
PARALLEL_TOLERANCE = {torch.float64: 1e-11, torch.float32: 1e-4, torch.float16: 1e-2}  # relative to max |y|


def _state_tensors(state) -> list[torch.Tensor]:
    return [*state.completed, *state.partial, state.last_key, state.readout]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.float64, marks=pytest.mark.slow)], ids=str)
def test_kernel_step_equals_torch_step_and_the_parallel_forward(dtype):
    """Prefill 2 tokens, then 4 steps (positions 2, 3 | 0, 1: one chunk completes, its readout is recomputed):
    y and the whole state equal the torch step at every step, and prefill + steps equals `ska`. Each step is
    one kernel launch, and the chunk's last one launches the dense kernel's recompute too."""
    inputs = make_inputs(2, 6, 2, 20, 12, dtype=dtype, seed=3)
    q, k, v, eta, gamma = (inputs[n] for n in ("q", "k", "v", "eta", "gamma"))
    y, state = ska_prefill(q[:, :2], k[:, :2], v[:, :2], eta=eta, gamma=gamma, **OPTIONS)
    outputs, launches = [y], []
    for t in range(2, 6):
        with runtime.recording(run=True) as recorded:
            y_kernel, kernel = ska_step(q[:, t], k[:, t], v[:, t], state, eta=eta, gamma=gamma, backend="triton")
        launches.append([launch.name for launch in recorded])
        y_torch, state = ska_step(q[:, t], k[:, t], v[:, t], state, eta=eta, gamma=gamma, backend="torch")
        assert y_kernel.dtype == dtype and kernel.position == state.position
        assert rel_err(y_kernel, y_torch) <= TOLERANCE[dtype]
        for a, b in zip(_state_tensors(kernel), _state_tensors(state)):
            assert rel_err(a, b) <= TOLERANCE[dtype]
        outputs.append(y_kernel[:, None])
        state = kernel  # continue from the kernel's state
    expected = ska(q, k, v, eta=eta, gamma=gamma, backend="torch", **{n: OPTIONS[n] for n in ("chunk_size", "power")})
    assert rel_err(torch.cat(outputs, dim=1), expected) <= PARALLEL_TOLERANCE[dtype]  # as tests/ops/test_decode.py
    step, recompute = "decode_step_kernel", "readout_matrix_fwd_kernel"
    assert launches == [[step], [step, recompute], [step], [step]]


def test_kernel_step_leaves_the_old_state_unchanged():
    inputs = make_inputs(1, 4, 2, 20, 12, dtype=torch.float32)
    q, k, v, eta, gamma = (inputs[n] for n in ("q", "k", "v", "eta", "gamma"))
    _, state = ska_prefill(q[:, :2], k[:, :2], v[:, :2], eta=eta, gamma=gamma, **OPTIONS)
    before = [x.clone() for x in _state_tensors(state)]
    ska_step(q[:, 2], k[:, 2], v[:, 2], state, eta=eta, gamma=gamma, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(_state_tensors(state), before))


def _slot_states(inputs, tokens: dict[int, int], n_slots: int = 5) -> StateSlots:
    """Slots where slot s has seen tokens[s] tokens of its own sequence (row s of `inputs`)."""
    q, k, v, eta, gamma = (inputs[n] for n in ("q", "k", "v", "eta", "gamma"))
    heads, rank, value_dim = q.shape[2], q.shape[3], v.shape[3]
    slots = StateSlots(n_slots, heads, rank, value_dim, OPTIONS, torch.float32, q.device)
    for slot, seen in tokens.items():
        row = slice(slot, slot + 1)
        _, state = ska_prefill(q[row, :seen], k[row, :seen], v[row, :seen], eta=eta, gamma=gamma, **OPTIONS)
        for stored, new in zip([*slots.completed, *slots.partial, slots.last_key, slots.readout],
                               _state_tensors(state)):
            stored[slot].copy_(new[0])
        slots.tokens[slot] = seen
    return slots


def test_slots_kernel_equals_torch_with_rows_at_different_positions():
    """Requests in slots 3 and 1 at positions 3 and 1 (slot 3 completes its chunk on the first step, slot 1 on
    the third; the other slots are left alone): y and every slot equal the torch path, and each request's y
    equals `ska_step` of that request alone. Two launches a step, whatever completes."""
    inputs = make_inputs(5, 10, 2, 20, 12, dtype=torch.float32, seed=1)
    q, k, v, eta, gamma = (inputs[n] for n in ("q", "k", "v", "eta", "gamma"))
    seen = {3: 7, 1: 5}
    kernel, reference = _slot_states(inputs, seen), _slot_states(inputs, seen)
    alone = {slot: ska_prefill(q[slot:slot + 1, :n], k[slot:slot + 1, :n], v[slot:slot + 1, :n], eta=eta,
                               gamma=gamma, **OPTIONS)[1] for slot, n in seen.items()}
    rows = torch.tensor([3, 1])
    for step in range(3):
        t = [seen[3] + step, seen[1] + step]
        qs, ks, vs = (x[rows, t] for x in (q, k, v))
        with runtime.recording(run=True) as recorded:
            y_kernel = ska_step_slots(qs, ks, vs, kernel, rows, eta=eta, gamma=gamma, backend="triton")
        # every step: the step kernel and the recompute of the listed completions (none on the second step)
        assert [launch.name for launch in recorded] == ["decode_step_kernel", "readout_matrix_fwd_kernel"]
        y_torch = ska_step_slots(qs, ks, vs, reference, rows, eta=eta, gamma=gamma, backend="torch")
        assert rel_err(y_kernel, y_torch) <= TOLERANCE[torch.float32]
        for i, slot in enumerate(rows.tolist()):
            y_alone, alone[slot] = ska_step(qs[i:i + 1], ks[i:i + 1], vs[i:i + 1], alone[slot], eta=eta, gamma=gamma,
                                            backend="torch")
            torch.testing.assert_close(y_torch[i:i + 1], y_alone, rtol=1e-6, atol=1e-6)
    for a, b in zip(kernel.tensors(), reference.tensors()):
        assert rel_err(a, b) <= TOLERANCE[torch.float32]
    assert torch.equal(kernel.tokens, reference.tokens)
    assert kernel.tokens[:, 0].tolist() == [0, 8, 0, 10, 0]
    assert not any(x[[0, 2, 4]].any() for x in kernel.tensors())  # untouched slots stay empty
