"""A small trainer for Megatron-Core language models (used by the MQAR benchmark).

Megatron-Core supplies the process groups (``parallel_state``), the model-parallel RNG tracker,
the tensor-parallel duplicate filter and the learning-rate schedule (``OptimizerParamScheduler``:
linear warmup, cosine decay). On top of that this module adds what a compact loop needs:
AdamW with decoupled weight decay on matrices only, data-parallel gradient averaging, the
sequence-parallel reduction of replicated norm gradients, tensor-parallel-aware gradient
clipping, periodic evaluation and a tqdm progress bar.

Process groups use gloo on CPU and nccl on GPU; under plain ``python`` a single-rank group is
created, under ``torchrun`` the launcher's environment is used. Every rank must call the same
functions in the same order (collectives).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from tqdm.auto import tqdm

from echo_megatron.megatron.parallel import initialize_single_process
from echo_megatron.tasks.mqar import IGNORE_INDEX, MQARData

# 1-D parameters (norm weights, biases, SKA η/ρ, Mamba A_log/D/dt_bias, Koopman eigenvalues) are
# never decayed; these names are listed too so that a reshaped scalar cannot slip through.
NO_DECAY_NAMES = ("bias", "A_log", "D", "dt_bias", "eta", "rho")

Batch = tuple[torch.Tensor, torch.Tensor]


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


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Whether AdamW decays this parameter: matrices yes; norms, biases and per-head scalars no."""
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups; ``wd_mult`` is read by Megatron's ``OptimizerParamScheduler``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]


def _all_reduce_grads(grads: list[torch.Tensor], group, scale: float = 1.0) -> None:
    if not grads or torch.distributed.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=group)  # SUM: gloo has no AVG
    if scale != 1.0:
        flat.mul_(scale)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def sync_grads(model: torch.nn.Module) -> None:
    """Average gradients over data-parallel ranks; sum sequence-parallel replicated grads over TP."""
    params = [p for p in model.parameters() if p.grad is not None]
    dp_group = parallel_state.get_data_parallel_group()
    _all_reduce_grads([p.grad for p in params], dp_group, 1.0 / torch.distributed.get_world_size(dp_group))
    if getattr(model.config, "sequence_parallel", False):
        sp = [p.grad for p in params if getattr(p, "sequence_parallel", False)]
        _all_reduce_grads(sp, parallel_state.get_tensor_model_parallel_group())


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of a tensor-parallel model (each shard counted once)."""
    params = [p for p in params if p.grad is not None]
    squares = [
        p.grad.detach().float().pow(2).sum() for p in params if tensor_parallel.param_is_not_tensor_parallel_duplicate(p)
    ]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=device())
    torch.distributed.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    return total.sqrt()


def clip_grads(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Scale gradients so that their global norm is at most ``max_norm`` (0 = no clipping)."""
    norm = grad_norm(params)
    if max_norm > 0:
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)
    return float(norm)


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


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> tuple[torch.optim.AdamW, OptimizerParamScheduler]:
    """AdamW with decay only on matrices, and Megatron's warmup + cosine schedule."""
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
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
    """
    model.train()
    optimizer, scheduler = make_optimizer(model, config)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    history: list[dict] = []
    bar = tqdm(range(config.steps), desc=config.description, disable=not (config.progress and is_rank_zero()),
               dynamic_ncols=True, leave=True)
    start = time.perf_counter()
    loss_value = math.nan
    eval_acc = math.nan
    for step in bar:
        ids, labels = (x.to(device()) for x in data_parallel_slice(batch_at(step)))
        optimizer.zero_grad(set_to_none=True)
        loss, correct, scored = loss_and_accuracy(logits_of(model, ids), labels)
        loss.backward()
        sync_grads(model)
        norm = clip_grads(params, config.clip_grad)
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
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
