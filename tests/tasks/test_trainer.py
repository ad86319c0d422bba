"""The MQAR trainer on Megatron-Core's DDP, finalize_model_grads and optimizer: no-decay rule, schedule,
clipping against a hand computation, DP=2 and TP=2 + sequence parallel against one process, learning,
determinism, early stopping."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from echo_megatron.tasks import trainer
from echo_megatron.tasks.trainer import TrainConfig, make_optimizer, wrap_data_parallel

REPO = Path(__file__).resolve().parents[2]


def _tiny_preset(arch_pattern: str = "M*-"):
    from echo_megatron.tasks import mqar_benchmark as mb

    return dataclasses.replace(mb.CPU_PRESET, pattern=arch_pattern, hidden_size=32, num_heads=2, mamba_head_dim=8,
                               mamba_state_dim=8, ffn_hidden_size=64, ska_rank=8, ska_value_dim=8, ska_chunk_size=4)


@pytest.fixture(scope="module")
def tiny_model():
    """Builds a tiny Megatron hybrid (Mamba-2 + SKA + MLP, or ``arch``) in a one-rank gloo group (CPU mode)."""
    from echo_megatron.tasks import mqar_benchmark as mb

    trainer.initialize_distributed(1, seed=0)

    def build(arch: str = "mamba_ska"):
        trainer.seed_everything(0)
        return mb.build_model(arch, _tiny_preset(), 64)

    return build


def test_no_weight_decay_on_one_dimensional_parameters(tiny_model):
    """Megatron's rule: norms, biases, SKA's η/ρ, Mamba's A_log/D/dt_bias, Koopman γ/ω are not decayed;
    every matrix (and the conv kernel) is, at the configured rate."""
    model = tiny_model("echo")
    optimizer, _ = make_optimizer(wrap_data_parallel(model), TrainConfig(steps=5, batch_size=1, weight_decay=0.2))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)].rsplit(".", 1)[-1] for p in g["params"]} for g in optimizer.param_groups}
    assert set(decay) == {0.2, 0.0}
    assert decay[0.0] == {"conv1d_bias", "dt_bias", "A_log", "D", "weight", "eta", "rho", "gamma", "omega"}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert no_decay == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert {"decoder.layers.0.mixer.in_proj.weight", "decoder.layers.2.mlp.lift.weight",
            "decoder.layers.0.mixer.conv1d_weight", "embedding.word_embeddings.weight"}.isdisjoint(no_decay)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_warmup_then_cosine_schedule(tiny_model):
    steps, warmup, lr, min_lr = 10, 3, 1.0, 0.1
    config = TrainConfig(steps=steps, batch_size=1, lr=lr, min_lr=min_lr, warmup_steps=warmup, weight_decay=0.2)
    optimizer, scheduler = make_optimizer(wrap_data_parallel(tiny_model()), config)
    seen = []
    for _ in range(steps):
        seen.append({g["lr"] for g in optimizer.param_groups})
        scheduler.step(1)
    expected = [k / warmup if k <= warmup else min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup)))
                for k in range(1, steps + 1)]
    assert all(len(s) == 1 for s in seen)
    assert [s.pop() for s in seen] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kwargs,match", [({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"),
                                          ({"min_lr": 2.0}, "min_lr"), ({"warmup_steps": -1}, "warmup_steps")])
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"steps": 1, "batch_size": 1, "lr": 1.0, **kwargs})


def _batch(step: int = 0):
    from echo_megatron.tasks.mqar import paper_grid

    data = paper_grid(8, 2, 4, seed=(5, step))
    return data.input_ids, data.labels


def test_clipping_matches_a_hand_computation(tiny_model):
    """Megatron's step clips to clip_grad / (‖g‖ + 1e-6) · g with ‖g‖ the global norm of the raw
    gradients, computed here by hand from plain autograd on an identical model."""
    ids, labels = _batch()
    reference = tiny_model()
    trainer.loss_and_accuracy(trainer.logits_of(reference, ids), labels)[0].backward()
    raw = {n: p.grad.clone() for n, p in reference.named_parameters()}
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in raw.values()))

    model = tiny_model()
    ddp = wrap_data_parallel(model)
    clip = 0.05 * norm
    optimizer, _ = make_optimizer(ddp, TrainConfig(steps=3, batch_size=8, clip_grad=clip))
    trainer.loss_and_accuracy(trainer.logits_of(ddp, ids), labels)[0].backward()
    assert trainer.optimizer_step(ddp, optimizer) == pytest.approx(norm, rel=1e-6)
    for name, param in model.named_parameters():  # Megatron's step leaves the clipped gradient in .grad
        torch.testing.assert_close(param.grad, raw[name] * (clip / (norm + 1e-6)), rtol=1e-5, atol=1e-9)


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
            self.config = trainer.plain_model_config()

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


@pytest.mark.multiproc
def test_data_parallel_and_tensor_parallel_equal_one_process(tiny_model, tmp_path):
    """torchrun, 2 ranks over gloo (tests/tasks/trainer_parallel_worker.py): DP=2 and TP=2 + sequence
    parallel train from the same initial weights on the same global batches as this one process."""
    from tests.tasks import trainer_parallel_worker as worker

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.tasks.trainer_parallel_worker", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    histories = json.loads((tmp_path / "histories.json").read_text())

    model = worker.build(1, seed=2)
    worker.load(model, tmp_path / "init")
    reference = worker.train(model)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    for setting in ("dp2", "tp2"):
        history = histories[setting]
        assert len(history) == worker.STEPS
        # The first gradient norm is exact up to fp32 reduction order; Adam then amplifies round-off slowly.
        assert history[0]["grad_norm"] == pytest.approx(reference[0]["grad_norm"], rel=1e-5), setting
        for ours, theirs in zip(reference, history):
            assert theirs["loss"] == pytest.approx(ours["loss"], rel=1e-4), setting
            assert theirs["grad_norm"] == pytest.approx(ours["grad_norm"], rel=1e-2), setting
        worker.load(model, tmp_path / setting)
        for name, param in model.named_parameters():
            error = float((param.detach() - final[name]).norm() / final[name].norm())
            assert error < 1e-3, f"{setting}: {name} differs from one process by {error:.2e}"
