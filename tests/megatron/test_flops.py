"""FLOP accounting: hand counts on tiny configs, SKA linear vs softmax quadratic in T, and agreement
with Megatron-LM's own `num_floating_point_operations` wherever the two count the same layers."""

import types
import typing

import pytest
import typing_extensions

from echo_megatron.megatron.config import SKAConfig
from echo_megatron.megatron.flops import (
    FlopCount,
    hybrid_model_flops,
    koopman_mlp_flops,
    layer_flops,
    ska_layer_flops,
    softmax_attention_layer_flops,
)


def hand_count_config(**overrides) -> SKAConfig:
    """d=8, H=2 heads (kv_channels 4), r=3, P=2, S=2, K=2, one power iteration."""
    fields = dict(
        num_layers=4, hidden_size=8, num_attention_heads=2, ska_rank=3, ska_value_dim=2,
        ska_chunk_size=2, ska_power=2, ska_power_iters=1, ffn_hidden_size=16,
        mamba_state_dim=4, mamba_head_dim=4, mamba_num_groups=1,
    )
    return SKAConfig(**{**fields, **overrides})


def test_ska_layer_hand_count():
    # One head, T=5, S=2 -> 3 chunks; r=3, P=2, K=2, n_pi=1.
    statistics = 2 * 5 * 9 + 2 * 5 * 9 + 2 * 5 * 2 * 3  # G, M, C = 90 + 90 + 60
    prefix = 3 * (9 + 9 + 6)  # G, M, C sums over 3 chunks
    cholesky, whitening = 27 / 3, 27 + 27
    readout_matrix = 18 + 18 + 2 * 36  # C·L⁻ᵀ, ·L⁻¹, two [2×3]·[3×3] products
    power_iteration = 9 * 2 + 9 * 2 + 9 * 2  # Wv, Wᵀu, final Wv (no gradient)
    readout = 2 * 5 * 2 * 3
    trained = statistics + prefix + 3 * (cholesky + whitening + readout_matrix) + readout
    assert trained == 885
    head = FlopCount(trained + 3 * power_iteration, 2 * trained)
    projections = 2 * 5 * 8 * 2 * (3 + 3 + 2) + 2 * 5 * 2 * 2 * 8  # fused q/k/v, output
    expected = 2 * head + FlopCount(projections, 2 * projections)
    assert ska_layer_flops(hand_count_config(), seq_length=5) == expected
    assert ska_layer_flops(hand_count_config(), seq_length=5, batch_size=3) == 3 * expected
    assert expected.forward == 3694 and expected.backward == 6740


def test_ska_is_linear_in_tokens_softmax_is_quadratic():
    config = hand_count_config(ska_chunk_size=64)
    lengths = [64, 128, 256, 512, 1024]
    ska = [ska_layer_flops(config, t).total for t in lengths]
    softmax = [softmax_attention_layer_flops(config, t).total for t in lengths]
    for t, s, s2, a, a2 in zip(lengths, ska, ska[1:], softmax, softmax[1:]):
        assert s2 == pytest.approx(2 * s, rel=1e-12)  # exactly linear when S divides T
        # core attention 2·T²·H·d_h (×3 for fwd+bwd): doubling T adds 3·4·T²·H·d_h beyond linear
        assert a2 - 2 * a == 3 * 4 * t**2 * 2 * 4
    # a chunk that is not full still costs its dense algebra
    assert ska_layer_flops(config, 65).forward > ska_layer_flops(config, 64).forward * 65 / 64


def test_koopman_mlp_hand_count():
    # d=8 -> d_k = 64·ceil(21/64) = 64
    assert koopman_mlp_flops(8, tokens=5, gate=False) == FlopCount(10240, 20480)
    assert koopman_mlp_flops(8, tokens=5, gate=True) == FlopCount(15360, 30720)


