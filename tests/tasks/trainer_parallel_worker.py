"""torchrun --nproc-per-node 2 -m tests.tasks.trainer_parallel_worker <dir>: the MQAR trainer at DP=2 and
at TP=2 + sequence parallel, from the same initial weights, on the same global batches.

1. TP=1 over 2 ranks (data parallel 2): build the tiny model, save its initial weights (a distributed
   checkpoint, ``<dir>/init``), train ``STEPS`` steps, save ``<dir>/dp2``.
2. TP=2 with sequence parallel (data parallel 1): build the model with another seed, load ``<dir>/init``,
   train the same steps, save ``<dir>/tp2``.
Rank 0 writes both training histories to ``<dir>/histories.json``. test_trainer.py trains the same
model in one process (DP=1, TP=1) and compares losses, gradient norms and final weights.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state

from echo_megatron.tasks import mqar_benchmark, trainer

STEPS, ARCH = 6, "mamba_ska"
# A tiny preset whose heads and Mamba groups split over 2 tensor-parallel ranks; sequences of
# 4·M + G = 12 tokens split over 2 sequence-parallel ranks; a global batch of 8 rows over 2 DP ranks.
PRESET = dataclasses.replace(
    mqar_benchmark.CPU_PRESET, pattern="M*-", hidden_size=32, num_heads=2, mamba_head_dim=8, mamba_state_dim=8,
    mamba_num_groups=2, ffn_hidden_size=64, ska_rank=8, ska_value_dim=8, ska_chunk_size=4, kv_pairs=(2,),
    train_gaps=(4,), eval_gaps=(4,), batch_size=8, steps=STEPS, warmup_steps=2, lrs=(1e-2,), min_lr=1e-3,
    clip_grad=0.5, eval_every=0,
)
RUN = mqar_benchmark.Run(ARCH, 2, (4,), (4,), 0)


def build(tensor_parallel_size: int, seed: int) -> torch.nn.Module:
    """The tiny model at this TP size (sequence parallel when TP > 1), Megatron state set up for it."""
    if parallel_state.model_parallel_is_initialized() and (
            parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel_size):
        parallel_state.destroy_model_parallel()
    trainer.initialize_distributed(tensor_parallel_size, seed)
    trainer.seed_everything(seed)
    preset = dataclasses.replace(PRESET, tensor_parallel_size=tensor_parallel_size)
    return mqar_benchmark.build_model(ARCH, preset, preset.sequence_length(2, 4))


def train(model: torch.nn.Module) -> list[dict]:
    config = PRESET.train_config(PRESET.lrs[0], "parallel", progress=False)
    return trainer.train(model, mqar_benchmark.train_batch_fn(PRESET, RUN), config).history


def save(model: torch.nn.Module, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))


def load(model: torch.nn.Module, directory: Path) -> None:
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(directory)))


def main(out: Path) -> None:
    model = build(1, seed=0)
    save(model, out / "init")
    histories = {"dp2": train(model)}
    save(model, out / "dp2")
    model = build(2, seed=1)
    load(model, out / "init")
    histories["tp2"] = train(model)
    save(model, out / "tp2")
    if torch.distributed.get_rank() == 0:
        (out / "histories.json").write_text(json.dumps(histories))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
