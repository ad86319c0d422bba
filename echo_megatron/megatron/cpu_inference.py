"""CPU mode for Megatron-Core 0.19.2's dynamic inference engine (`DynamicInferenceContext`,
`TextGenerationController`, `DynamicInferenceEngine`).

Those modules allocate their bookkeeping in pinned host memory and order host/device copies with CUDA
events and streams. Without CUDA, `enable_cpu_dynamic_inference()` gives exactly those modules a view of
`torch` in which (each line: the error it fixes):

- `torch.empty` / `empty_like` / `full` ignore `pin_memory=True` ("pin_memory=True requires a CUDA or other
  accelerator backend; no pinned memory allocator is available on this system");
- `torch.cuda.Event`, `Stream` and `current_stream()` are no-op stand-ins, CPU work being synchronous
  ("Tried to instantiate dummy base class Event", "torch.cuda.Stream requires CUDA support", "Torch not
  compiled with CUDA enabled");
- the controller's NVTX `range_push` / `range_pop` do nothing ("NVTX functions not installed. Are you
  sure you have a CUDA build?");
- `MambaMixer._dynamic_inference` runs on PyTorch: Megatron's version calls Triton/CUDA kernels
  (`causal_conv1d_varlen_states` from causal-conv1d's CUDA build: "NameError: name
  'causal_conv1d_varlen_states' is not defined"; varlen SSD and slice/merge kernels), and its PyTorch
  decode fallback updates the whole slot buffer instead of the requests' slots. Here every request's
  tokens (decode: one; prefill: all of its chunk) go through Megatron's own `_ssm_decode` recurrence on
  the request's gathered (conv, ssm) slot, which is then written back: exact, O(tokens) steps.

The rest of `torch` is untouched, and nothing changes when CUDA is available. Call it after
`echo_megatron.megatron.cpu.enable_cpu_mode()`.
"""

from __future__ import annotations

import importlib
import types

import torch
from torch import Tensor

from megatron.core.ssm.mamba_mixer import MambaMixer

from echo_megatron.megatron.cpu import CPUEvent, CPUStream

INFERENCE_MODULES = (
    "megatron.core.inference.contexts.dynamic_context",
    "megatron.core.inference.text_generation_controllers.text_generation_controller",
    "megatron.core.inference.engines.dynamic_engine",
)

_enabled = False


def _unpinned(factory):
    def call(*args, pin_memory: bool = False, **kwargs):
        del pin_memory
        return factory(*args, **kwargs)

    call.__name__ = factory.__name__
    return call


class _CudaView(types.ModuleType):
    """`torch.cuda` with no-op events and streams; everything else forwarded."""

    Event = CPUEvent
    Stream = CPUStream

    def __init__(self):
        super().__init__("torch.cuda")

    @staticmethod
    def current_stream(device=None) -> CPUStream:
        return CPUStream()

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


class _TorchView(types.ModuleType):
    """`torch` for Megatron's inference modules on CPU: unpinned allocations, no-op CUDA events/streams."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaView()
        for name in ("empty", "empty_like", "full"):
            setattr(self, name, _unpinned(getattr(torch, name)))

    def __getattr__(self, name: str):
        return getattr(torch, name)


def _mamba_token(mixer: MambaMixer, zxBCdt: Tensor, conv_state: Tensor, ssm_state: Tensor, slot: int) -> Tensor:
    """One token zxBCdt [1, 1, d] of the request in `slot` -> y [1, 1, d_inner]; advances its slot.

    One request at a time: Megatron's PyTorch decode fallback broadcasts its gated norm to [b, b, d]
    for b > 1 (`patches/mamba-static-decode-batch.md`)."""
    conv, ssm = conv_state[slot : slot + 1], ssm_state[slot : slot + 1]
    return mixer._ssm_decode(zxBCdt, conv, ssm)


def _mamba_dynamic_inference_torch(self: MambaMixer, hidden_states: Tensor, context) -> tuple[Tensor, Tensor]:
    """`MambaMixer._dynamic_inference` on PyTorch: hidden_states [N, 1, d] packed as
    [one token per decode request | the prefill tokens of each prefill request] -> (out, bias)."""
    if context.num_speculative_tokens:
        raise ValueError("CPU dynamic inference does not support speculative decoding")
    conv_state, ssm_state = context.mamba_states_cache(self.layer_number - self.pp_layer_offset)
    metadata, dims = context.mamba_metadata, context.batch_dimensions
    zxBCdt, _ = self.in_proj(hidden_states)
    y = zxBCdt.new_zeros(zxBCdt.shape[0], 1, self.d_inner_local_tp)
    decode_count = dims.decode_req_count
    token_slots = metadata.batch_indices_decode[:decode_count].tolist() if decode_count else []
    if dims.prefill_req_count:
        bounds = metadata.cu_seqlens_list
        for request, slot in enumerate(metadata.batch_indices_prefill[: dims.prefill_req_count].tolist()):
            token_slots += [slot] * (bounds[request + 1] - bounds[request])
    for t, slot in enumerate(token_slots):
        y[t : t + 1] = _mamba_token(self, zxBCdt[t : t + 1], conv_state, ssm_state, slot)
    return self.out_proj(y)


def _no_nvtx_range(message: str = "") -> None:
    """NVTX ranges need a CUDA build."""


def enable_cpu_dynamic_inference() -> bool:
    """Switch Megatron's dynamic inference modules to CPU (see the module docstring).

    Returns True when active, False when CUDA is available (then nothing is changed).
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    view = _TorchView()
    for name in INFERENCE_MODULES:
        importlib.import_module(name).torch = view
    controller = importlib.import_module(INFERENCE_MODULES[1])
    controller.range_push = controller.range_pop = _no_nvtx_range
    MambaMixer._dynamic_inference = _mamba_dynamic_inference_torch
    _enabled = True
    return True
