"""`EchoHybridConfig`: transformers' `NemotronHConfig` plus Spectral Koopman Attention and the Echo FFNs.

Layer types extend NemotronH's (`"linear_attention"` Mamba-2, `"full_attention"` softmax, `"mlp"` FFN) with
`"ska"`. Every `"mlp"` layer is of one kind, `ffn_kind`: `"mlp"` (NemotronH's up/down MLP), `"gated_mlp"`
(gate/up/down, e.g. SwiGLU) or `"koopman"` (the Spectral Koopman MLP, SPEC §7).

Two deliberate differences from stock NemotronH, both to equal Megatron-Core exactly:
- `time_step_limit` (default `(0.0, inf)`) is the clamp the Mamba mixers apply to dt; stock NemotronH clamps at
  `time_step_min` (0.001), which Megatron never does.
- `mamba_norm_epsilon` (default 1e-5) is the eps of the gated RMSNorm inside the Mamba mixer: Megatron uses
  1e-5 there whatever `layer_norm_epsilon` is.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

LAYER_TYPES = ("linear_attention", "full_attention", "ska", "mlp")
FFN_KINDS = ("mlp", "gated_mlp", "koopman")
SKA_DECODE_NORMS = ("causal_max", "none")
PATTERN_SYMBOLS = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}


@strict(accept_kwargs=True)
class EchoHybridConfig(NemotronHConfig):
    r"""
    Configuration of an Echo hybrid model (Mamba-2 + Spectral Koopman Attention, optionally softmax attention).

    ska_num_heads (`int`): H, SKA heads per layer.
    ska_rank (`int`): r, query/key width per head.
    ska_value_dim (`int`): P, value width per head.
    ska_chunk_size (`int`): S; a query in chunk c reads the statistics of chunks < c.
    ska_power (`int`): K, power of the whitened Koopman operator.
    ska_eps (`float`): ridge.
    ska_norm (`str`): "causal_max" or "none" (decoding needs a causal normalisation).
    ska_power_iters (`int`): power-iteration steps of the spectral-norm estimate.
    ska_backend (`str`): `echo_megatron.ops.ska` backend of the full-sequence forward ("auto", "torch", "triton").
    ffn_kind (`str`): "mlp", "gated_mlp" or "koopman"; the kind of every "mlp" layer.
    koopman_width (`int`): d_k of the Koopman MLP; koopman_gate (`bool`): whether it has the sigmoid gate.
    mamba_norm_epsilon (`float`): eps of the Mamba mixers' gated RMSNorm.
    megatron_vocab_size (`int`): the tokenizer's vocabulary before Megatron padded it to `vocab_size`
        (rows beyond it are padding, never trained as targets), or None when unknown.
    """

    model_type = "echo_hybrid"

    ska_num_heads: int = 4
    ska_rank: int = 16
    ska_value_dim: int = 16
    ska_chunk_size: int = 64
    ska_power: int = 2
    ska_eps: float = 1e-3
    ska_norm: str = "causal_max"
    ska_power_iters: int = 6
    ska_backend: str = "auto"
    ffn_kind: str = "mlp"
    koopman_width: int = 192
    koopman_gate: bool = False
    mamba_norm_epsilon: float = 1e-5
    megatron_vocab_size: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Keep the Megatron-exact dt clamp (NemotronHConfig stores it as a tuple or list).
        self.time_step_limit = tuple(self.time_step_limit)

    def validate_layer_type(self):
        """Layer types from `LAYER_TYPES`; options with clear errors naming the field."""
        if not isinstance(self.layer_types, list) or not self.layer_types:
            raise ValueError(f"layers_block_type must be a non-empty list of {LAYER_TYPES}, got {self.layer_types!r}")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"layers_block_type may only contain {LAYER_TYPES}, got {unknown}")
        if self.ffn_kind not in FFN_KINDS:
            raise ValueError(f"ffn_kind must be one of {FFN_KINDS}, got {self.ffn_kind!r}")
        if self.ska_norm not in SKA_DECODE_NORMS:
            raise ValueError(f"ska_norm must be one of {SKA_DECODE_NORMS} (generation is causal), got {self.ska_norm!r}")
        for name in ("ska_num_heads", "ska_rank", "ska_value_dim", "ska_chunk_size", "koopman_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.koopman_width % 2:
            raise ValueError(f"koopman_width must be even (pairs of channels), got {self.koopman_width}")

    @staticmethod
    def pattern_to_layer_types(pattern: str) -> list[str]:
        """Megatron hybrid pattern ('M' Mamba-2, '*' attention or SKA, '-' FFN) -> layer types; `'*'` becomes
        "ska". Use `full_attention` in the result for softmax stacks."""
        unknown = sorted(set(pattern) - set(PATTERN_SYMBOLS))
        if unknown:
            raise ValueError(f"pattern may only contain {tuple(PATTERN_SYMBOLS)}, got {unknown} in {pattern!r}")
        return ["ska" if symbol == "*" else PATTERN_SYMBOLS[symbol] for symbol in pattern]


__all__ = ["EchoHybridConfig"]
