"""Spectral Koopman MLP (SPEC §7): the optional Echo feed-forward for the `'-'` slot of a hybrid stack.

    h = norm(x);  g = SiLU(W_lift h)                        g: [s, b, d_k]
    (z_2i + i·z_2i+1) = λ̂_i · (g_2i + i·g_2i+1),   λ_i = γ_i − i·ω_i,   λ̂_i = λ_i / max(1, |λ_i|)
    z ← z ⊙ sigmoid(W_gate h)                               (optional gate)
    out = W_readout z                                       (x + out via the layer's bias-dropout-add)

with d_k = 64·ceil(⌊8d/3⌋/64). As for Megatron's `MLP` in `MLPLayer`, the pre-norm is not part of
this module: it is the `TransformerLayer`'s `pre_mlp_layernorm` (local spec) or fused into the lift
(`TELayerNormColumnParallelLinear`, TE spec; only without a gate, whose input must be normalised too).

Tensor parallelism: lift and gate are column-parallel, readout row-parallel; each rank owns d_k/TP
consecutive lift outputs, i.e. whole pairs, so the per-pair γ, ω ([d_k/2] globally) are sharded along
the pair axis and the rotation needs no communication. `sharded_state_dict` axis-maps γ and ω so
distributed checkpoints do not depend on the TP size.

Clamp (SPEC §9 trap 7): the rescale factor 1/max(1, |λ_i|) is applied without gradient. The forward
value always has |λ̂_i| ≤ 1, and γ, ω receive the unclamped gradient times that factor. A fully
differentiated rescale would project the gradient onto the circle when |λ_i| > 1 — which holds for
almost every pair at init (γ = 1, ω ≠ 0) — so no pair could ever learn a modulus below 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none

OMEGA_INIT_STD = 0.1
WIDTH_MULTIPLE = 64


def koopman_width(hidden_size: int) -> int:
    """Koopman MLP width d_k = 64·ceil(⌊8d/3⌋/64) for model width d (SPEC §7)."""
    return WIDTH_MULTIPLE * math.ceil((8 * hidden_size // 3) / WIDTH_MULTIPLE)


@dataclass
class KoopmanMLPSubmodules:
    """ModuleSpecs (or classes) of the Koopman MLP's linears, built like Megatron's MLP fc1/fc2.

    lift: column-parallel d → d_k (may fuse the pre-norm, e.g. TELayerNormColumnParallelLinear).
    readout: row-parallel d_k → d.
    gate: column-parallel d → d_k, or None for no gate. Needs a lift without a fused norm.
    """

    lift: Union[ModuleSpec, type]
    readout: Union[ModuleSpec, type]
    gate: Optional[Union[ModuleSpec, type]] = None


class KoopmanMLP(MegatronModule):
    """Spectral Koopman MLP: hidden_states [s, b, d] → (output [s, b, d], bias [d] or None).

    Built from a `ModuleSpec` as the `mlp` of a `TransformerLayer`/`MLPLayer`, which calls it with
    `config`, `pg_collection`, `is_mtp_layer` and `name` (and `submodules` from the spec).
    Parameters `gamma`, `omega`: [d_k / (2·TP)] per rank.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: KoopmanMLPSubmodules,
        pg_collection: Optional[ProcessGroupCollection] = None,
        is_mtp_layer: bool = False,
        name: Optional[str] = None,
    ):
        super().__init__(config=config)
        del is_mtp_layer  # same module in MTP layers
        self.tp_group = (
            pg_collection.tp
            if pg_collection is not None
            else get_tensor_model_parallel_group_if_none(None)
        )
        tp_size, tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        self.width = koopman_width(config.hidden_size)
        num_pairs = self.width // 2
        if num_pairs % tp_size != 0:
            raise ValueError(
                f"KoopmanMLP: the {num_pairs} pairs of width d_k={self.width} (hidden_size="
                f"{config.hidden_size}) must be divisible by tensor_model_parallel_size={tp_size}"
            )
        self.num_pairs_local = num_pairs // tp_size

        def linear(spec, in_size, out_size, role, **kwargs):
            # TE's communication-overlap buffers are named after Megatron's MLP: fc1 in, fc2 out.
            return build_module(
                spec, in_size, out_size, config=config, bias=config.add_bias_linear,
                is_expert=False, tp_group=self.tp_group,
                name=f"{name}.{role}" if name is not None else None, **kwargs,
            )

        column = dict(init_method=config.init_method, gather_output=False, skip_bias_add=False,
                      tp_comm_buffer_name="fc1")
        self.lift = linear(submodules.lift, config.hidden_size, self.width, "lift", **column)
        self.gate = None
        if submodules.gate is not None:
            if hasattr(self.lift, "layer_norm_weight"):
                raise ValueError(
                    "KoopmanMLP: submodules.gate needs normalised input, but submodules.lift fuses "
                    "the pre-norm; use a plain column-parallel lift and the layer's pre_mlp_layernorm"
                )
            self.gate = linear(submodules.gate, config.hidden_size, self.width, "gate", **column)
        self.readout = linear(
            submodules.readout, self.width, config.hidden_size, "readout",
            init_method=config.output_layer_init_method, input_is_parallel=True, skip_bias_add=True,
            tp_comm_buffer_name="fc2",
        )

        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        local = dict(dtype=config.params_dtype, device=device)
        self.gamma = torch.nn.Parameter(torch.ones(self.num_pairs_local, **local))
        self.omega = torch.nn.Parameter(torch.zeros(self.num_pairs_local, **local))
        if config.perform_initialization:
            self._init_omega(num_pairs, tp_rank)
        for param in (self.gamma, self.omega):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)

    @torch.no_grad()
    def _init_omega(self, num_pairs: int, tp_rank: int) -> None:
        """ω ~ N(0, 0.1²), as Megatron's parallel linears do: with `use_cpu_initialization` one global
        draw sliced per rank (TP-independent), otherwise a local draw under the model-parallel RNG."""
        if self.config.use_cpu_initialization:
            full = torch.randn(num_pairs) * OMEGA_INIT_STD
            start = tp_rank * self.num_pairs_local
            self.omega.copy_(full[start : start + self.num_pairs_local])
        else:
            with get_cuda_rng_tracker().fork():
                self.omega.normal_(0.0, OMEGA_INIT_STD)

    def eigenvalues(self) -> tuple[Tensor, Tensor]:
        """(Re λ̂, −Im λ̂) = (γ, ω)/max(1, |λ|), [d_k/(2·TP)], at least in fp32; the factor is detached."""
        dtype = torch.promote_types(self.gamma.dtype, torch.float32)
        gamma, omega = self.gamma.to(dtype), self.omega.to(dtype)
        with torch.no_grad():
            scale = 1.0 / torch.hypot(gamma, omega).clamp_min(1.0)
        return gamma * scale, omega * scale

    def forward(self, hidden_states: Tensor, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
        """hidden_states [s, b, d] (normalised) → (output [s, b, d], bias or None).

        Routing kwargs that TransformerLayer passes to MLPs (e.g. padding_mask) are ignored, as in
        Megatron's dense MLP.
        """
        lifted, _ = self.lift(hidden_states)
        g = F.silu(lifted).unflatten(-1, (self.num_pairs_local, 2))
        g_re, g_im = g.unbind(-1)
        lam_re, lam_im_neg = (t.to(g.dtype) for t in self.eigenvalues())
        # (γ − iω)(g_re + i·g_im) = (γ·g_re + ω·g_im) + i(γ·g_im − ω·g_re)
        z = torch.stack(
            (lam_re * g_re + lam_im_neg * g_im, lam_re * g_im - lam_im_neg * g_re), dim=-1
        ).flatten(-2)
        if self.gate is not None:
            gate_logits, _ = self.gate(hidden_states)
            z = z * torch.sigmoid(gate_logits)
        return self.readout(z)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        """Distributed-checkpoint state: γ, ω TP-sharded along axis 0; linears shard themselves."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own: dict = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, tensor_parallel_layers_axis_map={"gamma": 0, "omega": 0},
            sharded_offsets=sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        for child_name, child in self.named_children():
            sharded.update(
                sharded_state_dict_default(
                    child, f"{prefix}{child_name}.", sharded_offsets, metadata,
                    tp_group=self.tp_group,
                )
            )
        return sharded
