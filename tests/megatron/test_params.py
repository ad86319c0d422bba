"""Analytic parameter counts (`echo_megatron.megatron.params`) against real builds: tiny models on the CPU,
every preset on the meta device, and the published sizes of the presets."""

import pytest
import torch

from megatron.core.models.hybrid.hybrid_layer_allocation import get_hybrid_layer_counts

from echo_megatron.megatron import PRESETS, build_hybrid_model, get_preset
from echo_megatron.megatron.params import hybrid_model_params, layer_params
from echo_megatron.megatron.presets import MEGATRON_8B_PATTERN

from .common import VOCAB, tiny_config


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("attention", ["ska", "softmax"])
@pytest.mark.parametrize("ffn", ["mlp", "koopman"])
@pytest.mark.parametrize("tie", [True, False])
def test_count_matches_a_real_build(model_parallel_tp1, attention, ffn, tie):
    pattern = "M*M-*-"
    config = tiny_config(pattern, num_query_groups=2, gated_linear_unit=ffn == "mlp")
    model = build_hybrid_model(config, pattern, VOCAB, 32, ffn=ffn, attention=attention,
                               share_embeddings_and_output_weights=tie)
    assert hybrid_model_params(pattern, config, vocab_size=VOCAB, attention=attention, ffn=ffn,
                               tie_embeddings=tie) == parameter_count(model)


def test_count_with_explicit_mamba_heads(model_parallel_tp1):
    config = tiny_config("M-", mamba_num_heads=6, mamba_head_dim=8)
    model = build_hybrid_model(config, "M-", VOCAB, 16)
    assert hybrid_model_params("M-", config, vocab_size=VOCAB, tie_embeddings=False) == parameter_count(model)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_on_the_meta_device(model_parallel_tp1, name):
    preset = get_preset(name)
    config = preset.make_config(use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        model = preset.build(config, seq_length=128)
    assert hybrid_model_params(preset.pattern, config, vocab_size=preset.vocab_size,
                               ffn=preset.ffn) == parameter_count(model)


# The sizes quoted in presets.py, examples/README.md and the paper (50M, 180M).
PRESET_SIZES = {"echo-50m": 50_100_208, "echo-180m": 184_932_448, "echo-1b": 1_282_826_528,
                "echo-8b": 7_706_604_800}


@pytest.mark.parametrize("name", sorted(PRESET_SIZES))
def test_preset_sizes(name):
    preset = get_preset(name)
    assert hybrid_model_params(preset.pattern, preset.make_config(), vocab_size=preset.vocab_size,
                               ffn=preset.ffn) == PRESET_SIZES[name]


def test_echo_8b_is_megatrons_8b_hybrid_with_ska():
    preset = get_preset("echo-8b")
    assert preset.pattern == MEGATRON_8B_PATTERN and len(preset.pattern) == 56
    counts = get_hybrid_layer_counts(preset.pattern)
    assert (counts["M"], counts["*"], counts["-"]) == (24, 4, 28)
    config = preset.make_config()
    assert (config.hidden_size, config.ffn_hidden_size, config.mamba_state_dim) == (4096, 16384, 128)
    assert (config.ska_num_heads, config.ska_rank, config.ska_value_dim) == (32, 128, 128)  # the paper's r
    # untied embeddings as Megatron's example trains it: one more 256k x 4096 matrix
    untied = hybrid_model_params(preset.pattern, config, vocab_size=preset.vocab_size, tie_embeddings=False)
    assert untied - PRESET_SIZES["echo-8b"] == 256000 * 4096
    # SKA (32 heads, r = 128, P = 128) in '*' costs d·32·(2·128 + 128) + 32·128·d + 64 per layer vs GQA's
    # d·(32 + 2·8)·128 + 32·128·d
    softmax = hybrid_model_params(preset.pattern, config, vocab_size=preset.vocab_size, attention="softmax")
    assert PRESET_SIZES["echo-8b"] - softmax == 4 * (4096 * 32 * 384 + 64 - 4096 * 48 * 128)


def test_bad_symbol_and_kinds_are_rejected():
    config = tiny_config()
    with pytest.raises(ValueError, match="symbol"):
        layer_params("G", config)
    with pytest.raises(ValueError, match="attention"):
        layer_params("*", config, attention="flash")
    with pytest.raises(ValueError, match="ffn"):
        layer_params("-", config, ffn="swiglu")
