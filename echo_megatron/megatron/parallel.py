"""One call that readies a process for building Megatron-Core models: `initialize_single_process`.

Megatron's layers read the model-parallel state (`megatron.core.parallel_state`) and draw their
initial weights from its RNG tracker, so even one process on a laptop needs a process group, the
model-parallel groups and a seeded tracker before `build_hybrid_model`. This module does exactly
that, the way `torchrun` + Megatron-LM's `initialize_megatron` would, and nothing else.
"""

from __future__ import annotations

import os
import socket

import torch

from megatron.core import parallel_state, tensor_parallel


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_single_process(seed: int = 0, tensor_model_parallel_size: int = 1) -> None:
    """Process group, Megatron model-parallel state and RNG seed for this process; idempotent.

    - Without CUDA: `echo_megatron.megatron.cpu.enable_cpu_mode()` and the gloo backend; with CUDA:
      nccl on device `LOCAL_RANK`.
    - Launched by `torchrun` (`RANK` in the environment): the launcher's `RANK`, `WORLD_SIZE`,
      `MASTER_ADDR`/`MASTER_PORT`. Otherwise a one-process group (world size 1) on a free local port.
    - `parallel_state.initialize_model_parallel(tensor_model_parallel_size)` (other parallel sizes 1),
      then `torch.manual_seed(seed)` and Megatron's `model_parallel_cuda_manual_seed(seed)`.

    Calling it again (same TP size) keeps the existing groups and re-seeds; a different TP size is an
    error (call `parallel_state.destroy_model_parallel()` first to change it).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    cuda = torch.cuda.is_available()
    if not cuda:
        from .cpu import enable_cpu_mode, install_cpu_rng_tracker

        enable_cpu_mode()
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    world = torch.distributed.get_world_size()
    if (isinstance(tensor_model_parallel_size, bool) or not isinstance(tensor_model_parallel_size, int)
            or tensor_model_parallel_size < 1 or world % tensor_model_parallel_size):
        raise ValueError(f"tensor_model_parallel_size must be an int >= 1 dividing the world size {world}, "
                         f"got {tensor_model_parallel_size!r}")
    if parallel_state.model_parallel_is_initialized():
        current = parallel_state.get_tensor_model_parallel_world_size()
        if current != tensor_model_parallel_size:
            raise ValueError(f"model parallelism is already initialised with tensor_model_parallel_size={current}, "
                             f"asked for {tensor_model_parallel_size}")
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size)
    torch.manual_seed(seed)
    if not cuda:
        install_cpu_rng_tracker()  # in case other code replaced Megatron's tracker since CPU mode was enabled
    tensor_parallel.model_parallel_cuda_manual_seed(seed)  # resets the tracker, then adds the named streams


def missing_parallel_state(needs_groups: bool = True) -> str | None:
    """What Megatron's layers need and this process lacks (None when ready): the process group and
    model-parallel groups (unless `needs_groups=False`, for callers passing their own `pg_collection`),
    and the model-parallel RNG stream that seeds their weights."""
    if needs_groups and not torch.distributed.is_initialized():
        return "torch.distributed is not initialised"
    if needs_groups and not parallel_state.model_parallel_is_initialized():
        return "Megatron's model-parallel state (megatron.core.parallel_state) is not initialised"
    states = tensor_parallel.get_cuda_rng_tracker().get_states()
    if tensor_parallel.random._MODEL_PARALLEL_RNG_TRACKER_NAME not in states:
        return "Megatron's model-parallel RNG stream is not seeded"
    return None
