"""torchrun --nproc-per-node 2 -m tests.hf.import_tp2_worker CKPT_DIR EXPECTED.pt HF_DIR OUT_DIR: an `import-hf`
checkpoint loads at TP = 2 (model built from its stored args) and gives the HF model's logits; `export_model` of
the TP = 2 model (collective) writes the same tensors as HF_DIR; then training goes on (loss falls).
Prints "PASSED" on rank 0."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import echo_megatron.hf  # noqa: F401  (before CPU mode)
from megatron.core import dist_checkpointing, parallel_state

from safetensors.torch import load_file

from echo_megatron.hf import export_model
from echo_megatron.hf.megatron_io import build_model, fields_from_args, iteration_dir, read_checkpoint
from echo_megatron.megatron.cpu import enable_cpu_mode

from tests.megatron.common import full_logits, initialize_model_parallel


def main(ckpt_dir: Path, expected_file: Path, hf_dir: Path, out_dir: Path) -> None:
    enable_cpu_mode()
    torch.distributed.init_process_group("gloo")
    initialize_model_parallel(2, seed=5)
    args, tensors, _ = read_checkpoint(ckpt_dir)
    fields = fields_from_args(args, tensors)
    model = build_model(fields, args.mamba_num_heads, tensor_model_parallel_size=2)
    path, _ = iteration_dir(ckpt_dir)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(path))  # + the common state (args, ...)
    model.load_state_dict({key: value for key, value in loaded.items() if key in model.state_dict()})
    expected = torch.load(expected_file)
    logits = full_logits(model.eval(), expected["ids"])
    error = ((logits - expected["logits"]).abs().max() / expected["logits"].abs().max()).item()
    assert error <= 1e-4, f"TP=2 logits differ from the HF model's: {error:.2e}"
    export_model(model, out_dir)
    if torch.distributed.get_rank() == 0:
        original, gathered = load_file(hf_dir / "model.safetensors"), load_file(out_dir / "model.safetensors")
        assert sorted(original) == sorted(gathered)
        for name, tensor in original.items():
            assert torch.equal(gathered[name], tensor), name
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = expected["ids"]
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        logits = full_logits(model, ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    if torch.distributed.get_rank() == 0:
        print(f"PASSED logits error {error:.2e}, losses {losses}", flush=True)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:5]))
