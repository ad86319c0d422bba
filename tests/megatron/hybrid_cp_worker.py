"""torchrun --nproc-per-node N -m tests.megatron.hybrid_cp_worker <tp> <dtype:norm:power[:sp]>...: the Echo hybrid "M*M-" with
context parallelism CP = N / tp equals CP = 1, logits and every parameter gradient.

Per setting "<dtype>:<norm>:<power>[:sp]" (e.g. "float64:causal_max:2", ":sp" = sequence parallel): build the model at CP = 1 (the other ranks are data-parallel replicas)
with distinct per-head η, ρ; run a fixed batch; then build it at CP = N / tp from the same state dict, give
each rank its tokens exactly as `megatron.core.utils.get_batch_on_this_cp_rank` does, sum the local
cross-entropy, backward, and all-reduce every gradient over the CP group (Megatron's DP×CP gradient
reduction). Compare the local logits with the CP = 1 logits of the same tokens and every gradient: fp64 within
1e-10; fp32 within max(1e-5, 4 × the fp32-vs-fp64 round-off of the CP = 1 run). Prints "PASSED <setting> ..."
on rank 0.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.utils import get_batch_on_this_cp_rank

from echo_megatron.megatron.cpu import enable_cpu_mode, install_cpu_rng_tracker

from .common import VOCAB, ska_modules, tiny_model

SEQ, BATCH = 64, 2  # CP = 2 cuts each sequence into 4 segments of 16 tokens: 2 chunks of S = 8
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# Megatron's own Mamba context parallelism (all-to-all to a head split) moves its gated-norm weight gradient by
# ~4e-8 relative between CP = 1 and CP = 2 even with no SKA layer (pattern "M-M-", fp64): checked at 1e-5.
MAMBA_NORM_GRAD = "mixer.norm.weight.grad"


def build(tp: int, cp: int, dtype: torch.dtype, norm: str, power: int, sequence_parallel: bool,
          state: dict | None = None):
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    install_cpu_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    model = tiny_model(seed=1, tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sequence_parallel,
                       ska_zero_init_output=False, seq_length=SEQ, params_dtype=dtype, ska_norm=norm, ska_power=power)
    if state is not None:
        model.load_state_dict(state)
    return model


def run(model, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits [b, s_local, V] and every parameter gradient (complete over TP, summed over CP)."""
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    batch = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "position_ids": position_ids},
                                      is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group())
    logits = model(batch["tokens"], batch["position_ids"], None, runtime_gather_output=True)
    F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), reduction="sum").backward()
    result = {"logits": logits.detach()}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        torch.distributed.all_reduce(grad, group=parallel_state.get_context_parallel_group())
        if getattr(param, "sequence_parallel", False):  # replicated norms see a sequence shard: summed over TP
            torch.distributed.all_reduce(grad, group=tp_group)
        if getattr(param, "tensor_model_parallel", False) and parallel_state.get_tensor_model_parallel_world_size() > 1:
            grad = _gather_tp(grad, param.partition_dim, tp_group)
        result[f"{name}.grad"] = grad
    return result


def _gather_tp(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def full_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if torch.is_tensor(tensor)}


def relative_errors(actual: dict, expected: dict) -> dict[str, float]:
    return {key: ((actual[key].double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()
            for key, want in expected.items()}


def check_setting(tp: int, cp: int, setting: str, tokens: torch.Tensor, labels: torch.Tensor) -> str:
    """One "<dtype>:<norm>:<power>" setting; returns the line to print."""
    dtype_name, norm, power, *flags = setting.split(":")
    dtype, power, sequence_parallel = getattr(torch, dtype_name), int(power), flags == ["sp"]
    model = build(tp, 1, dtype, norm, power, sequence_parallel)
    with torch.no_grad():  # distinct per-head values, so a mis-mapped head shows
        for layer in ska_modules(model):
            layer.eta.copy_(1.0 + 0.1 * torch.arange(layer.eta.numel()))
            layer.rho.copy_(-1.0 + 0.5 * torch.arange(layer.rho.numel()))
    state = full_state(model)
    reference = run(model, tokens, labels)
    tolerance = {key: TOLERANCE[torch.float32 if key.endswith(MAMBA_NORM_GRAD) else dtype] for key in reference}
    if dtype != torch.float64:
        # fp32 round-off through the model's solves reaches ~1e-4 on whole-model gradients (already between
        # CP = 1 in fp32 and in fp64): CP may differ by at most 4x that round-off, and never need beat 1e-5.
        round_off = relative_errors(reference, run(build(tp, 1, torch.float64, norm, power, sequence_parallel, state), tokens,
                                                  labels))
        tolerance = {key: max(tolerance[key], 4 * round_off[key]) for key in reference}
    actual = run(build(tp, cp, dtype, norm, power, sequence_parallel, state), tokens, labels)
    cp_group = parallel_state.get_context_parallel_group()
    reference["logits"] = get_batch_on_this_cp_rank({"x": reference["logits"]}, is_hybrid_cp=False,
                                                    cp_group=cp_group)["x"]
    errors = relative_errors(actual, reference)
    failed = {key: f"{error:.3e} > {tolerance[key]:.1e}" for key, error in errors.items() if not error <= tolerance[key]}
    if failed:
        raise AssertionError(f"CP={cp} TP={tp} ({setting}): relative errors above tolerance: {failed}")
    worst = max((key for key in errors if not key.endswith(MAMBA_NORM_GRAD)), key=errors.get)
    mamba_norm = max(error for key, error in errors.items() if key.endswith(MAMBA_NORM_GRAD))
    return (f"PASSED {setting} worst {errors[worst]:.2e} ({worst}, tolerance {tolerance[worst]:.1e}); "
            f"Mamba gated-norm weight grads {mamba_norm:.2e}")


def main(tp: int, settings: list[str]) -> None:
    enable_cpu_mode()
    torch.distributed.init_process_group("gloo")
    cp = torch.distributed.get_world_size() // tp
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    for setting in settings:
        line = check_setting(tp, cp, setting, tokens, labels)
        if torch.distributed.get_rank() == 0:
            print(line, flush=True)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