def test_hybrid_model_sums_its_layers():
    config = hand_count_config()
    kw = dict(seq_length=6, batch_size=2)
    mamba = layer_flops("M", config, **kw)
    # Mamba: d_in = 16, 4 heads, in_proj 8 -> 2·16 + 2·4 + 4 = 44, scan 7·12·16·4, out_proj 16 -> 8
    assert mamba.forward == 2 * 12 * 8 * 44 + 7 * 12 * 16 * 4 + 2 * 12 * 16 * 8
    logits = 2 * 12 * 8 * 100
    model = hybrid_model_flops("M*M-", config, vocab_size=100, ffn="koopman", **kw)
    expected = (2 * mamba + ska_layer_flops(config, 6, 2) + koopman_mlp_flops(8, 12, False)
                + FlopCount(logits, 2 * logits))
    assert model == expected
    assert hybrid_model_flops("M*|M-", config, vocab_size=100, ffn="koopman", **kw) == model
    # an MTP depth adds its layers, an eh_proj 2d -> d and another logits GEMM
    mtp = hybrid_model_flops("M*M-/M-", config, vocab_size=100, ffn="koopman", **kw)
    extra = 2 * 12 * 16 * 8 + logits
    assert mtp == model + mamba + koopman_mlp_flops(8, 12, False) + FlopCount(extra, 2 * extra)


def test_moe_hand_count():
    config = hand_count_config(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
                         moe_shared_expert_intermediate_size=8)
    router, routed, shared = 2 * 5 * 8 * 4, 2 * (2 * 5 * 8 * 16 * 2), 2 * 5 * 8 * 8 * 2
    assert layer_flops("E", config, seq_length=5) == FlopCount(router + routed + shared,
                                                               2 * (router + routed + shared))


def test_bad_arguments_are_rejected():
    config = hand_count_config()
    with pytest.raises(ValueError, match="attention"):
        hybrid_model_flops("M*", config, seq_length=4, vocab_size=10, attention="flash")
    with pytest.raises(ValueError, match="ffn"):
        hybrid_model_flops("M-", config, seq_length=4, vocab_size=10, ffn="swiglu")
    with pytest.raises(ValueError, match="symbol"):
        hybrid_model_flops("MD", config, seq_length=4, vocab_size=10)
    with pytest.raises(ValueError, match="valid layer symbol"):
        hybrid_model_flops("MX", config, seq_length=4, vocab_size=10)


def test_softmax_baseline_matches_megatron_num_floating_point_operations(monkeypatch):
    """Megatron-LM's MFU formula and ours agree on M, *, - and G layers with softmax attention and
    plain MLPs; with SKA in '*' only the attention layers' count changes."""
    monkeypatch.setattr(typing, "override", typing_extensions.override, raising=False)
    from megatron.training.training import num_floating_point_operations

    pattern, seq, batch, vocab = "M*-G|M*-M", 256, 3, 1000
    config = hand_count_config(
        hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=160, gated_linear_unit=True, mamba_state_dim=16, mamba_head_dim=16,
        mamba_num_groups=2, linear_key_head_dim=8, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4,
        ska_chunk_size=64,
    )
    args = types.SimpleNamespace(
        hybrid_layer_pattern=pattern, seq_length=seq, hidden_size=64, padded_vocab_size=vocab,
        mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2, mamba_num_heads=None,
        num_attention_heads=4, group_query_attention=True, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=160, swiglu=True, moe_latent_size=None, moe_ffn_hidden_size=None,
        moe_shared_expert_intermediate_size=None, moe_router_topk=1, linear_key_head_dim=8,
        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_conv_kernel_dim=4, mtp_num_layers=None,
    )
    megatron = num_floating_point_operations(args, batch)
    ours = hybrid_model_flops(pattern, config, seq_length=seq, batch_size=batch, vocab_size=vocab,
                              attention="softmax")
    assert ours.total == pytest.approx(megatron, rel=1e-12)
    ska = hybrid_model_flops(pattern, config, seq_length=seq, batch_size=batch, vocab_size=vocab)
    attention_layers = 2
    difference = attention_layers * (ska_layer_flops(config, seq, batch).total
                                     - softmax_attention_layer_flops(config, seq, batch).total)
    assert ska.total - megatron == pytest.approx(difference, rel=1e-12)
