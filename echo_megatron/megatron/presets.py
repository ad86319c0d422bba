"""Named Echo model presets (SPEC §8): `echo-50m`, `echo-180m`, the larger `echo-1b` and `echo-8b`, and
the CPU-sized `echo-tiny`.

The paper counts a block as a mixer plus its feed-forward; in Megatron's hybrid pattern each is a
layer, so "16 layers with SKA at {3, 7, 11, 15}" is the 32-symbol pattern "M-M-M-*-…". With the
Koopman MLP (no gate) in every '-', Mamba-2 d_state 64, head width 64, one group, RMSNorm, no linear
biases and tied embeddings this gives 50.1M (echo-50m) and 184.9M (echo-180m) parameters
(`echo_megatron.megatron.params.hybrid_model_params`; tested against real builds).

`echo-1b` (1.28B) scales the same recipe: d = 2048, 25 blocks with SKA in every fifth, {4, 9, 14, 19, 24},
16 heads with r = 64, P = 128 (H·P = d), Megatron's Mamba-2 defaults (d_state 128, head 64, 8 groups).
`echo-8b` is Megatron-LM's 8B hybrid (`examples/mamba`: 56 layers `MEGATRON_8B_PATTERN`, d = 4096,
32 heads, 8 query groups for the softmax baseline, plain 4d MLPs, Mamba-2 defaults, 256k vocabulary)
with SKA at the paper's r = 128 (32 heads, P = 128) in its four '*' slots: 7.71B tied, 8.76B with untied
embeddings (as Megatron's example trains it). It ran r = 64 until issue 18, because the old Triton kernels
ran out of shared memory at r = 128 on an H200 (measured, benchmarks/ska_activation_memory.py). Now every
kernel compiles for sm_90 at r = P = 128 with no spills, and the dense kernels fit 2 programs per SM (the
compile report in docs/performance.md). What r = 128 costs against r = 64 is COMPUTED from the models in
examples/README.md's rank-cost table (`python scripts/rank_cost.py`). SKA's GPU speed at r = 128 is
unmeasured (`scripts/gpu_check.sh` times an r = P = 128 column when a GPU is lent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch.nn.functional as F

from megatron.core.models.hybrid.hybrid_model import HybridModel

from .config import SKAConfig
from .koopman_mlp import koopman_width
from .specs import build_hybrid_model


def echo_pattern(blocks: int, ska_blocks: set[int]) -> str:
    """Hybrid pattern of `blocks` (mixer, FFN) pairs: SKA ('*') at the 0-based `ska_blocks`, else Mamba-2."""
    return "".join(("*" if i in ska_blocks else "M") + "-" for i in range(blocks))


@dataclass(frozen=True)
class HybridPreset:
    """A named model: pattern, vocabulary, default FFN kind, `SKAConfig` fields and training length."""

    name: str
    pattern: str
    vocab_size: int
    ffn: str
    config_fields: Mapping[str, object] = field(default_factory=dict)
    seq_length: int = 2048
    """Default training sequence length (the launcher's `--seq-length`)."""

    def _fields(self) -> dict:
        return dict(num_layers=len(self.pattern), add_bias_linear=False, normalization="RMSNorm",
                    hidden_dropout=0.0, attention_dropout=0.0, **self.config_fields)

    def make_config(self, **overrides) -> SKAConfig:
        """The preset's `SKAConfig`; `overrides` replace or add any `SKAConfig` field."""
        return SKAConfig(**{**self._fields(), **overrides})

    def megatron_args(self) -> dict[str, object]:
        """The preset as Megatron-LM argument values (`args.<dest>`, e.g. for `parser.set_defaults`):
        pattern, sizes, vocabulary, sequence length, `ska_*`; no position embeddings, tied embeddings."""
        fields = self._fields()
        gated, activation = fields.pop("gated_linear_unit", False), fields.pop("activation_func", None)
        if (gated, activation) == (True, F.silu):
            fields["swiglu"] = True
        elif (gated, activation) != (False, None):
            raise ValueError(f"preset {self.name}: only SwiGLU or the default activation map to Megatron flags")
        if fields.get("num_query_groups") is not None:
            fields["group_query_attention"] = True  # Megatron reads num_query_groups only with this flag
        return dict(fields, hybrid_layer_pattern=self.pattern, vocab_size=self.vocab_size,
                    seq_length=self.seq_length, max_position_embeddings=self.seq_length,
                    position_embedding_type="none", untie_embeddings_and_output_weights=False)

    def build(self, config: SKAConfig, seq_length: int, *, spec: str = "local", ffn: str | None = None,
              attention: str = "ska", **model_kwargs) -> HybridModel:
        """`build_hybrid_model` with the preset's pattern and vocabulary (tied embeddings by default)."""
        model_kwargs.setdefault("share_embeddings_and_output_weights", True)
        return build_hybrid_model(config, self.pattern, self.vocab_size, seq_length, spec=spec,
                                  ffn=ffn or self.ffn, attention=attention, **model_kwargs)


# Megatron-LM's 8B hybrid (examples/mamba): 24 Mamba-2, 4 attention and 28 MLP layers.
MEGATRON_8B_PATTERN = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"


def _mamba(state_dim: int, head_dim: int, groups: int) -> dict:
    return dict(mamba_state_dim=state_dim, mamba_head_dim=head_dim, mamba_num_groups=groups)


PRESETS: Mapping[str, HybridPreset] = MappingProxyType({
    "echo-50m": HybridPreset(
        name="echo-50m", pattern=echo_pattern(16, {3, 7, 11, 15}), vocab_size=32000, ffn="koopman",
        config_fields=dict(hidden_size=448, num_attention_heads=7, ska_num_heads=7, ska_rank=56, ska_value_dim=64,
                           ska_chunk_size=64, **_mamba(64, 64, 1)),
    ),
    "echo-180m": HybridPreset(
        name="echo-180m", pattern=echo_pattern(24, {8, 16}), vocab_size=32000, ffn="koopman",
        config_fields=dict(hidden_size=768, num_attention_heads=12, ska_num_heads=12, ska_rank=48, ska_value_dim=64,
                           ska_chunk_size=64, **_mamba(64, 64, 1)),
    ),
    "echo-1b": HybridPreset(
        name="echo-1b", pattern=echo_pattern(25, {4, 9, 14, 19, 24}), vocab_size=32000, ffn="koopman",
        config_fields=dict(hidden_size=2048, num_attention_heads=16, ska_num_heads=16, ska_rank=64,
                           ska_value_dim=128, ska_chunk_size=64, **_mamba(128, 64, 8)),
    ),
    "echo-8b": HybridPreset(
        name="echo-8b", pattern=MEGATRON_8B_PATTERN, vocab_size=256000, ffn="mlp",
        config_fields=dict(hidden_size=4096, num_attention_heads=32, num_query_groups=8, ska_num_heads=32,
                           ska_rank=128, ska_value_dim=128, ska_chunk_size=64, **_mamba(128, 64, 8)),
    ),
    # SPEC §8 synthetic size: d=128, 2 Mamba-2 + 2 SKA blocks, r=24, 4 heads, d_state 16, vocab 128,
    # SwiGLU; 2 Mamba groups so that it also runs at tensor-parallel size 2.
    "echo-tiny": HybridPreset(
        name="echo-tiny", pattern=echo_pattern(4, {1, 3}), vocab_size=128, ffn="mlp", seq_length=256,
        config_fields=dict(hidden_size=128, num_attention_heads=4, ska_num_heads=4, ska_rank=24, ska_value_dim=32,
                           ska_chunk_size=64, ffn_hidden_size=koopman_width(128), gated_linear_unit=True,
                           activation_func=F.silu, **_mamba(16, 32, 2)),
    ),
})


def get_preset(name: str) -> HybridPreset:
    """The preset called `name` (one of `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]
