"""FLOP accounting for SKA layers and whole Echo hybrid models (Megatron's MFU code would count SKA as
quadratic softmax attention).

Conventions (those of Megatron-LM's `num_floating_point_operations`):
- a multiply-add is 2 FLOPs; a [m, n] × [n, k] matmul costs 2·m·n·k;
- backward = 2 × forward (data gradient + weight gradient), so a training step is 3 × forward;
  exceptions, all in SKA's per-chunk algebra (see `ska_operator_flops`): the power iteration runs
  without gradient, triangular solves and the Cholesky factorisation have torch's backward costs;
- elementwise work (norms, activations, residuals, softmax, the Koopman pair rotation, scalings) is
  not counted; the embedding lookup is free; the logits cost 2·tokens·d·V;
- counts are for the whole model (all tensor-parallel ranks together) and unpadded tokens.
Dense linear algebra uses the LAPACK counts: Cholesky of an n×n matrix n³/3, a triangular solve with
m right-hand sides n²·m.

Pattern symbols are Megatron's (`megatron.core.models.hybrid.hybrid_layer_allocation.Symbols`):
'M' Mamba-2, '*' attention (SKA or softmax), '-' MLP (plain or Koopman), 'G' Gated DeltaNet,
'E' MoE; '|' pipeline separators are ignored and '/'-separated MTP depths are counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.core.models.hybrid.hybrid_layer_allocation import (
    Symbols,
    get_hybrid_layer_counts,
    parse_hybrid_pattern,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from .koopman_mlp import koopman_width

ATTENTION_KINDS = ("ska", "softmax")
FFN_KINDS = ("mlp", "koopman")
MAMBA_EXPAND = 2  # MambaMixer's default expand (d_inner = 2·d unless mamba_num_heads is set)
MAMBA_SCAN_FLOPS_PER_STATE = 7  # Megatron's SSD-scan estimate: 7 · tokens · d_inner · d_state


@dataclass(frozen=True)
class ForwardBackward:
    """A quantity split into its forward and backward parts."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclass(frozen=True)
class FlopCount(ForwardBackward):
    """Forward and backward FLOPs of one training step's worth of work."""

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.forward + other.forward, self.backward + other.backward)

    def __sub__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.forward - other.forward, self.backward - other.backward)

    def __mul__(self, times: int) -> "FlopCount":
        return FlopCount(self.forward * times, self.backward * times)

    __rmul__ = __mul__


def _trained(forward: float) -> FlopCount:
    """Work with gradients: backward = 2 × forward."""
    return FlopCount(forward, 2 * forward)


def ska_operator_flops(
    *, seq_length: int, batch_size: int, num_heads: int, rank: int, value_dim: int,
    chunk_size: int, power: int, power_iters: int,
) -> FlopCount:
    """The SKA operator of SPEC §2–3 (chunk_causal), without projections, for `batch_size` sequences, as the
    torch path (`echo_megatron.ops.chunked`) computes it.

    Per head, with n = ceil(T/S) chunks (forward; backward):
      statistics  G, M: 2·T·r² each, C: 2·T·P·r, one product Aᵀ Z with A = [Z | Z₋ | V]
                  (backward 8·T·r² + 4·T·P·r: Z dSᵀ and A dS)
      readout     Y = R_c Q_c: 2·T·P·r                                 (backward 2×)
      prefix sums over chunks: n·(2r² + P·r) additions                 (backward: a reverse sum, 1×)
      per chunk   Cholesky r³/3; Λ = L⁻¹ r³ and W = L⁻¹ M L⁻ᵀ 2·r³ (triangular solves);
                  R = a^K (C Λᵀ) W^K Λ: 2·(K + 2)·P·r²; power iteration (4·n_pi + 2)·r², no gradient
                  (backward, hand-written: (8 + 4K)·P·r² for the chain, 8·r³ for the Cholesky adjoint and
                  dM, 4·r³ more for dW when K > 0)
    """
    t, r, p = seq_length, rank, value_dim
    chunks = math.ceil(t / chunk_size)
    tokens = FlopCount(4 * t * r * r + 4 * t * p * r, 8 * t * r * r + 8 * t * p * r)
    prefix = FlopCount(chunks * (2 * r * r + p * r), chunks * (2 * r * r + p * r))
    factorisation = FlopCount(chunks * (r**3 / 3 + 3 * r**3), 0)
    chain = FlopCount(chunks * 2 * (power + 2) * p * r * r,
                      chunks * ((8 + 4 * power) * p * r * r + (8 + 4 * (power > 0)) * r**3))
    power_iteration = FlopCount(chunks * (4 * power_iters + 2) * r * r, 0)
    return (tokens + prefix + factorisation + chain + power_iteration) * (batch_size * num_heads)


