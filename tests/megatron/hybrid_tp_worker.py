"""torchrun --nproc-per-node 2 -m tests.megatron.hybrid_tp_worker <dir>: the Echo hybrid at TP=2 == TP=1.

Per setting (dtype, sequence parallel): build "M*M-" at TP=1 (two data-parallel replicas) with
distinct per-head η, ρ, record logits, the gradients w.r.t. the decoder input, η, ρ and two norms,
save a distributed checkpoint; load it at TP=2 into a differently seeded model and compare; save at
TP=2, load at TP=1 into a third model and compare again. Prints "PASSED <setting>" on rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, gather_from_tensor_model_parallel_region

from echo_megatron.megatron.cpu import enable_cpu_mode

from .common import VOCAB, initialize_model_parallel, ska_modules, tiny_model

SEQ, BATCH, HIDDEN = 24, 2, 64
# (dtype, sequence_parallel, rtol of logits and input gradient, rtol of the per-head gradients).
# fp32 per-head gradients sum many tokens through Cholesky solves: ~3e-5 apart between TP sizes.
SETTINGS = [(torch.float64, False, 1e-10, 1e-10), (torch.float64, True, 1e-10, 1e-10), (torch.float32, True, 1e-5, 1e-4)]


def build(tp: int, sequence_parallel: bool, dtype: torch.dtype, seed: int):
    initialize_model_parallel(tp, seed)
    return tiny_model(seed=seed, tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel and tp > 1,
                      ska_zero_init_output=False, seq_length=SEQ, params_dtype=dtype)


def run(model) -> dict[str, torch.Tensor]:
    """Logits, decoder-input gradient, η/ρ and their gradients, norm gradients (all complete) on a fixed batch."""
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(SEQ, BATCH, HIDDEN, generator=generator).to(model.config.params_dtype)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    sequence_parallel = model.config.sequence_parallel
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    local = inputs.chunk(tp_size, dim=0)[tp_rank] if sequence_parallel else inputs
    local = local.clone().requires_grad_(True)
    logits = model(None, None, None, decoder_input=local, runtime_gather_output=True)  # [b, s, V]
    F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum").backward()
    input_grad = local.grad
    if sequence_parallel:
        input_grad = gather_from_sequence_parallel_region(input_grad, tensor_parallel_output_grad=False)
    result = {"logits": logits.detach(), "input_grad": input_grad}
    for name in ("decoder.layers.1.input_layernorm.weight", "decoder.final_norm.weight"):
        param, grad = model.get_parameter(name), model.get_parameter(name).grad.clone()
        if sequence_parallel:  # replicated norms see a sequence shard: the trainer sums their grads over TP
            assert param.sequence_parallel, name
            torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        result[f"{name}.grad"] = grad
    for i, layer in enumerate(ska_modules(model)):
        for name in ("eta", "rho"):
            param = getattr(layer, name)
            result[f"{name}{i}"] = gather_from_tensor_model_parallel_region(param.detach())
            result[f"{name}{i}.grad"] = gather_from_tensor_model_parallel_region(param.grad)
    return result


def compare(expected: dict, actual: dict, rtol: float, rtol_grads: float, what: str) -> None:
    for key, want in expected.items():
        tolerance = rtol_grads if key.endswith(".grad") else rtol
        error = ((actual[key] - want).norm() / want.norm()).item()
        if not error <= tolerance:
            raise AssertionError(f"{what}: {key} differs, relative error {error:.3e} > {tolerance}")


def save(model, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))


def load(model, directory: Path) -> None:
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(directory)))


def main(out_dir: Path) -> None:
    enable_cpu_mode()
    torch.distributed.init_process_group("gloo")
    for dtype, sequence_parallel, rtol, rtol_grads in SETTINGS:
        tag = f"{str(dtype).removeprefix('torch.')}_sp{int(sequence_parallel)}"
        model = build(1, sequence_parallel, dtype, seed=1)
        with torch.no_grad():  # distinct per-head values, so a mis-mapped or truncated head shows
            for layer in ska_modules(model):
                layer.eta.copy_(1.0 + 0.1 * torch.arange(layer.eta.numel()))
                layer.rho.copy_(-1.0 + 0.5 * torch.arange(layer.rho.numel()))
        reference = run(model)
        save(model, out_dir / f"{tag}_tp1")

        model = build(2, sequence_parallel, dtype, seed=2)
        load(model, out_dir / f"{tag}_tp1")
        compare(reference, run(model), rtol, rtol_grads, f"TP=1 -> TP=2 ({tag})")
        save(model, out_dir / f"{tag}_tp2")

        model = build(1, sequence_parallel, dtype, seed=3)
        load(model, out_dir / f"{tag}_tp2")
        compare(reference, run(model), rtol, rtol_grads, f"TP=2 -> TP=1 ({tag})")
        if torch.distributed.get_rank() == 0:
            print(f"PASSED {tag}", flush=True)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
