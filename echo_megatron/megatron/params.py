"""Parameter counts of Echo hybrid models, layer by layer, without building them.

The counts are those of the modules `build_hybrid_model` builds (local or TE specs; a TE fused
norm has the same parameters as the local spec's separate norm): RMSNorm weights only, no linear
biases (`add_bias_linear=False`, as in every preset). They are checked against real builds in
`tests/megatron/test_params.py`. Pattern symbols: 'M' Mamba-2, '*' SKA or softmax attention,
'-' MLP or Koopman MLP; '|' is ignored.
"""

from __future__ import annotations

from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols, get_hybrid_layer_counts
from megatron.core.transformer.transformer_config import TransformerConfig

from .flops import ATTENTION_KINDS, FFN_KINDS, mamba_inner_and_heads
from .koopman_mlp import koopman_width

MAMBA_CONV_WIDTH = 4  # MambaMixer's d_conv (with a bias per channel)


def _check_kinds(attention: str, ffn: str) -> None:
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    if ffn not in FFN_KINDS:
        raise ValueError(f"ffn must be one of {FFN_KINDS}, got {ffn!r}")


def mamba_layer_params(config: TransformerConfig) -> int:
    """Pre-norm d; in_proj d → 2·d_in + 2·G·N + heads; conv1d (d_in + 2·G·N)·(4 + 1); dt_bias, A_log,
    D per head; gated norm d_in; out_proj d_in → d."""
    d, state, groups = config.hidden_size, config.mamba_state_dim, config.mamba_num_groups
    inner, heads = mamba_inner_and_heads(config)
    conv_channels = inner + 2 * groups * state
    return (d + d * (2 * inner + 2 * groups * state + heads) + conv_channels * (MAMBA_CONV_WIDTH + 1)
            + 3 * heads + inner + inner * d)


def ska_layer_params(config: TransformerConfig) -> int:
    """Pre-norm d; fused q/k/v d → H·(2r + P); output H·P → d; η and ρ per head (SPEC §5)."""
    d, h, r, p = config.hidden_size, config.ska_num_heads, config.ska_rank, config.ska_value_dim
    return d + d * h * (2 * r + p) + h * p * d + 2 * h


def softmax_attention_layer_params(config: TransformerConfig) -> int:
    """Pre-norm d; linear_qkv d → (H + 2·groups)·d_h; linear_proj H·d_h → d."""
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.kv_channels
    groups = config.num_query_groups or heads
    return d + d * (heads + 2 * groups) * head_dim + heads * head_dim * d


def mlp_layer_params(config: TransformerConfig) -> int:
    """Pre-norm d; fc1 d → ffn (2·ffn gated); fc2 ffn → d."""
    d, ffn = config.hidden_size, config.ffn_hidden_size
    return d + d * ffn * (3 if config.gated_linear_unit else 2)


def koopman_layer_params(config: TransformerConfig) -> int:
    """Pre-norm d; lift d → d_k; γ, ω per pair (d_k/2 each); readout d_k → d (SPEC §7, no gate)."""
    d = config.hidden_size
    width = koopman_width(d)
    return d + 2 * d * width + width


def layer_params(symbol: str, config: TransformerConfig, *, attention: str = "ska", ffn: str = "mlp") -> int:
    """Parameters of one layer of a hybrid pattern (symbol 'M', '*' or '-')."""
    _check_kinds(attention, ffn)
    if symbol == Symbols.MAMBA:
        return mamba_layer_params(config)
    if symbol == Symbols.ATTENTION:
        return ska_layer_params(config) if attention == "ska" else softmax_attention_layer_params(config)
    if symbol == Symbols.MLP:
        return koopman_layer_params(config) if ffn == "koopman" else mlp_layer_params(config)
    raise ValueError(f"layer symbol must be one of M * - for parameter counting, got {symbol!r}")


def hybrid_model_params(
    pattern: str, config: TransformerConfig, *, vocab_size: int, attention: str = "ska", ffn: str = "mlp",
    tie_embeddings: bool = True,
) -> int:
    """Parameters of a `HybridModel` built by `build_hybrid_model(config, pattern, vocab_size, …)`:
    its layers, the final norm, the embedding (V·d, unpadded) and, untied, the output layer."""
    layers = sum(count * layer_params(symbol, config, attention=attention, ffn=ffn)
                 for symbol, count in get_hybrid_layer_counts(pattern).items() if count)
    embeddings = vocab_size * config.hidden_size * (1 if tie_embeddings else 2)
    return layers + config.hidden_size + embeddings
