"""`SKAConfig`: Megatron's `TransformerConfig` plus the Spectral Koopman Attention hyper-parameters.

Every SKA field is named `ska_*`, so Megatron-LM's argument machinery (`--ska-rank` ->
`args.ska_rank` -> `core_transformer_config_from_args(args, SKAConfig)`) can drive them.

A plain `TransformerConfig` works too (Megatron-LM's `pretrain_hybrid.py --spec
echo_megatron.megatron.specs echo_hybrid_stack_spec` builds one): `SKAConfig.from_transformer_config`
reads it with the defaults below — H = `num_attention_heads`, r = P = `kv_channels`, every other
`ska_*` field at its `SKAConfig` default. `SKAConfig` stays the way to tune SKA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

SKA_NORMS = ("causal_max", "sequence_max", "none")
SKA_BACKENDS = ("auto", "torch", "reference", "triton")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass
class SKAConfig(TransformerConfig):
    """TransformerConfig with the SKA layer's options (SPEC §2–5).

    Per head: query/key width `ska_rank` (r), value width `ska_value_dim` (P); a layer has
    `ska_num_heads` (H) heads, split over tensor-parallel ranks.
    """

    ska_num_heads: Optional[int] = None
    """H, SKA heads per layer; default `num_attention_heads`. Must be divisible by the TP size."""

    ska_rank: Optional[int] = None
    """r, query/key width per head; default `kv_channels`."""

    ska_value_dim: Optional[int] = None
    """P, value width per head; default `kv_channels`."""

    ska_chunk_size: int = 64
    """S: a query in chunk c reads the statistics of chunks < c (chunk-causal)."""

    ska_power: int = 2
    """K, power of the whitened Koopman operator in the readout (0 = ridge predictor)."""

    ska_eps: float = 1e-3
    """Ridge: λ = eps·m² (max-norm normalisations) or eps (norm "none")."""

    ska_norm: str = "causal_max"
    """Key-norm normalisation: "causal_max", "none", or the non-causal "sequence_max" (needs
    `ska_allow_sequence_max`; paper-faithful only, never for language-model training)."""

    ska_allow_sequence_max: bool = False
    """Explicit opt-in for ska_norm="sequence_max", which leaks the future (SPEC §3, §9 trap 1)."""

    ska_power_iters: int = 6
    """Power-iteration steps of the (gradient-free) spectral-norm estimate."""

    ska_zero_init_output: bool = True
    """Zero-initialise the output projection H·P -> d (else `output_layer_init_method`)."""

    ska_eta_init: float = 1.5
    """Initial output scale η of every head."""

    ska_backend: str = "auto"
    """`echo_megatron.ops.ska` backend: "auto", "torch", "reference" or "triton"."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._resolve_ska_fields()

    @classmethod
    def from_transformer_config(cls, config: TransformerConfig) -> "SKAConfig":
        """`config` itself if it is an `SKAConfig`; else an `SKAConfig` with exactly `config`'s attribute
        values (Megatron's `__post_init__` is not re-run on them) and the SKA defaults: H =
        `num_attention_heads`, r = P = `kv_channels`, the other `ska_*` fields as declared above.
        A snapshot: attributes Megatron sets on `config` later (e.g. `no_sync_func`) stay on `config`;
        the SKA layer reads only its own options and the model-shape fields from it."""
        if isinstance(config, cls):
            return config
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig (or an SKAConfig), got {type(config).__name__}")
        derived = object.__new__(cls)
        derived.__dict__.update(vars(config))
        for field in fields(cls):
            if field.name.startswith("ska_") and field.name not in derived.__dict__:
                setattr(derived, field.name, field.default)
        derived._resolve_ska_fields()
        return derived

    def _resolve_ska_fields(self) -> None:
        """The one place that derives the `ska_*` defaults from the attention fields and validates them."""
        if self.ska_num_heads is None:
            self.ska_num_heads = self.num_attention_heads
        if self.ska_rank is None:
            self.ska_rank = self.kv_channels
        if self.ska_value_dim is None:
            self.ska_value_dim = self.kv_channels
        _check_int("ska_num_heads", self.ska_num_heads, 1)
        if self.ska_num_heads % self.tensor_model_parallel_size:
            raise ValueError(
                f"ska_num_heads ({self.ska_num_heads}) must be divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}): SKA heads are split over tensor-parallel ranks"
            )
        _check_int("ska_rank", self.ska_rank, 1)
        _check_int("ska_value_dim", self.ska_value_dim, 1)
        _check_int("ska_chunk_size", self.ska_chunk_size, 1)
        _check_int("ska_power", self.ska_power, 0)
        _check_int("ska_power_iters", self.ska_power_iters, 0)
        _check_finite("ska_eps", self.ska_eps)
        if self.ska_eps <= 0:
            raise ValueError(f"ska_eps must be > 0, got {self.ska_eps!r}")
        _check_finite("ska_eta_init", self.ska_eta_init)
        if self.ska_eta_init <= 0:
            raise ValueError(
                f"ska_eta_init must be > 0, got {self.ska_eta_init!r}: with the zero-initialised output projection, "
                "η = 0 zeroes the gradients of both that projection and η, so SKA never trains"
            )
        if self.ska_norm not in SKA_NORMS:
            raise ValueError(f"ska_norm must be one of {SKA_NORMS}, got {self.ska_norm!r}")
        if self.ska_norm == "sequence_max" and not self.ska_allow_sequence_max:
            raise ValueError(
                'ska_norm="sequence_max" takes the key-norm maximum over the whole sequence, so outputs '
                "depend on future tokens; set ska_allow_sequence_max=True to opt in (paper reproduction "
                'only), or use "causal_max"'
            )
        if self.ska_backend not in SKA_BACKENDS:
            raise ValueError(f"ska_backend must be one of {SKA_BACKENDS}, got {self.ska_backend!r}")
        for name in ("ska_zero_init_output", "ska_allow_sequence_max"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
