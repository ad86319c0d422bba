"""Calibrate the MQAR and NIAH baselines against independent implementations on the same data.

    python -m echo_megatron.tasks.mqar_calibration --model transformer   # plain PyTorch transformer
    python -m echo_megatron.tasks.mqar_calibration --model hf_mamba2     # transformers' Mamba2ForCausalLM
    python -m echo_megatron.tasks.mqar_calibration --task niah --model hf_mamba2 --lengths 64

Each model is trained by the same trainer (``echo_megatron.tasks.trainer``: Megatron's DDP and Adam, warm-up +
cosine, clipping, early stopping) on the same batches as the CPU preset's run at ``--seed``
(``mqar_benchmark.train_batch_fn``) and scored on the same held-out sequences (``--task niah``: the NIAH CPU preset's). The models are not
Megatron's and use their libraries' own initialisation, so a Megatron baseline that does much
worse than its independent twin has a defect of ours (docs/mqar_calibration.md).

- ``transformer``: ``torch.nn.TransformerEncoder`` (pre-norm, GELU, causal mask, learned absolute
  positions), PyTorch's default init, untied output layer.
- ``hf_mamba2``: ``transformers.Mamba2ForCausalLM`` (its pure-PyTorch path on CPU), the CPU
  preset's Mamba-2 geometry (d = 64, head dim 16, d_state 16, one group), transformers' init.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from echo_megatron.tasks import mqar_benchmark, trainer
from echo_megatron.tasks.mqar import PAPER_VOCAB_SIZE
from echo_megatron.tasks.mqar_benchmark import TASKS

MODELS = ("transformer", "hf_mamba2")


class PlainTransformer(torch.nn.Module):
    """Causal pre-norm transformer with learned absolute positions: ids [B, T] -> logits [B, T, V]."""

    def __init__(self, vocab_size: int, hidden_size: int, heads: int, layers: int, max_len: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden_size)
        self.positions = torch.nn.Embedding(max_len, hidden_size)
        block = torch.nn.TransformerEncoderLayer(hidden_size, heads, 4 * hidden_size, dropout=0.0, activation="gelu",
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(hidden_size)
        self.head = torch.nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids) + self.positions(torch.arange(t, device=ids.device))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


class _MegatronCall(torch.nn.Module):
    """Adapts ``model(ids) -> logits`` to the trainer's Megatron call ``model(ids, position_ids, mask, ...)``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = trainer.plain_model_config()  # what Megatron's DDP and finalize_model_grads read

    def forward(self, ids, position_ids=None, attention_mask=None, runtime_gather_output=True):
        out = self.model(ids)
        return out.logits if hasattr(out, "logits") else out


def build(name: str, preset: mqar_benchmark.MQARPreset, max_len: int) -> torch.nn.Module:
    """The independent model ``name`` at the CPU preset's width."""
    if name == "transformer":
        return PlainTransformer(PAPER_VOCAB_SIZE, preset.hidden_size, preset.num_heads, preset.pattern.count("*"), max_len)
    from transformers import Mamba2ForCausalLM

    return Mamba2ForCausalLM(hf_mamba2_config(preset))


def hf_mamba2_config(preset: mqar_benchmark.MQARPreset, tie_word_embeddings: bool = False):
    """transformers' ``Mamba2Config`` at the preset's Mamba-2 geometry (every layer Mamba-2, expansion 2;
    RMSNorm eps 1e-5 as Megatron's), its own defaults for everything else (init, dt range, untied output)."""
    from transformers import Mamba2Config

    d_inner = 2 * preset.hidden_size
    return Mamba2Config(vocab_size=PAPER_VOCAB_SIZE, hidden_size=preset.hidden_size, num_hidden_layers=len(preset.pattern),
                        state_size=preset.mamba_state_dim, head_dim=preset.mamba_head_dim,
                        num_heads=d_inner // preset.mamba_head_dim, n_groups=preset.mamba_num_groups, chunk_size=64,
                        layer_norm_epsilon=1e-5, tie_word_embeddings=tie_word_embeddings,
                        pad_token_id=None, bos_token_id=None, eos_token_id=None)


_HF_MAMBA2_RENAMES = (("embedding.word_embeddings.", "backbone.embeddings."), ("decoder.final_norm.", "backbone.norm_f."),
                      ("decoder.layers.", "backbone.layers."), ("conv1d_weight", "conv1d.weight"),
                      ("conv1d_bias", "conv1d.bias"))


