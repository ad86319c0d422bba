"""FLOP accounting: hand counts on tiny configs, SKA linear vs softmax quadratic in T, and agreement
with Megatron-LM's own `num_floating_point_operations` wherever the two count the same layers."""

import math
import types
import typing

import pytest
import torch
import typing_extensions
from torch.utils.flop_counter import FlopCounterMode

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from echo_megatron.megatron import SKASubmodules, SpectralKoopmanAttention, build_hybrid_model
from echo_megatron.megatron.config import SKAConfig
from echo_megatron.megatron.flops import (
    FlopCount,
    hybrid_model_flops,
    koopman_mlp_flops,
    layer_flops,
    ska_layer_flops,
    softmax_attention_layer_flops,
)
from echo_megatron.megatron.koopman_mlp import KoopmanMLP, KoopmanMLPSubmodules

from .common import VOCAB, full_logits, tiny_config


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
    statistics = FlopCount(2 * 5 * 9 + 2 * 5 * 9 + 2 * 5 * 2 * 3,  # G, M, C = 90 + 90 + 60
                           2 * 2 * 5 * 3 * (3 + 3 + 2))  # A = [Z | Z₋ | V], S = AᵀZ: Z dSᵀ and A dS
    readout = FlopCount(2 * 5 * 2 * 3, 2 * 2 * 5 * 2 * 3)  # Y = R Q; dQ, dR
    prefix = 3 * (9 + 9 + 6)  # G, M, C sums over 3 chunks; backward a reverse sum, 1×
    factorisation = 3 * (27 / 3 + 27 + 2 * 27)  # Cholesky, Λ = L⁻¹, W = L⁻¹ M L⁻ᵀ (no backward: hand-written)
    chain = FlopCount(3 * (2 + 2) * 2 * 2 * 9,  # C Λᵀ, K = 2 products ·W, ·Λ: [2×3]·[3×3] each
                      3 * ((8 + 4 * 2) * 2 * 9 + (8 + 4) * 27))  # the chain's adjoint; Cholesky adjoint, dM, dW
    power_iteration = 3 * (9 * 2 + 9 * 2 + 9 * 2)  # Wv, Wᵀu, final Wv (no gradient)
    head = (statistics + readout + FlopCount(prefix, prefix) + FlopCount(factorisation, 0) + chain
            + FlopCount(power_iteration, 0))
    assert head == FlopCount(1236, 2508)
    projections = 2 * 5 * 8 * 2 * (3 + 3 + 2) + 2 * 5 * 2 * 2 * 8  # fused q/k/v, output
    expected = 2 * head + FlopCount(projections, 2 * projections)
    assert ska_layer_flops(hand_count_config(), seq_length=5) == expected
    assert ska_layer_flops(hand_count_config(), seq_length=5, batch_size=3) == 3 * expected
    assert expected.forward == 4072 and expected.backward == 8216


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


# ----------------------------------------------------------------------------- against FlopCounterMode
# torch's FlopCounterMode counts matmul-like ops (mm, bmm, addmm, baddbmm, SDPA, convolution) on the real
# layers' forward and backward. It cannot see Cholesky factorisations, triangular solves or additions, so
# the comparisons below subtract exactly those terms of flops.py's model (`ska_unseen`) and check the rest
# to the FLOP. Mamba's SSD scan is Megatron's estimate 7·tokens·d_in·N in flops.py; the CPU-mode scan
# (`echo_megatron.megatron.cpu`, chunked pure PyTorch) is a different algorithm, so the Mamba mixers are
# compared on their projections only (their conv1d is counted by neither flops.py nor Megatron).


def flop_counter(run) -> tuple[dict[str, int], dict[str, int]]:
    """Per-module FLOPs FlopCounterMode sees in the forward `run()` and in the backward of its sum."""
    with FlopCounterMode(display=False) as forward:
        run()
    with FlopCounterMode(display=False) as both:
        run().sum().backward()
    fwd = {name: sum(ops.values()) for name, ops in forward.get_flop_counts().items()}
    total = {name: sum(ops.values()) for name, ops in both.get_flop_counts().items()}
    return fwd, {name: total[name] - fwd.get(name, 0) for name in total}


