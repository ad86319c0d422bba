"""Megatron -> Hugging Face: fp32 logits per architecture (perturbed weights, dt_bias far negative, across SKA
chunk boundaries), the target chosen (stock nemotron_h vs echo_hybrid), and Megatron -> HF -> Megatron bit-identity."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from echo_megatron.hf import export_model, import_checkpoint, load_megatron_checkpoint
from echo_megatron.hf.megatron_io import megatron_tensors, read_checkpoint
from tests.hf.common import ARCHITECTURES, SEQ, VOCAB, full_logits, perturbed_model, relative_error

TOLERANCE = 1e-4  # max |Δ| <= 1e-4 · max |logit|
TARGETS = {"ska": "echo_hybrid", "koopman": "echo_hybrid", "softmax_gqa": "nemotron_h", "swiglu_ska": "echo_hybrid"}


def _ids(batch: int = 2, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_megatron_to_hf_logits(architecture, tmp_path, model_parallel_tp1):
    model = perturbed_model(architecture)
    ids = _ids()
    reference = full_logits(model, ids)
    config = export_model(model, tmp_path / "hf")
    assert config.model_type == TARGETS[architecture]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        error = relative_error(reference, hf(ids).logits)
    print(f"{architecture}: max|Δ|/max|logit| = {error:.2e}")
    assert error <= TOLERANCE


def test_stock_dt_clamp_is_detected(tmp_path, model_parallel_tp1):
    """The perturbation catches transformers' dt clamp at time_step_min: with it the logits move by far more
    than our conversion error (so the parity tests above would see a regression to the stock clamp)."""
    model = perturbed_model("ska")
    ids = _ids()
    reference = full_logits(model, ids)
    export_model(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        exact = relative_error(reference, hf(ids).logits)
        for block in hf.model.layers:
            if block.block_type == "linear_attention":
                block.mixer.time_step_limit = (hf.config.time_step_min, float("inf"))
        clamped = relative_error(reference, hf(ids).logits)
    assert clamped > 20 * exact, (clamped, exact)


@pytest.mark.parametrize("architecture", ["koopman", "softmax_gqa", "swiglu_ska"])
def test_round_trip_bit_identical(architecture, tmp_path, model_parallel_tp1):
    """Megatron -> HF -> Megatron checkpoint: every tensor bit-identical; the checkpoint loads back as a model."""
    model = perturbed_model(architecture)
    export_model(model, tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    _, tensors, iteration = read_checkpoint(tmp_path / "ckpt")
    original = megatron_tensors(model)
    assert iteration == 0 and sorted(tensors) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(tensors[name], tensor), name
    reloaded = load_megatron_checkpoint(tmp_path / "ckpt").eval()
    ids = _ids(1, 16)
    assert torch.equal(full_logits(reloaded, ids), full_logits(model, ids))
