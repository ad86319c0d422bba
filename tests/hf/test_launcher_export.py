"""A checkpoint written by the launcher itself (`torchrun -m echo_megatron.pretrain --cpu`, TP = 2 + SP)
-> `echo-megatron export-hf` -> the same logits as `load_megatron_checkpoint` (issue 9's end-to-end path)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from echo_megatron.cli import main
from echo_megatron.hf import load_megatron_checkpoint
from tests.hf.common import relative_error
from tests.megatron.common import full_logits
from tests.pretrain.launch import TINY, launch, losses

pytestmark = pytest.mark.multiproc


def test_launcher_checkpoint_exports_with_logit_parity(tmp_path, tp2, model_parallel_tp1):
    """The TP = 2 + SP checkpoint of the shared launcher run (tests/conftest.py, iteration 8)."""
    ckpt, out = tp2[0], tmp_path / "hf"
    assert main(["export-hf", str(ckpt), str(out)]) == 0
    ids = torch.randint(0, 128, (2, 160), generator=torch.Generator().manual_seed(0))  # 2.5 SKA chunks of 64
    with torch.no_grad():
        megatron = full_logits(load_megatron_checkpoint(ckpt).eval(), ids)
        hf = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert relative_error(megatron[..., :hf.shape[-1]], hf) <= 1e-4


@pytest.mark.slow
def test_imported_checkpoint_resumes_in_the_launcher_at_tp2(tmp_path, model_parallel_tp1):
    """launcher (TP = 1) -> export-hf -> import-hf -> the launcher at TP = 2 (`--load`, release checkpoint):
    training starts from the trained weights (loss far below a fresh model's) and goes on falling."""
    ckpt, out, imported = tmp_path / "ckpt", tmp_path / "hf", tmp_path / "imported"
    trained = losses(launch([*TINY, "--train-iters", "8", "--save", str(ckpt), "--save-interval", "8"]).stdout)
    assert main(["export-hf", str(ckpt), str(out)]) == 0 and main(["import-hf", str(out), str(imported)]) == 0
    resumed = losses(launch([*TINY, "--tensor-model-parallel-size", "2", "--train-iters", "3", "--load", str(imported),
                             "--finetune", "--no-load-optim", "--no-load-rng"]).stdout)
    assert resumed[1] < trained[1] - 1.0 and resumed[3] < resumed[1], (trained, resumed)
