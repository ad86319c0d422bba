"""ska()'s default path reads no tensor value on the host (no device sync, CUDA-graph capturable).

On CPU a host read costs nothing, so nothing would show a sync; these tests trap every way the host can
read a tensor's value instead — Python entry points (`item`, `tolist`, `bool(t)`, `int(t)`, `float(t)`,
`.cpu()`, `.numpy()`, `torch.cuda.synchronize`) and, through a dispatch mode, the aten ops that read a
value in C++ or that synchronise on CUDA (`_local_scalar_dense` behind every `.item()`, `nonzero`,
`masked_select`, `_linalg_check_errors` behind `torch.linalg.cholesky`, `repeat_interleave` without
`output_size`, `unique`) — and run forward and backward with `validate=False`. The torch path takes its
accelerator branch (`chunked.HOST_READ_FREE = ()`), the one CUDA tensors take. The Triton path's kernels
cannot be checked this way (the interpreter copies every tensor to NumPy): its host code is, with the
launches skipped; the GPU check covers the kernels with `torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from echo_megatron.ops import chunked, ska
from echo_megatron.ops.triton import function as triton_function

from .common import make_inputs

aten = torch.ops.aten
SYNCING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten._linalg_check_errors.default, aten.repeat_interleave.Tensor, aten._unique2.default,
               aten.unique_consecutive.default, aten.unique_dim.default}
PYTHON_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


class HostRead(AssertionError):
    """A tensor value was read on the host inside the trapped region."""


class _TrapSyncingOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            raise HostRead(f"aten op {func} reads a tensor value on the host")
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_reads_trapped(monkeypatch):
    """Raise HostRead on every host read of a tensor value inside the block (see the module docstring)."""
    with monkeypatch.context() as patch:
        for name in PYTHON_READS:
            def trap(*args, _name=name, **kwargs):
                raise HostRead(f"Tensor.{_name} reads a tensor value on the host")
            patch.setattr(torch.Tensor, name, trap)
        patch.setattr(torch.cuda, "synchronize", lambda *a, **k: (_ for _ in ()).throw(HostRead("cuda.synchronize")))
        patch.setattr(chunked, "HOST_READ_FREE", ())
        with _TrapSyncingOps():
            yield


def _forward_backward(inputs, **options):
    y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend="torch",
            **options)
    y.sum().backward()
    return y


@pytest.mark.parametrize("options", [
    dict(),
    dict(norm="none", power=0),
    dict(mode="prefix", power=1),
    dict(norm="sequence_max", mode="prefix"),
    dict(chunk_size=1, power_iters=0),
    dict(mask="random"),
], ids=["default", "none-K0", "prefix", "sequence_max", "S1", "mask"])
def test_default_path_reads_nothing_on_the_host(options, monkeypatch):
    inputs = make_inputs(2, 37, 3, 5, 4, dtype=torch.float32, requires_grad=True)
    options = {"chunk_size": 8, **options}
    if options.get("mask") == "random":
        options = dict(options, mask=(torch.rand(2, 37, generator=torch.Generator().manual_seed(1)) > 0.3).float())
    with host_reads_trapped(monkeypatch):
        y = _forward_backward(inputs, validate=False, **options)
    expected = ska(*(inputs[n].detach() for n in ("q", "k", "v")), eta=inputs["eta"].detach(),
                   gamma=inputs["gamma"].detach(), backend="torch", **options)
    torch.testing.assert_close(y.detach(), expected, rtol=0, atol=0)  # the accelerator branch: same result
    assert all(inputs[n].grad is not None and torch.isfinite(inputs[n].grad).all() for n in inputs)


@pytest.mark.parametrize("case", ["validate", "cu_seqlens", "item"])
def test_the_trap_catches_host_reads(case, monkeypatch):
    """Positive controls: the documented host reads (validate=True, the packed-sequence chunk count) and a
    plain `.item()` are caught, so the test above can fail."""
    inputs = make_inputs(1, 20, 2, 4, 3, dtype=torch.float32)
    options = dict(validate=True) if case == "validate" else dict(cu_seqlens=torch.tensor([0, 7, 20]))
    with host_reads_trapped(monkeypatch), pytest.raises(HostRead):
        if case == "item":
            inputs["q"].sum().item()
        ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend="torch",
            chunk_size=8, **options)


@pytest.mark.filterwarnings("ignore:norm=\"sequence_max\"")
@pytest.mark.parametrize("options", [
    dict(),
    dict(norm="none", power=0),
    dict(mode="prefix", norm="sequence_max"),
    dict(norm="sequence_max"),
    dict(mask="random"),
    dict(cu_seqlens=[0, 15, 37]),
], ids=["default", "none-K0", "prefix-sequence_max", "sequence_max", "mask", "cu_seqlens"])
def test_triton_host_code_reads_nothing_on_the_host(options, monkeypatch):
    """The Triton path's host code between the (skipped) kernel launches, forward and backward, from a cold
    chunk table: no host read, except the documented one for packed sequences (their chunk offsets)."""
    inputs = make_inputs(1, 37, 2, 5, 4, dtype=torch.float32, requires_grad=True)
    if options.get("mask") == "random":
        options = dict(options, mask=torch.rand(1, 37, generator=torch.Generator().manual_seed(1)) > 0.3)
    if "cu_seqlens" in options:
        options = dict(options, cu_seqlens=torch.tensor(options["cu_seqlens"]))
    monkeypatch.setattr(triton_function, "launch", lambda *args, **kwargs: None)
    triton_function._cached_chunk_table.cache_clear()
    with host_reads_trapped(monkeypatch), contextlib.ExitStack() as expect:
        if "cu_seqlens" in options:
            expect.enter_context(pytest.raises(HostRead))
        y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend="triton",
                chunk_size=8, **options)
        torch.autograd.grad(y.sum(), list(inputs.values()))


@pytest.mark.parametrize("prompt", [0, 5, 8, 13], ids=["T0=0", "T0=5", "T0=S", "T0=13"])
def test_decode_reads_nothing_on_the_host(prompt, monkeypatch):
    """ska_prefill and a chunk's worth of ska_step (one readout refresh included) on the accelerator branch
    equal the same calls untrapped (the CPU branch), with no host read."""
    from echo_megatron.ops import ska_prefill, ska_step

    inputs = make_inputs(2, prompt + 9, 3, 5, 4, dtype=torch.float32)
    q, k, v, eta, gamma = (inputs[n] for n in ("q", "k", "v", "eta", "gamma"))

    def decode():
        ys, state = [], None
        y, state = ska_prefill(q[:, :prompt], k[:, :prompt], v[:, :prompt], eta=eta, gamma=gamma, chunk_size=8)
        ys.append(y)
        for t in range(prompt, q.shape[1]):
            y, state = ska_step(q[:, t], k[:, t], v[:, t], state, eta=eta, gamma=gamma)
            ys.append(y[:, None])
        return torch.cat(ys, dim=1)

    with host_reads_trapped(monkeypatch):
        trapped = decode()
    torch.testing.assert_close(trapped, decode(), rtol=0, atol=0)


def test_triton_decode_host_code_reads_nothing_on_the_host(monkeypatch):
    """The host code of the Triton decode (launches skipped): `ska_step` at a chunk's end (the recompute
    included) and `ska_step_slots` (rows at their own positions), with no host read."""
    from echo_megatron.ops import StateSlots, ska_prefill, ska_step, ska_step_slots
    from echo_megatron.ops.triton import decode as triton_decode

    inputs = make_inputs(2, 4, 3, 5, 4, dtype=torch.float32)
    q, k, v, eta, gamma = (inputs[n] for n in ("q", "k", "v", "eta", "gamma"))
    options = dict(chunk_size=4, power=2, eps=1e-3, norm="causal_max", power_iters=6)
    _, state = ska_prefill(q[:, :3], k[:, :3], v[:, :3], eta=eta, gamma=gamma, **options)
    slots = StateSlots(4, 3, 5, 4, options, torch.float32, q.device)
    for module in (triton_function, triton_decode):
        monkeypatch.setattr(module, "launch", lambda *args, **kwargs: None)
    with host_reads_trapped(monkeypatch):
        ska_step(q[:, 3], k[:, 3], v[:, 3], state, eta=eta, gamma=gamma, backend="triton")
        ska_step_slots(q[:, 3], k[:, 3], v[:, 3], slots, torch.tensor([2, 0]), eta=eta, gamma=gamma, backend="triton")
