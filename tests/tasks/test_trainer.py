"""The small Megatron-Core trainer: decay groups, schedule, gradient clipping, learning, determinism."""

import math
import types

import pytest
import torch

from echo_megatron.tasks import trainer
from echo_megatron.tasks.trainer import (
    TrainConfig,
    decays,
    make_optimizer,
    param_groups,
)


class _Named(torch.nn.Module):
    """Parameters named like those of Megatron's Mamba mixer, SKA layer, norms and linears."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.A_log = torch.nn.Parameter(torch.zeros(2))
        self.D = torch.nn.Parameter(torch.zeros(2))
        self.dt_bias = torch.nn.Parameter(torch.zeros(2))
        self.eta = torch.nn.Parameter(torch.zeros(2, 1))  # reshaped scalars: excluded by name
        self.rho = torch.nn.Parameter(torch.zeros(2, 1))
        self.conv = torch.nn.Conv1d(3, 3, 4, groups=3)


def test_weight_decay_only_on_matrices():
    model = _Named()
    decayed = {name for name, p in model.named_parameters() if decays(name, p)}
    assert decayed == {"linear.weight", "conv.weight"}
    groups = param_groups(model, 0.1)
    assert [g["wd_mult"] for g in groups] == [1.0, 0.0]
    assert {id(p) for p in groups[0]["params"]} == {id(model.linear.weight), id(model.conv.weight)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_warmup_then_cosine_schedule_and_no_decay_group():
    steps, warmup, lr, min_lr = 10, 3, 1.0, 0.1
    config = TrainConfig(steps=steps, batch_size=1, lr=lr, min_lr=min_lr, warmup_steps=warmup, weight_decay=0.2)
    optimizer, scheduler = make_optimizer(_Named(), config)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]
        scheduler.step(1)
    expected = [k / warmup if k <= warmup else min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup)))
                for k in range(1, steps + 1)]
    assert seen == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kwargs,match", [({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"),
                                          ({"min_lr": 2.0}, "min_lr"), ({"warmup_steps": -1}, "warmup_steps")])
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"steps": 1, "batch_size": 1, "lr": 1.0, **kwargs})


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny Megatron hybrid (Mamba-2 + SKA + MLP) in a one-rank gloo group (CPU mode)."""
    import dataclasses

    from echo_megatron.tasks import mqar_benchmark as mb

    trainer.initialize_distributed(1, seed=0)
    preset = dataclasses.replace(mb.CPU_PRESET, pattern="M*-", hidden_size=32, num_heads=2, mamba_head_dim=8,
                                 mamba_state_dim=8, ffn_hidden_size=64, ska_rank=8, ska_value_dim=8, ska_chunk_size=4)

    def build():
        trainer.seed_everything(0)
        return mb.build_model("mamba_ska", preset, 64)

    return build


def _batch(step: int = 0):
    from echo_megatron.tasks.mqar import paper_grid

    data = paper_grid(8, 2, 4, seed=(5, step))
    return data.input_ids, data.labels


def test_clip_grads_matches_torch_and_rescales(tiny_model):
    model = tiny_model()
    loss, _, _ = trainer.loss_and_accuracy(trainer.logits_of(model, _batch()[0]), _batch()[1])
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]
    expected = torch.nn.utils.clip_grad_norm_(params, max_norm=float("inf"))
    norm = trainer.clip_grads(params, 1e-3)
    assert norm == pytest.approx(float(expected), rel=1e-6)
    assert float(trainer.grad_norm(params)) == pytest.approx(1e-3, rel=1e-3)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * (1e-3 / (norm + 1e-6)))


def test_training_fits_a_fixed_batch_and_is_deterministic(tiny_model):
    config = TrainConfig(steps=40, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=20, progress=False)
    runs = []
    for _ in range(2):
        model = tiny_model()
        runs.append(trainer.train(model, lambda step: _batch(), config, lambda model=model: trainer.evaluate(model, _data(), 4)))
    first, second = runs
    assert [r["loss"] for r in first.history] == [r["loss"] for r in second.history]  # same seed, same run
    assert first.history[-1]["loss"] < 0.3 * first.history[0]["loss"]
    assert [r["step"] for r in first.history if "eval_acc" in r] == [20, 40]
    assert first.history[-1]["eval_acc"] == 1.0  # memorised the fixed batch


def _data():
    from echo_megatron.tasks.mqar import MQARData

    ids, labels = _batch()
    return MQARData(ids, labels, {})


def test_early_stop_ends_at_the_first_evaluation_that_reaches_the_target():
    """A toy regression whose 'accuracy' is a scripted sequence: training stops at the first eval >= stop_at."""
    trainer.initialize_distributed(1, 0)
    scores = iter([0.2, 0.5, 0.95, 1.0])

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(8, 8)
            self.config = types.SimpleNamespace(sequence_parallel=False)

        def forward(self, ids, position_ids, mask, runtime_gather_output=True):
            return self.embed(ids)

    def batch_at(step):
        ids = torch.arange(8).reshape(2, 4)
        return ids, ids

    config = TrainConfig(steps=50, batch_size=2, eval_every=3, stop_at=0.9, progress=False, warmup_steps=0)
    result = trainer.train(Tiny(), batch_at, config, lambda: next(scores))
    assert result.steps == 9 and [h["eval_acc"] for h in result.history if "eval_acc" in h] == [0.2, 0.5, 0.95]
    with pytest.raises(ValueError, match="stop_at"):
        TrainConfig(steps=1, batch_size=1, stop_at=1.5)
