"""Our Megatron Mamba-2 (CPU mode's PyTorch SSD scan) against transformers' independent Mamba2ForCausalLM."""

import json
import os
import subprocess
import sys

# A fresh process: transformers binds its Mamba-2 kernels when first imported, and must do so before
# echo-megatron's CPU mode stubs mamba-ssm's CUDA extensions (it then keeps its own PyTorch path).
SCRIPT = """
import transformers.models.mamba2.modeling_mamba2  # noqa: F401  (before the CPU-mode stubs)
import dataclasses, json, torch
import torch.nn.functional as F
from echo_megatron.tasks import mqar_benchmark as mb, trainer
from echo_megatron.tasks.mqar_calibration import hf_mamba2_name, hf_mamba2_twin

trainer.initialize_distributed(1, 0)
trainer.seed_everything(0)
preset = dataclasses.replace(mb.NIAH_CPU_PRESET, pattern="M*")
ours = mb.build_model("mamba", preset, 64)
with torch.no_grad():  # away from the init (D = 1, norm weights = 1) so that every parameter matters
    for p in ours.parameters():
        p.add_(0.05 * torch.randn_like(p))
twin = hf_mamba2_twin(ours, preset)
data = preset.data(8, 1, 64, seed=(0, 7))
result = {}
for mode in ("eval", "train"):
    ours.train(mode == "train"); twin.train(mode == "train")
    a, b = trainer.logits_of(ours, data.input_ids), twin(data.input_ids).logits
    result[mode] = (a - b).abs().max().item() / b.abs().max().item()
loss = lambda logits: F.cross_entropy(logits.flatten(0, 1), data.labels.flatten(), ignore_index=-100)
loss(trainer.logits_of(ours, data.input_ids)).backward()
loss(twin(data.input_ids).logits).backward()
theirs = dict(twin.named_parameters())
grads = {n: (p.grad, theirs[hf_mamba2_name(n)].grad) for n, p in ours.named_parameters()}
result["grad"] = max(((g - h).norm() / h.norm()).item() for g, h in grads.values())
result["params"] = len(grads)
result["twin_params"] = len(theirs)
print(json.dumps(result))
"""


def test_megatron_mamba2_equals_transformers_mamba2_on_the_same_weights():
    """Logits (eval and train paths) and every parameter's gradient of our 2-layer Mamba-2 HybridModel
    equal transformers' Mamba2ForCausalLM holding the same weights, to fp32 rounding."""
    # Its own one-rank process group, not the rendezvous this test process may have set up.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # embedding, final norm, 2 × (norm, in_proj, conv weight and bias, dt_bias, A_log, D, gated norm, out_proj)
    assert result["params"] == result["twin_params"] == 20
    assert result["eval"] < 1e-5 and result["train"] < 1e-5
    assert result["grad"] < 1e-4