def hf_mamba2_name(name: str) -> str:
    """The ``Mamba2ForCausalLM`` name of our Megatron Mamba-2 model's parameter ``name``."""
    for old, new in _HF_MAMBA2_RENAMES:
        name = name.replace(old, new)
    return name


def hf_mamba2_twin(model: torch.nn.Module, preset: mqar_benchmark.MQARPreset) -> torch.nn.Module:
    """transformers' ``Mamba2ForCausalLM`` holding the weights of our Megatron Mamba-2 model
    (``mqar_benchmark.build_model("mamba", preset, ...)``: tied output layer): the two must compute the
    same function (tests/tasks/test_mqar_calibration.py)."""
    from transformers import Mamba2ForCausalLM

    weights = {hf_mamba2_name(name): t for name, t in model.state_dict().items() if not name.endswith("_extra_state")}
    twin = Mamba2ForCausalLM(hf_mamba2_config(preset, tie_word_embeddings=True))
    twin.load_state_dict(weights, strict=False)  # lm_head is tied to the embedding
    missing = {k for k in twin.state_dict() if k != "lm_head.weight"} - set(weights)
    if missing or set(weights) - set(twin.state_dict()):
        raise ValueError(f"weights do not map onto Mamba2ForCausalLM: missing {sorted(missing)}, "
                         f"unexpected {sorted(set(weights) - set(twin.state_dict()))}")
    return twin


def calibrate(name: str, preset: mqar_benchmark.MQARPreset, seed: int, lr: float, progress: bool = True) -> dict:
    """Train the independent model ``name`` like the preset's run at ``seed`` and evaluate it.

    Call it in a fresh process: transformers binds mamba-ssm's kernels when its Mamba-2 module is
    first imported, and must do so before CPU mode stubs them (it then keeps its PyTorch path)."""
    if name == "hf_mamba2":
        import transformers.models.mamba2.modeling_mamba2  # noqa: F401  (before the CPU-mode stubs)
    trainer.initialize_distributed(1, seed)
    trainer.seed_everything(seed)
    m = preset.kv_pairs[0]
    run = mqar_benchmark.Run(name, m, preset.train_gaps, preset.eval_gaps, seed)
    max_len = preset.sequence_length(m, max(*preset.eval_gaps, *preset.train_gaps))
    model = _MegatronCall(build(name, preset, max_len))
    monitor = [mqar_benchmark.eval_data(preset, seed, m, g, mqar_benchmark.MONITOR_EXAMPLES, mqar_benchmark.MONITOR_STREAM)
               for g in preset.train_gaps]

    def monitor_fn() -> float:
        return sum(trainer.evaluate(model, d, preset.eval_batch_size) for d in monitor) / len(monitor)

    config = preset.train_config(lr, f"{name} lr={lr:g}", progress)
    result = trainer.train(model, mqar_benchmark.train_batch_fn(preset, run), config, monitor_fn)
    accuracy = {g: trainer.evaluate(model, mqar_benchmark.eval_data(preset, seed, m, g, preset.eval_examples),
                                    preset.eval_batch_size) for g in preset.eval_gaps}
    return {"model": name, "commit": mqar_benchmark.source_commit(), "task": preset.task, "seed": seed, "lr": lr, "params": sum(p.numel() for p in model.parameters()),
            "steps": result.steps, "train_s": round(result.wall_s, 1), "accuracy": accuracy,
            "floor": {g: preset.floor(m, g) for g in preset.eval_gaps}, "chance": 4 / PAPER_VOCAB_SIZE,
            "curve": [{k: r[k] for k in ("step", "loss", "eval_acc")} for r in result.history if "eval_acc" in r]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--task", choices=TASKS, default="mqar", help="the CPU preset whose data and budget are used")
    parser.add_argument("--lengths", type=lambda s: tuple(int(x) for x in s.split(",")),
                        help="evaluation gaps (MQAR) or lengths (NIAH), comma-separated (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, help="training steps (default: the CPU preset's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    preset = (mqar_benchmark.NIAH_PRESETS if args.task == "niah" else mqar_benchmark.PRESETS)["cpu"]
    if args.steps is not None:
        preset = dataclasses.replace(preset, steps=args.steps)
    if args.lengths is not None:
        preset = dataclasses.replace(preset, eval_gaps=args.lengths)
    print(json.dumps(calibrate(args.model, preset, args.seed, args.lr, not args.no_progress)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
