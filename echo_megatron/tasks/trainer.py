"""The MQAR/NIAH training loop on Megatron-Core's own data-parallel and optimizer machinery.

Megatron-Core does the work: ``DistributedDataParallel`` (gradients accumulate into a contiguous
buffer and are averaged over data-parallel ranks), ``finalize_model_grads`` (that average, plus the
sum over tensor-parallel ranks of the sequence-parallel replicated norm gradients, as the schedules'
``forward_backward_func`` calls it), ``get_megatron_optimizer`` (Adam with decoupled weight decay,
gradient clipping by the global norm over model-parallel ranks, and Megatron's rule that 1-D
parameters and biases are not decayed: norms, SKA's η/ρ, Mamba's A_log/D/dt_bias, the Koopman
eigenvalues) and ``OptimizerParamScheduler`` (linear warm-up, cosine decay). This module keeps only
the small loop a task driver needs: batches, periodic evaluation, early stopping and a progress bar.

Process groups use gloo on CPU and nccl on GPU; under plain ``python`` a single-rank group is
created, under ``torchrun`` the launcher's environment is used. Every rank must call the same
functions in the same order (collectives). On CPU, Megatron's optimizer allocates its loss scale
and gradient-norm buffers with ``device="cuda"`` and asserts CUDA tensor types; those calls run
under the launcher's own CPU fix (``echo_megatron.pretrain.cpu_training.CudaToCPU``), scoped to the
optimizer, never active with CUDA.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from tqdm.auto import tqdm

from echo_megatron.megatron.parallel import initialize_single_process
from echo_megatron.tasks.mqar import IGNORE_INDEX, MQARData

Batch = tuple[torch.Tensor, torch.Tensor]

# The terminal line of this process's progress bar: worker processes that train side by side
# (``mqar_benchmark``'s ``workers``) each draw on their own line.
progress_line = 0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``batch_size`` is global (split over data-parallel ranks)."""

    steps: int
    batch_size: int
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 1.0
    eval_every: int = 100
    progress: bool = True
    description: str = "train"
    stop_at: float | None = None  # stop early once evaluate_fn() >= stop_at (checked every eval_every steps)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"lr and min_lr must satisfy 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.stop_at is not None and not 0 < self.stop_at <= 1:
            raise ValueError(f"stop_at must lie in (0, 1] or be None, got {self.stop_at}")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError(f"weight_decay and clip_grad must be >= 0, got {self.weight_decay}, {self.clip_grad}")


@dataclass
class TrainResult:
    steps: int
    wall_s: float
    final_loss: float
    history: list[dict] = field(default_factory=list)


def device() -> torch.device:
    """The device models and batches live on: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def initialize_distributed(tensor_parallel_size: int = 1, seed: int = 0) -> None:
    """Process groups (gloo on CPU, nccl on GPU), Megatron's model-parallel state and seeds; idempotent.
    See `echo_megatron.megatron.initialize_single_process` (torchrun's ranks, or one local rank)."""
    initialize_single_process(seed=seed, tensor_model_parallel_size=tensor_parallel_size)


def seed_everything(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (a fresh CPU tracker in CPU mode)."""
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        from echo_megatron.megatron.cpu import install_cpu_rng_tracker

        install_cpu_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


@contextlib.contextmanager
def _megatron_on_this_device():
    """On CPU, run Megatron's DDP and optimizer code under two of the launcher's CPU fixes
    (``echo_megatron.pretrain.cpu_training``): ``cpu_streams`` (the gradient all-reduce asks for
    ``torch.cuda.current_stream()``: ``AssertionError: Torch not compiled with CUDA enabled``) and,
    scoped to the block, ``CudaToCPU`` (the optimizer's loss-scale and grad-norm buffers use
    ``device="cuda"``; clipping asserts ``grad.type() == 'torch.cuda.FloatTensor'``). With CUDA: nothing."""
    if torch.cuda.is_available():
        yield
        return
    from echo_megatron.pretrain.cpu_training import CudaToCPU, cpu_streams

    cpu_streams()
    with CudaToCPU():
        yield


def plain_model_config() -> TransformerConfig:
    """A ``TransformerConfig`` for a model that is not Megatron's (no tensor or sequence parallelism,
    fp32): set it as ``model.config`` so that Megatron's DDP and ``finalize_model_grads`` can train it."""
    return TransformerConfig(num_layers=1, hidden_size=1, num_attention_heads=1)


def wrap_data_parallel(model: torch.nn.Module) -> DistributedDataParallel:
    """Megatron's ``DistributedDataParallel`` around ``model`` (which carries a ``TransformerConfig``
    as ``model.config``): fp32 gradient buffer, gradients averaged over data-parallel ranks when
    ``finalize_model_grads`` runs (no overlap: the steps are tiny)."""
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [B, T, V] of a Megatron GPT/Hybrid model (gathered over TP)."""
    b, t = input_ids.shape
    position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
    return model(input_ids, position_ids, None, runtime_gather_output=True)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Mean cross-entropy over scored positions, and (correct, scored) counts."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    scored = labels != IGNORE_INDEX
    correct = (logits.argmax(-1).eq(labels) & scored).sum()
    return loss, int(correct), int(scored.sum())


def data_parallel_slice(batch: Batch) -> Batch:
    """This data-parallel rank's rows of a global batch (TP ranks of a group see the same rows)."""
    rank = parallel_state.get_data_parallel_rank()
    size = parallel_state.get_data_parallel_world_size()
    ids, labels = batch
    if ids.shape[0] % size:
        raise ValueError(f"batch_size {ids.shape[0]} must be divisible by the data-parallel size {size}")
    rows = ids.shape[0] // size
    return ids[rank * rows : (rank + 1) * rows], labels[rank * rows : (rank + 1) * rows]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: MQARData, batch_size: int) -> float:
    """Accuracy on the scored positions of ``data``, rows split over data-parallel ranks."""
    was_training = model.training
    model.eval()
    rank = parallel_state.get_data_parallel_rank()
    size = parallel_state.get_data_parallel_world_size()
    counts = torch.zeros(2, dtype=torch.float64, device=device())
    rows = range(rank * batch_size, len(data), size * batch_size)
    for start in rows:
        ids, labels = (x.to(device()) for x in data.batch(start, min(start + batch_size, len(data))))
        _, correct, scored = loss_and_accuracy(logits_of(model, ids), labels)
        counts += torch.tensor([correct, scored], dtype=torch.float64, device=counts.device)
    torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    model.train(was_training)
    return float(counts[0] / counts[1]) if counts[1] > 0 else math.nan


