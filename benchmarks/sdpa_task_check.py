"""Few-step check that the MQAR/NIAH `mamba_attention` runs are unchanged by the switch of the local softmax spec's
core attention from Megatron's `DotProductAttention` to `SDPAttention` (issue 19).

    .venv/bin/python benchmarks/sdpa_task_check.py [--steps 30]

For the CPU presets of MQAR and NIAH: the same seed, model and batches trained `--steps` steps with each core
attention; prints the per-step losses' largest difference and the accuracy on 128 evaluation sequences of the
first evaluation gap. Equal within fp32 rounding means the committed MQAR/NIAH tables need no re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from megatron.core.transformer.dot_product_attention import DotProductAttention

from echo_megatron.megatron import specs
from echo_megatron.megatron.sdpa_attention import SDPAttention
from echo_megatron.tasks import mqar_benchmark as mb
from echo_megatron.tasks import trainer

CORE_ATTENTIONS = {"DotProductAttention": DotProductAttention, "SDPAttention": SDPAttention}


def train_and_evaluate(preset: mb.MQARPreset, steps: int, gap: int) -> tuple[list[float], float, float]:
    """(per-step losses, accuracy at `gap`, wall seconds) of one seed-0 `mamba_attention` run."""
    run = mb.Run("mamba_attention", preset.kv_pairs[0], preset.train_gaps, preset.eval_gaps, 0)
    trainer.seed_everything(0)
    model = mb.build_model(run.arch, preset, preset.sequence_length(run.kv_pairs, max(*run.eval_gaps, *run.train_gaps)))
    start = time.perf_counter()
    result = trainer.train(model, mb.train_batch_fn(preset, run),
                           dataclasses.replace(preset, steps=steps).train_config(preset.lrs[0], run.name, False))
    accuracy = trainer.evaluate(model, mb.eval_data(preset, 0, run.kv_pairs, gap, 128), preset.eval_batch_size)
    return [h["loss"] for h in result.history], accuracy, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    steps = parser.parse_args().steps
    core = specs.softmax_attention_layer_spec_local.submodules.self_attention.submodules
    trainer.initialize_distributed(1, seed=0)
    print(f"| preset | steps | loss DPA first..last | loss SDPA first..last | max rel. loss diff | accuracy DPA | "
          f"accuracy SDPA | gap |\n|---|---|---|---|---|---|---|---|")
    for preset in (mb.CPU_PRESET, mb.NIAH_CPU_PRESET):
        gap = preset.eval_gaps[0]
        results = {}
        for name, module in CORE_ATTENTIONS.items():
            core.core_attention = module
            results[name] = train_and_evaluate(preset, steps, gap)
        core.core_attention = SDPAttention
        (dpa, dpa_acc, _), (sdpa, sdpa_acc, _) = results.values()
        diff = max(abs(a - b) / abs(a) for a, b in zip(dpa, sdpa))
        print(f"| {preset.name} | {steps} | {dpa[0]:.6f}..{dpa[-1]:.6f} | {sdpa[0]:.6f}..{sdpa[-1]:.6f} | {diff:.2g} | "
              f"{dpa_acc:.4f} | {sdpa_acc:.4f} | {gap} |", flush=True)


if __name__ == "__main__":
    main()
