"""torchrun --nproc-per-node 2 -m tests.megatron.cpu_init_tp_worker: CPU initialisation does not depend on TP.

With `use_cpu_initialization` Megatron draws each parallel linear's full master weight and keeps this rank's
part, so a model built at TP=2 must start from exactly the weights of the same model built at TP=1. Builds
"*-*-" (SKA + MLP, non-zero SKA output projection) at TP=1 and TP=2 with one seed, gathers every TP shard to
its full tensor and compares bit for bit. Prints "PASSED" on rank 0.
"""

from __future__ import annotations

import torch

from megatron.core import parallel_state

from echo_megatron.megatron.cpu import enable_cpu_mode

from .common import initialize_model_parallel, tiny_model

PATTERN, SEED = "*-*-", 5


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The TP=1 tensor of a TP shard: gathered per fused section (`partition_sizes`, e.g. SKA's q | k | v)
    or per stride (e.g. the [gate | up] halves of a GLU fc1); replicated parameters as they are."""
    if not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    dim, stride = param.partition_dim, param.partition_stride
    sections = getattr(param, "partition_sizes", None) or [param.shape[dim] // stride] * stride
    group = parallel_state.get_tensor_model_parallel_group()
    full_sections = []
    for section in param.detach().split(list(sections), dim):
        shards = [torch.empty_like(section) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(shards, section.contiguous(), group=group)
        full_sections.append(torch.cat(shards, dim))
    return torch.cat(full_sections, dim)


def initial_parameters(tp: int) -> dict[str, torch.Tensor]:
    initialize_model_parallel(tp, SEED)
    model = tiny_model(PATTERN, seed=SEED, tensor_model_parallel_size=tp, ska_zero_init_output=False)
    return {name: full_tensor(param) for name, param in model.named_parameters()}


def main() -> None:
    enable_cpu_mode()
    torch.distributed.init_process_group("gloo")
    reference, sharded = initial_parameters(1), initial_parameters(2)
    assert sorted(reference) == sorted(sharded)
    assert any(".self_attention.in_proj." in name for name in reference)
    for name, want in reference.items():
        got = sharded[name]
        if got.shape != want.shape or not torch.equal(got, want):
            rows = (got - want).abs().reshape(want.shape[0], -1).amax(1).nonzero().flatten().tolist()
            raise AssertionError(f"{name}: TP=2 initial value differs from TP=1 in rows {rows}")
    if torch.distributed.get_rank() == 0:
        print(f"PASSED {len(reference)} parameters", flush=True)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