def ska_triton_hbm_bytes(*, rank: int, value_dim: int, chunk_size: int, element_bytes: int = 2,
                         chunks_per_block: int = 1) -> ForwardBackward:
    """HBM bytes per token and head that the Triton path (`echo_megatron.ops.triton`, chunk_causal, one long
    sequence) moves, kernel by kernel, as the kernels read and write them; the next byte model to the FLOP
    model above. Statistics rows are fp32, D = 2r² + P·r floats per chunk; token tensors (q, k, v, y and
    their gradients) have `element_bytes`. Assumed to stay in L2, so a lower bound: the dense kernels'
    workspace and the walk's scratch (each written and read by the same program), the R a dense program
    reads its chunk out from right after writing it, the block's first row a dense program reads again to
    advance it, and what the column programs of one walk read in common (a chunk's k and v tiles, and the
    gradient rows, which two of them read in part); at r = P = 64 the two dense programs an H100 SM holds have
    2 × 304 KiB of workspace, 78 MiB over 132 SMs against a 50 MiB L2. The per-chunk scalars (max norms, σ, dη
    and dγ̂ shares) are left out (< 1 %). Per chunk of S tokens, G = chunks_per_block
    (`function.chunks_per_block`: what the launch picks for the shape and GPU):

      forward   walk (statistics and scan): read k, v, write the visible statistics D of one chunk in G
                dense + readout: read those D, and for the other chunks k and v of the chunk before (the
                statistics recomputed), q; write R (P·r, for the backward), L⁻¹ (r²) and y
      backward  dense + readout: read M and C of the block's first D (not G: the Cholesky backward works from
                L⁻¹), k and v again as the forward, L⁻¹, R, q, dy; write dD of every chunk and dq (dR stays in
                the workspace)
                walk: read dD, k, v, write dk, dv — for r and P padded to <= 64 (`walks_backward`); wider, the
                two stages': scan, read dD, write the chunk rows' gradient; statistics, read it, k, v and the
                next chunk's dM (r²), write dk, dv
    """
    from ..ops.triton.function import walks_backward

    r, p, e, g = rank, value_dim, element_bytes, chunks_per_block
    row, square, readout = 4 * (2 * r * r + p * r), 4 * r * r, 4 * p * r
    key, value = e * r, e * p  # one token's key (or query) and value (or output)
    recomputed = (g - 1) / g * (key + value)  # k, v read again per token to recompute statistics
    statistics_backward = row if walks_backward(r, p) else 2 * row + row + square
    per_chunk = ForwardBackward(
        forward=(row / g + row / g + readout + square),
        backward=((row - square) / g + square + readout + row + statistics_backward),
    )
    per_token = ForwardBackward(forward=(key + value) + (key + value) + recomputed,  # k, v read; q read, y written
                                backward=(key + value + key) + recomputed + (key + value + key + value))
    return ForwardBackward(per_chunk.forward / chunk_size + per_token.forward,
                           per_chunk.backward / chunk_size + per_token.backward)


def ska_triton_saved_bytes(*, rank: int, value_dim: int, chunk_size: int, chunks_per_block: int = 1) -> float:
    """Bytes per token and head that the Triton path's autograd keeps for the backward beyond its inputs
    (q, k, v) and output, chunk_causal, one long sequence, r and P ≤ 128 (the dense kernels). Per chunk,
    fp32: the visible statistics (2r² + P·r) of one chunk in G = chunks_per_block (the backward recomputes the
    others, as the forward does), L⁻¹ (r²), R (P·r) and four scalars (the chunk's and the visible max key
    norm, max(1, σ), the ridge coefficient)."""
    r, p = rank, value_dim
    return 4 * ((2 * r * r + p * r) / chunks_per_block + r * r + p * r + 4) / chunk_size


def ska_layer_flops(config: TransformerConfig, seq_length: int, batch_size: int = 1) -> FlopCount:
    """An SKA layer (SPEC §5): fused q/k/v projection 2·T·d·H(2r+P), the operator, output 2·T·H·P·d.

    config: an SKAConfig (reads hidden_size and ska_num_heads, ska_rank, ska_value_dim,
    ska_chunk_size, ska_power, ska_power_iters).
    """
    d, h, r, p = config.hidden_size, config.ska_num_heads, config.ska_rank, config.ska_value_dim
    tokens = seq_length * batch_size
    projections = _trained(2 * tokens * d * h * (2 * r + p) + 2 * tokens * h * p * d)
    return projections + ska_operator_flops(
        seq_length=seq_length, batch_size=batch_size, num_heads=h, rank=r, value_dim=p,
        chunk_size=config.ska_chunk_size, power=config.ska_power,
        power_iters=config.ska_power_iters,
    )


