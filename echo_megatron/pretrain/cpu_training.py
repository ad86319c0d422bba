"""`--cpu`: every fix that lets `megatron.training.pretrain()` (megatron-core 0.19.2) run without CUDA.

`enable()` refuses to run when CUDA is available, so none of this is ever active on a GPU machine.
It first switches on echo-megatron's CPU mode for the models (`echo_megatron.megatron.cpu`: Mamba-2 in
plain PyTorch, CPU RNG tracker, no-op synchronize, CPU masks), then applies the fixes below to
megatron.training, each named after the error it fixes. Everything else is stock Megatron over gloo.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.overrides import TorchFunctionMode

from echo_megatron.megatron.cpu import CPUStream, enable_cpu_mode

_applied = False


def enable() -> None:
    """Apply every CPU fix (idempotent). Raises RuntimeError when CUDA is available."""
    global _applied
    if torch.cuda.is_available():
        raise RuntimeError("--cpu is for machines without CUDA, but CUDA is available here: drop --cpu")
    if _applied:
        return
    enable_cpu_mode()
    for fix in FIXES:
        fix()
    _applied = True


@contextlib.contextmanager
def _one_fake_device():
    """Make torch report one CUDA device (and ignore set_device) inside the block."""
    count, set_device = torch.cuda.device_count, torch.cuda.set_device
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    try:
        yield
    finally:
        torch.cuda.device_count, torch.cuda.set_device = count, set_device


def _with_one_fake_device(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _one_fake_device():
            return function(*args, **kwargs)

    return wrapper


def allow_no_cuda() -> None:
    """`pretrain()` calls `initialize_megatron()`, which fails with `AssertionError: Megatron requires
    CUDA.`; pass `allow_no_cuda=True`."""
    from megatron.training import training

    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)


def model_parallel_without_devices() -> None:
    """With `torch.cuda.device_count() == 0`, `_initialize_distributed` silently skips
    `mpu.initialize_model_parallel` (later: `AssertionError: tensor model parallel group is not
    initialized`) and `_set_random_seed` skips `model_parallel_cuda_manual_seed` (later: `rng state
    model-parallel-rng is not added`). Run both as with one device (CPU mode's RNG tracker seeds)."""
    from megatron.training import initialize

    initialize._initialize_distributed = _with_one_fake_device(initialize._initialize_distributed)
    initialize._set_random_seed = _with_one_fake_device(initialize._set_random_seed)


def no_device_arch() -> None:
    """`validate_args` asks `get_device_arch_version()` (for TP/CP > 1 and FSDP), which queries
    cuda:0: `AssertionError: Torch not compiled with CUDA enabled`. Report architecture 0 (pre-Blackwell
    rules apply)."""
    from megatron.training import arguments

    arguments.get_device_arch_version = lambda: 0


def one_device_connection() -> None:
    """`validate_args` with TP/CP > 1: `AssertionError: Using tensor model parallelism or context
    parallelism require setting the environment variable CUDA_DEVICE_MAX_CONNECTIONS to 1` (a CUDA
    stream-ordering setting, meaningless on the CPU). Set it unless the user did."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def cpu_streams() -> None:
    """DDP wrapping (`megatron.training.models.dist_utils._ddp_wrap`) creates a side stream:
    `RuntimeError: torch.cuda.Stream requires CUDA support`. Streams become `CPUStream`s and
    `torch.cuda.stream(...)` a no-op context."""
    torch.cuda.Stream = CPUStream
    torch.cuda.current_stream = lambda device=None: CPUStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def no_cuda_rng() -> None:
    """The rerun state machine and checkpoints save/restore `torch.cuda.get_rng_state()` next to the CPU
    generator's state: `AssertionError: Torch not compiled with CUDA enabled`. There is no CUDA
    generator: report the CPU generator's state (saved and restored on its own as 'rng_state') and make
    restoring the CUDA one a no-op; `torch.cuda.manual_seed` is already a lazy no-op without CUDA."""
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": None


class CudaToCPU(TorchFunctionMode):
    """Torch-function mode that turns `device="cuda"` arguments, `.cuda()` and `.to("cuda")` into the CPU,
    and makes `tensor.type()` name the CUDA type ('torch.cuda.FloatTensor') Megatron asserts on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _is_cuda(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


def cuda_tensors_on_cpu() -> None:
    """megatron.training and megatron.core create tensors with `device='cuda'` / `.cuda()` in about
    50 places (loss reductions, grad-norm buffers, timers, checkpoint metadata): `RuntimeError: Found
    no NVIDIA driver` / `Torch not compiled with CUDA enabled`. Keep them on the CPU (`CudaToCPU`).
    Also `clip_grad_by_total_norm_fp32` and the optimizers' `assert param.grad.type() ==
    'torch.cuda.FloatTensor'` (bare `AssertionError`): `CudaToCPU` answers with the CUDA type name."""
    CudaToCPU().__enter__()


def jit_warmup_keeps_the_cpu_generator() -> None:
    """`pretrain()` warms up the fused kernels (`initialize._warmup_jit_function`) between seeding and
    building the model, with `torch.rand(..., device="cuda")` inputs and dropout sized by
    `seq_length // context_parallel_size`, `ffn_hidden_size // tensor_model_parallel_size` and
    `--sequence-parallel`. On a GPU these draws come from the CUDA generator; on the CPU (`CudaToCPU`)
    they consume the CPU generator that `--use-cpu-initialization` initialises the weights from, so the
    initial weights silently depended on the parallel layout (`--context-parallel-size 2` started from
    other weights than CP = 1: 0.6% higher loss at iteration 1). Run the warmup on a forked CPU
    generator, so the weights depend on `--seed` only, as on GPUs."""
    from megatron.training import initialize

    warmup = initialize._warmup_jit_function

    @functools.wraps(warmup)
    def warmup_on_forked_generator(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return warmup(*args, **kwargs)

    initialize._warmup_jit_function = warmup_on_forked_generator


FIXES = (allow_no_cuda, model_parallel_without_devices, no_device_arch, one_device_connection,
         cpu_streams, no_cuda_rng, cuda_tensors_on_cpu, jit_warmup_keeps_the_cpu_generator)
"""Applied in this order by `enable()`."""
