"""NIAH's long-context evaluation of softmax attention: flash SDPA computes Megatron's function."""

import dataclasses

import pytest
import torch

from echo_megatron.tasks import mqar_benchmark as mb
from echo_megatron.tasks import trainer
from echo_megatron.tasks.flash_eval import flash_core_attention


@pytest.fixture(scope="module")
def attention_model():
    """A tiny Megatron hybrid with softmax attention (Mamba-2, attention, MLP), trained a few steps
    so that attention is not near-uniform, in eval mode."""
    trainer.initialize_distributed(1, seed=0)
    preset = dataclasses.replace(mb.NIAH_CPU_PRESET, pattern="M*-", hidden_size=32, num_heads=2, mamba_head_dim=8,
                                 mamba_state_dim=8, ffn_hidden_size=64, ska_chunk_size=8)
    trainer.seed_everything(0)
    model = mb.build_model("mamba_attention", preset, 128)
    run = mb.Run("mamba_attention", 1, (24,), (24,), 0)
    config = dataclasses.replace(preset, steps=5, batch_size=8, warmup_steps=0).train_config(3e-3, "t", False)
    trainer.train(model, mb.train_batch_fn(dataclasses.replace(preset, batch_size=8), run), config)
    return model.eval()


@pytest.mark.parametrize("seq_len", [1, 37, 100])
def test_flash_evaluation_matches_megatrons_attention_kernel(attention_model, seq_len):
    ids = torch.randint(0, 128, (3, seq_len), generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        reference = trainer.logits_of(attention_model, ids)
        with flash_core_attention(attention_model) as routed:
            flash = trainer.logits_of(attention_model, ids)
        restored = trainer.logits_of(attention_model, ids)
    assert routed == 1
    assert reference.abs().max() > 1.0  # trained logits, not a degenerate all-zero comparison
    torch.testing.assert_close(flash, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(restored, reference)  # the context manager restores Megatron's kernel


def test_flash_evaluation_refuses_training_mode(attention_model):
    attention_model.train()
    try:
        with flash_core_attention(attention_model), pytest.raises(ValueError, match="eval mode only"):
            trainer.logits_of(attention_model, torch.zeros(1, 8, dtype=torch.long))
    finally:
        attention_model.eval()