def ska_unseen(config: SKAConfig, seq_length: int, batch_size: int) -> FlopCount:
    """The terms of `ska_layer_flops` that are not matmuls: the prefix additions (forward and backward), the
    Cholesky factorisation and the three triangular solves (forward only: the backward is hand-written)."""
    r, p = config.ska_rank, config.ska_value_dim
    chunks = math.ceil(seq_length / config.ska_chunk_size)
    prefix = FlopCount(2 * r * r + p * r, 2 * r * r + p * r)
    factorisation = FlopCount(r**3 / 3 + 3 * r**3, 0)
    return (prefix + factorisation) * (chunks * batch_size * config.ska_num_heads)


@pytest.mark.usefixtures("model_parallel_tp1")
@pytest.mark.parametrize("seq_length, batch_size, chunk, power, iters",
                         [(32, 2, 8, 2, 6), (48, 1, 16, 1, 3), (24, 3, 4, 0, 0)])
def test_ska_layer_matches_flop_counter(seq_length, batch_size, chunk, power, iters):
    config = tiny_config(ska_chunk_size=chunk, ska_power=power, ska_power_iters=iters, ska_zero_init_output=False,
                         ska_backend="torch")
    layer = SpectralKoopmanAttention(config, SKASubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear))
    hidden = torch.randn(seq_length, batch_size, config.hidden_size, requires_grad=True)
    forward, backward = flop_counter(lambda: layer(hidden, attention_mask=None)[0])
    seen = ska_layer_flops(config, seq_length, batch_size) - ska_unseen(config, seq_length, batch_size)
    assert (forward["Global"], backward["Global"]) == (seen.forward, seen.backward)


@pytest.mark.usefixtures("model_parallel_tp1")
@pytest.mark.parametrize("gate", [False, True])
def test_koopman_mlp_matches_flop_counter(gate):
    config = TransformerConfig(num_layers=1, hidden_size=40, num_attention_heads=1, add_bias_linear=False,
                               use_cpu_initialization=True)
    mlp = KoopmanMLP(config, KoopmanMLPSubmodules(lift=ColumnParallelLinear, readout=RowParallelLinear,
                                                  gate=ColumnParallelLinear if gate else None))
    hidden = torch.randn(24, 2, 40, requires_grad=True)
    forward, backward = flop_counter(lambda: mlp(hidden)[0])
    expected = koopman_mlp_flops(40, tokens=48, gate=gate)
    assert (forward["Global"], backward["Global"]) == (expected.forward, expected.backward)


@pytest.mark.usefixtures("model_parallel_tp1")
@pytest.mark.parametrize("ffn", ["koopman", "mlp"])
def test_small_model_matches_flop_counter(ffn):
    """A whole `M*M-*-` HybridModel (embedding, layers, final norm, logits): everything except the
    Mamba scans agrees to the FLOP; the scans are reported in the failure message for reference."""
    pattern, seq_length, batch_size = "M*M-*-", 32, 2
    config = tiny_config(pattern, ska_zero_init_output=False, ska_backend="torch",
                         gated_linear_unit=True)
    torch.manual_seed(0)
    model = build_hybrid_model(config, pattern, VOCAB, seq_length, ffn=ffn)
    ids = torch.randint(0, VOCAB, (batch_size, seq_length))
    forward, backward = flop_counter(lambda: full_logits(model, ids))

    def without_mamba_cores(counts: dict[str, int]) -> int:
        mixers = [name for name in counts if name.endswith(".mixer")]
        cores = sum(counts[m] - counts.get(f"{m}.in_proj", 0) - counts.get(f"{m}.out_proj", 0) for m in mixers)
        return counts["Global"] - cores

    tokens = seq_length * batch_size
    d_inner = 2 * config.hidden_size
    scan = FlopCount(7 * tokens * d_inner * config.mamba_state_dim, 14 * tokens * d_inner * config.mamba_state_dim)
    expected = (hybrid_model_flops(pattern, config, seq_length=seq_length, batch_size=batch_size, vocab_size=VOCAB,
                                   ffn=ffn)
                - 2 * ska_unseen(config, seq_length, batch_size) - 2 * scan)
    measured = (without_mamba_cores(forward), without_mamba_cores(backward))
    assert measured == (expected.forward, expected.backward), f"Mamba cores: {forward}"


