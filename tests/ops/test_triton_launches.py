"""Host glue of the Triton path (issue 18): a warm forward+backward is a few kernel launches and few torch ops.

A warmed-up `ska(..., backend="triton")` forward and backward at r = 64 runs under the interpreter while
every kernel launch and every aten call made outside a launch is counted (the interpreter's own work inside
a launch — copies to NumPy and back — is not). The gradients are taken at SKA's inputs with
`torch.autograd.grad`, as inside a model, where q, k, v, η and γ̂ are not leaves: so autograd's bookkeeping
between the stages counts, but no AccumulateGrad (which `.backward()` adds, a `detach` per leaf).
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from echo_megatron.ops import ska
from echo_megatron.ops.triton import function as tfn

from .common import GRAD_NAMES, make_inputs

# statistics and scan in one walk, dense with the readout and the recomputation of visible statistics
# (`ChunkCausal`), and each one's backward (issue 18's goal was 8)
MAX_LAUNCHES = 4
MAX_ATEN_CALLS = 19  # 17 output allocations and the dη, dγ̂ sums (issue 18's goal was 24)


class _AtenCalls(TorchDispatchMode):
    """Records every aten call made while `paused` is False."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def _forward_backward(inputs: dict, d_y: torch.Tensor) -> list[torch.Tensor]:
    y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend="triton",
            chunk_size=64)
    return [y, *torch.autograd.grad(y, [inputs[n] for n in GRAD_NAMES], d_y)]


def test_warm_forward_backward_is_few_launches_and_aten_calls(monkeypatch):
    inputs = make_inputs(1, 128, 1, 64, 64, dtype=torch.float32, requires_grad=True)
    d_y = torch.randn(1, 128, 1, 64, generator=torch.Generator().manual_seed(1))
    warm = _forward_backward(inputs, d_y)  # loads the kernels, builds the chunk table and device constants

    aten = _AtenCalls()
    launches = []
    run_kernel = tfn.launch

    def counted_launch(kernel, grid, *args, **kwargs):
        launches.append(kernel.__name__)
        aten.paused = True
        try:
            run_kernel(kernel, grid, *args, **kwargs)
        finally:
            aten.paused = False

    monkeypatch.setattr(tfn, "launch", counted_launch)
    with aten:
        counted = _forward_backward(inputs, d_y)
    for name, a, b in zip(["y", *GRAD_NAMES], counted, warm):  # counting changed nothing
        assert torch.equal(a, b), name
    by_op = collections.Counter(aten.calls).most_common()
    assert len(launches) <= MAX_LAUNCHES, launches
    assert len(aten.calls) <= MAX_ATEN_CALLS, f"{len(aten.calls)} aten calls: {by_op}"


def test_cached_tensors_made_under_inference_mode_serve_training():
    """The chunk table and the device constants are cached on the first call; when that call runs under
    `torch.inference_mode` (generation before training), a training call still saves them for the backward."""
    tfn._cached_chunk_table.cache_clear()
    tfn.device_constants.cache_clear()
    inputs = make_inputs(1, 20, 1, 5, 3, dtype=torch.float32, requires_grad=True)
    options = dict(eta=inputs["eta"], gamma=inputs["gamma"], backend="triton", chunk_size=8, mode="prefix")
    with torch.inference_mode():
        served = ska(inputs["q"], inputs["k"], inputs["v"], **options)
    y = ska(inputs["q"], inputs["k"], inputs["v"], **options)
    assert torch.equal(y.detach(), served)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(y.sum(), list(inputs.values())))