def softmax_attention_layer_flops(
    config: TransformerConfig, seq_length: int, batch_size: int = 1
) -> FlopCount:
    """Causal softmax attention as Megatron counts it: q/k/v/output projections (GQA-aware) plus
    QKᵀ and AV, 4·T²·H·d_h per sequence, halved by the causal mask."""
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = config.kv_channels
    groups = config.num_query_groups or heads
    tokens = seq_length * batch_size
    projections = 2 * tokens * d * head_dim * (2 * heads + 2 * groups)
    core = 2 * batch_size * seq_length**2 * heads * head_dim
    return _trained(projections + core)


def mamba_inner_and_heads(config: TransformerConfig) -> tuple[int, int]:
    """(d_in, heads) of a Mamba-2 mixer, as MambaMixer derives them from the config."""
    if config.mamba_num_heads is not None:
        return config.mamba_num_heads * config.mamba_head_dim, config.mamba_num_heads
    inner = MAMBA_EXPAND * config.hidden_size
    return inner, inner // config.mamba_head_dim


def mamba_layer_flops(config: TransformerConfig, tokens: int) -> FlopCount:
    """A Mamba-2 layer as Megatron counts it: in_proj d → 2·d_in + 2·G·N + heads, the SSD scan
    estimate 7·tokens·d_in·N, out_proj d_in → d (d_in, heads as MambaMixer derives them)."""
    d, state, groups = config.hidden_size, config.mamba_state_dim, config.mamba_num_groups
    inner, heads = mamba_inner_and_heads(config)
    in_proj = 2 * tokens * d * (2 * inner + 2 * groups * state + heads)
    scan = MAMBA_SCAN_FLOPS_PER_STATE * tokens * inner * state
    out_proj = 2 * tokens * inner * d
    return _trained(in_proj + scan + out_proj)


def _dense_ffn(tokens: int, hidden_size: int, ffn_hidden_size: int, gated: bool) -> float:
    """fc1 d → ffn (2·ffn if gated) and fc2 ffn → d."""
    return 2 * tokens * hidden_size * ffn_hidden_size * (3 if gated else 2)


def mlp_layer_flops(config: TransformerConfig, tokens: int) -> FlopCount:
    """Megatron's MLP: fc1 (doubled with gated_linear_unit) and fc2 of width ffn_hidden_size."""
    return _trained(
        _dense_ffn(tokens, config.hidden_size, config.ffn_hidden_size, config.gated_linear_unit)
    )


def koopman_mlp_flops(hidden_size: int, tokens: int, gate: bool) -> FlopCount:
    """Spectral Koopman MLP (SPEC §7): lift (and gate) d → d_k, readout d_k → d."""
    return _trained(_dense_ffn(tokens, hidden_size, koopman_width(hidden_size), gate))


def gdn_layer_flops(config: TransformerConfig, tokens: int) -> FlopCount:
    """Gated DeltaNet as Megatron counts it: in_proj, conv1d, the delta rule 4·Hv·dv² per token,
    out_proj."""
    qk_dim = config.linear_key_head_dim * config.linear_num_key_heads
    v_dim = config.linear_value_head_dim * config.linear_num_value_heads
    v_heads = config.linear_num_value_heads
    per_token = (
        config.hidden_size * (2 * qk_dim + 2 * v_dim + 2 * v_heads)
        + config.linear_conv_kernel_dim * (2 * qk_dim + v_dim)
        + v_heads * config.linear_value_head_dim**2 * 4
        + config.hidden_size * v_dim
    )
    return _trained(2 * tokens * per_token)


def moe_layer_flops(config: TransformerConfig, tokens: int) -> FlopCount:
    """MoE: router 2·tokens·d·E, top-k routed experts of moe_ffn_hidden_size, optional shared expert."""
    if config.moe_latent_size is not None:
        raise ValueError("moe_layer_flops: moe_latent_size is not supported (must be None)")
    d, gated = config.hidden_size, config.gated_linear_unit
    routed = config.moe_router_topk * _dense_ffn(tokens, d, config.moe_ffn_hidden_size, gated)
    shared_size = config.moe_shared_expert_intermediate_size or 0
    router = 2 * tokens * d * config.num_moe_experts
    return _trained(router + routed + _dense_ffn(tokens, d, shared_size, gated))


