"""SKAConfig: defaults and every validation error (each names the field); a plain TransformerConfig."""

import dataclasses

import pytest

from megatron.core.transformer.transformer_config import TransformerConfig

from echo_megatron.megatron import SKAConfig

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4)


def test_defaults_follow_the_attention_shape():
    config = SKAConfig(**BASE)
    assert (config.ska_num_heads, config.ska_rank, config.ska_value_dim) == (4, 16, 16)
    assert (config.ska_chunk_size, config.ska_power, config.ska_eps, config.ska_norm) == (64, 2, 1e-3, "causal_max")
    assert (config.ska_power_iters, config.ska_zero_init_output, config.ska_eta_init) == (6, True, 1.5)
    explicit = SKAConfig(**BASE, kv_channels=8, ska_num_heads=2, ska_rank=5)
    assert (explicit.ska_num_heads, explicit.ska_rank, explicit.ska_value_dim) == (2, 5, 8)


def test_sequence_max_needs_the_explicit_opt_in():
    with pytest.raises(ValueError, match="ska_allow_sequence_max"):
        SKAConfig(**BASE, ska_norm="sequence_max")
    assert SKAConfig(**BASE, ska_norm="sequence_max", ska_allow_sequence_max=True).ska_norm == "sequence_max"


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(ska_num_heads=0), "ska_num_heads must be an int >= 1"),
        (dict(ska_num_heads=2.0), "ska_num_heads must be an int >= 1"),
        (dict(ska_num_heads=3, tensor_model_parallel_size=2), r"ska_num_heads \(3\) must be divisible by tensor_model_parallel_size \(2\)"),
        (dict(ska_rank=0), "ska_rank must be an int >= 1"),
        (dict(ska_value_dim=-1), "ska_value_dim must be an int >= 1"),
        (dict(ska_chunk_size=0), "ska_chunk_size must be an int >= 1"),
        (dict(ska_chunk_size=True), "ska_chunk_size must be an int >= 1"),
        (dict(ska_power=-1), "ska_power must be an int >= 0"),
        (dict(ska_power_iters=-2), "ska_power_iters must be an int >= 0"),
        (dict(ska_eps=0.0), "ska_eps must be > 0"),
        (dict(ska_eps=float("nan")), "ska_eps must be a finite number"),
        (dict(ska_eta_init=float("inf")), "ska_eta_init must be a finite number"),
        (dict(ska_eta_init=0.0), "ska_eta_init must be > 0"),
        (dict(ska_eps=float("inf")), "ska_eps must be a finite number"),
        (dict(ska_norm="max"), "ska_norm must be one of"),
        (dict(ska_backend="cuda"), "ska_backend must be one of"),
        (dict(ska_zero_init_output=1), "ska_zero_init_output must be a bool"),
        (dict(ska_allow_sequence_max="yes"), "ska_allow_sequence_max must be a bool"),
    ],
)
def test_validation_errors_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        SKAConfig(**BASE, **fields)


def test_plain_transformer_config_gets_the_documented_defaults():
    plain = TransformerConfig(**BASE, kv_channels=24, hidden_dropout=0.25)
    derived = SKAConfig.from_transformer_config(plain)
    assert isinstance(derived, SKAConfig) and derived is not plain
    assert (derived.ska_num_heads, derived.ska_rank, derived.ska_value_dim) == (4, 24, 24)
    reference = SKAConfig(**BASE, kv_channels=24)  # every other ska_* at SKAConfig's declared default
    ska_fields = [f.name for f in dataclasses.fields(SKAConfig) if f.name.startswith("ska_")]
    assert {n: getattr(derived, n) for n in ska_fields} == {n: getattr(reference, n) for n in ska_fields}
    for field in dataclasses.fields(TransformerConfig):  # the Megatron fields exactly as given, not re-derived
        assert getattr(derived, field.name) is getattr(plain, field.name), field.name
    assert SKAConfig.from_transformer_config(reference) is reference
    with pytest.raises(TypeError, match="config must be a TransformerConfig"):
        SKAConfig.from_transformer_config(dict(BASE))