def make_optimizer(model: DistributedDataParallel, config: TrainConfig) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """Megatron's Adam (decoupled weight decay, none on 1-D parameters and biases: Megatron's
    standard rule), clipping at ``config.clip_grad``, and its warm-up + cosine schedule."""
    beta1, beta2 = config.betas
    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
        adam_beta1=beta1, adam_beta2=beta2, adam_eps=1e-8, clip_grad=config.clip_grad,
        params_dtype=torch.float32, use_distributed_optimizer=False,
    )
    with _megatron_on_this_device():
        optimizer = get_megatron_optimizer(optimizer_config, [model])
    warmup = min(config.warmup_steps, config.steps - 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=config.steps,
        lr_decay_style="cosine",
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=config.steps,
        wd_incr_style="constant",
    )
    # The scheduler sets the lr of the *next* step; start after warmup step 0 (lr 0 would waste it).
    scheduler.step(1)
    return optimizer, scheduler


def optimizer_step(model: DistributedDataParallel, optimizer: MegatronOptimizer) -> float:
    """After ``loss.backward()``: ``finalize_model_grads`` (data-parallel average, sequence-parallel
    norm gradients summed over tensor-parallel ranks), then Megatron's clipped optimizer step.
    Returns the global gradient norm before clipping."""
    with _megatron_on_this_device():
        finalize_model_grads([model])
        success, norm, _ = optimizer.step()
        if norm is None:  # clip_grad == 0: Megatron skips the norm
            norm = optimizer.get_grad_norm()
    if not success:
        raise RuntimeError("Megatron's optimizer skipped the step (non-finite gradients)")
    return float(norm)


def _global_loss_and_accuracy(loss: torch.Tensor, correct: int, scored: int) -> tuple[float, float]:
    """Loss and accuracy of the global batch (this rank's values reduced over data-parallel ranks)."""
    stats = torch.tensor([loss.item() * scored, correct, scored], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    return float(stats[0] / stats[2]), float(stats[1] / stats[2])


def train(
    model: torch.nn.Module,
    batch_at: Callable[[int], Batch],
    config: TrainConfig,
    evaluate_fn: Callable[[], float] | None = None,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps on the global batches ``batch_at(step)``.

    ``batch_at`` must be deterministic (every rank builds the same global batch and keeps its
    data-parallel slice). ``evaluate_fn`` (collective) runs every ``eval_every`` steps and at the
    end; its value is shown in the progress bar and kept in ``history``. With ``config.stop_at``
    training ends at the first evaluation that reaches it (the schedule is not compressed: an
    early stop keeps the lr it had; ``TrainResult.steps`` counts the steps taken).

    The loss is the mean over this rank's scored positions and DDP averages gradients over the
    data-parallel ranks: the global batch's mean whenever every rank holds as many scored positions
    (MQAR: M per row, NIAH: one), which is what the DP=2 == DP=1 test checks.
    """
    model.train()
    ddp = wrap_data_parallel(model)
    optimizer, scheduler = make_optimizer(ddp, config)
    history: list[dict] = []
    bar = tqdm(range(config.steps), desc=config.description, disable=not (config.progress and is_rank_zero()),
               dynamic_ncols=True, leave=progress_line == 0, position=progress_line)
    start = time.perf_counter()
    loss_value = math.nan
    eval_acc = math.nan
    for step in bar:
        ids, labels = (x.to(device()) for x in data_parallel_slice(batch_at(step)))
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss, correct, scored = loss_and_accuracy(logits_of(ddp, ids), labels)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        norm = optimizer_step(ddp, optimizer)
        scheduler.step(1)
        loss_value, acc = _global_loss_and_accuracy(loss, correct, scored)
        record = {"step": step + 1, "loss": loss_value, "acc": acc, "grad_norm": norm, "lr": lr}
        last = step + 1 == config.steps
        if evaluate_fn is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
            eval_acc = evaluate_fn()
            record["eval_acc"] = eval_acc
        history.append(record)
        bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{record['acc']:.2f}", eval=f"{eval_acc:.2f}", refresh=False)
        if config.stop_at is not None and "eval_acc" in record and eval_acc >= config.stop_at:
            break
    bar.close()
    return TrainResult(steps=len(history), wall_s=time.perf_counter() - start, final_loss=loss_value, history=history)