def test_triton_byte_model_matches_a_hand_count():
    """r = P = S = 64, bf16 tokens: a statistics row is 4·(2·64² + 64²) = 49,152 B per chunk, R and L⁻¹
    16,384 B each. Forward per chunk 2 rows + R + L⁻¹ = 131,072 B, i.e. 2,048 B per token, plus 4 token
    vectors of 128 B; backward 3 rows less G (the dense backward reads M and C only) + R + L⁻¹ = 163,840 B →
    2,560 B per token, plus 7 token vectors. At r = P = 128 the backward is the two stages' (5 rows less G,
    R, L⁻¹ and the next chunk's dM): 4·(3·128²) = 196,608 B a row, 65,536 B a square."""
    from echo_megatron.megatron.flops import ska_triton_hbm_bytes

    bytes_ = ska_triton_hbm_bytes(rank=64, value_dim=64, chunk_size=64)
    assert (bytes_.forward, bytes_.backward) == (2048 + 4 * 128, 2560 + 7 * 128)
    halved = ska_triton_hbm_bytes(rank=64, value_dim=64, chunk_size=128)  # per-chunk traffic halves with S
    assert halved.forward == 2048 / 2 + 4 * 128
    wide = ska_triton_hbm_bytes(rank=128, value_dim=128, chunk_size=64)
    assert wide.backward == (5 * 196_608 - 65_536 + 3 * 65_536) / 64 + 7 * 256
    # blocks of 8 chunks: the visible statistics written and read by the forward once in 8 chunks (2 rows / 8), M
    # and C of them read by the backward once in 8; k and v (256 B per token) read again for 7 chunks in 8
    blocks = ska_triton_hbm_bytes(rank=64, value_dim=64, chunk_size=64, chunks_per_block=8)
    assert blocks.forward == (2 * 49_152 / 8 + 2 * 16_384) / 64 + 4 * 128 + 7 / 8 * 256
    assert blocks.backward == ((49_152 - 16_384) / 8 + 2 * 16_384 + 2 * 49_152) / 64 + 7 * 128 + 7 / 8 * 256
    assert blocks.forward + blocks.backward < 5_000  # issue 18's target: 4,672 B


def _saved_bytes(tokens: int, rank: int, value_dim: int, chunk: int) -> int:
    """Bytes of the tensors the Triton path's autograd saves for one head and `tokens` tokens, inputs left out."""
    from echo_megatron.ops import ska

    torch.manual_seed(0)
    q, k = (torch.randn(1, tokens, 1, rank, requires_grad=True) for _ in range(2))
    v = torch.randn(1, tokens, 1, value_dim, requires_grad=True)
    eta, gamma = torch.full((1,), 1.5, requires_grad=True), torch.full((1,), 1.2, requires_grad=True)
    inputs, saved = {t.data_ptr() for t in (q, k, v, eta, gamma)}, {}

    def pack(tensor):
        if tensor.data_ptr() not in inputs:
            saved[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ska(q, k, v, eta=eta, gamma=gamma, chunk_size=chunk, power=2, backend="triton")
    return sum(saved.values())


def test_triton_saved_bytes_model_counts_what_autograd_saves():
    """The model's bytes per token are what one more block of chunks adds to the tensors saved for the backward
    (fp32, r = 16, P = 8, S = 16, Triton interpreter, blocks of `INTERPRETED_BLOCK_CHUNKS` = G chunks: 1 chunk
    and 1 block, then 1 + G chunks and 2 blocks): what depends on T, not the few per-head constants."""
    from echo_megatron.megatron.flops import ska_triton_saved_bytes
    from echo_megatron.ops.triton.function import INTERPRETED_BLOCK_CHUNKS as every

    added = _saved_bytes(16 * (1 + every), 16, 8, 16) - _saved_bytes(16, 16, 8, 16)
    assert added / (16 * every) == ska_triton_saved_bytes(rank=16, value_dim=8, chunk_size=16, chunks_per_block=every)


def test_triton_saved_bytes_model_matches_the_h200_measurement():
    """benchmarks/ska_activation_memory.py measured the SKA operator's saved bytes per token on one H200 (bf16,
    T = 4096, the presets' shapes before echo-8b's r = 128): the model × H is within 0.1 % of every row."""
    import json
    from pathlib import Path

    from echo_megatron.megatron.flops import ska_triton_saved_bytes

    results = Path(__file__).parents[2] / "benchmarks" / "results" / "ska_activation_memory_h200.json"
    rows = [row for row in json.loads(results.read_text())["rows"] if row["backend"] == "triton" and "error" not in row]
    assert len(rows) == 4
    for row in rows:
        heads, rank, value_dim, chunk, _ = row["shape"]
        model = heads * ska_triton_saved_bytes(rank=rank, value_dim=value_dim, chunk_size=chunk)
        assert model == pytest.approx(row["saved_bytes_per_token"], rel=1e-3), row["preset"]