def layer_flops(
    symbol: str, config: TransformerConfig, *, seq_length: int, batch_size: int = 1,
    attention: str = "ska", ffn: str = "mlp", koopman_gate: bool = False,
) -> FlopCount:
    """One layer of a hybrid pattern: symbol in 'M' '*' '-' 'G' 'E' (see `hybrid_model_flops`)."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    if ffn not in FFN_KINDS:
        raise ValueError(f"ffn must be one of {FFN_KINDS}, got {ffn!r}")
    tokens = seq_length * batch_size
    if symbol == Symbols.MAMBA:
        return mamba_layer_flops(config, tokens)
    if symbol == Symbols.ATTENTION:
        if attention == "ska":
            return ska_layer_flops(config, seq_length, batch_size)
        return softmax_attention_layer_flops(config, seq_length, batch_size)
    if symbol == Symbols.MLP:
        if ffn == "koopman":
            return koopman_mlp_flops(config.hidden_size, tokens, koopman_gate)
        return mlp_layer_flops(config, tokens)
    if symbol == Symbols.GDN:
        return gdn_layer_flops(config, tokens)
    if symbol == Symbols.MOE:
        return moe_layer_flops(config, tokens)
    raise ValueError(f"layer symbol must be one of M * - G E for FLOP counting, got {symbol!r}")


def hybrid_model_flops(
    pattern: str, config: TransformerConfig, *, seq_length: int, vocab_size: int,
    batch_size: int = 1, attention: str = "ska", ffn: str = "mlp", koopman_gate: bool = False,
) -> FlopCount:
    """FLOPs of a hybrid model (Megatron `HybridModel`) for `batch_size` sequences of `seq_length`.

    pattern: Megatron hybrid pattern, e.g. "M*M-" ('|' ignored; each MTP depth after '/' adds its
        layers, an eh_proj 2d → d and a logits GEMM). attention: what '*' layers are ("ska" |
        "softmax"); ffn: what '-' layers are ("mlp" | "koopman"); koopman_gate: gated Koopman MLPs.
    config: the model's TransformerConfig (an SKAConfig when '*' layers are SKA).
    """
    total = FlopCount(0, 0)
    for symbol, count in get_hybrid_layer_counts(pattern).items():
        if count:
            total = total + count * layer_flops(
                symbol, config, seq_length=seq_length, batch_size=batch_size,
                attention=attention, ffn=ffn, koopman_gate=koopman_gate,
            )
    tokens = seq_length * batch_size
    d = config.hidden_size
    mtp_depths = parse_hybrid_pattern(pattern).mtp_num_depths
    logits = 2 * tokens * d * vocab_size * (1 + mtp_depths)
    mtp_projections = 2 * tokens * (2 * d) * d * mtp_depths
    return total + _trained(logits + mtp_projections)


# ---- Context-parallel communication volume (bytes per layer per rank) ----

@dataclass(frozen=True)
class CommBytes(ForwardBackward):
    """Bytes one rank receives for one layer over its context-parallel group, forward and backward."""


def ska_cp_exchange_numbers(*, num_heads: int, rank: int, value_dim: int) -> int:
    """Numbers one rank contributes per sequence to the SKA CP all-gather (`echo_megatron.ops.context_parallel`):
    for each of its 2 segments and each head, G and M (r² each), C (P·r), the max key norm m (1) and the
    segment's first and last keys (2r)."""
    return 2 * num_heads * (2 * rank * rank + value_dim * rank + 1 + 2 * rank)


def ska_cp_comm_bytes(
    *, cp_size: int, num_heads: int, rank: int, value_dim: int, batch_size: int = 1,
    tensor_parallel_size: int = 1, bytes_per_number: int = 4,
) -> CommBytes:
    """SKA under context parallelism, as implemented: forward, one all-gather of every rank's segment totals
    (a rank receives (c−1)·s numbers, s = `ska_cp_exchange_numbers` of its H/TP heads per sequence);
    backward, one all-to-all returning each rank the c−1 other ranks' gradients of its s numbers (the traffic
    of a reduce-scatter). Independent of the sequence length. Statistics are fp32 (4 bytes) for bf16/fp32
    models."""
    local = ska_cp_exchange_numbers(num_heads=num_heads // tensor_parallel_size, rank=rank, value_dim=value_dim)
    per_direction = (cp_size - 1) * local * batch_size * bytes_per_number
    return CommBytes(per_direction, per_direction)


def ring_attention_cp_comm_bytes(
    *, seq_length: int, cp_size: int, num_query_groups: int, head_dim: int, batch_size: int = 1,
    tensor_parallel_size: int = 1, bytes_per_number: int = 2,
) -> CommBytes:
    """Causal ring attention (Megatron/TE `cp_comm_type="p2p"`), modelled: in the forward every rank receives
    the K and V blocks of the T/c tokens of each of the c−1 other ranks, (c−1)/c·T·2·G·d_h numbers (G key/value
    groups on this TP rank); in the backward K, V travel the ring again together with their gradients dK, dV
    (twice the forward). bf16 (2 bytes) by default."""
    groups = max(1, num_query_groups // tensor_parallel_size)
    forward = (cp_size - 1) * (seq_length // cp_size) * 2 * groups * head_dim * batch_size * bytes_per_number
    return CommBytes(forward, 2 * forward)
