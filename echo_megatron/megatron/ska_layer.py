"""Spectral Koopman Attention as a Megatron-Core self-attention module (SPEC §5–6).

Placed as the `self_attention` of a `TransformerLayer` in the hybrid stack's `'*'` slot, exactly as
Megatron places Gated DeltaNet in `'G'` (`megatron/core/ssm/gated_delta_net/`):

    qkv = in_proj(h)                    column-parallel d -> H·(2r + P), per rank [q | k | v] of its heads
    y   = ska(q, k, v, η, γ̂)            `echo_megatron.ops`, per head, no communication
    out = out_proj(y)                   row-parallel H·P -> d, zero-initialised by default

The pre-norm is the layer's `input_layernorm` (local spec) or fused into `in_proj` (TE spec).
No softmax, no RoPE, no KV cache: under Megatron's static inference context the layer keeps a
constant-size `echo_megatron.ops.SKAState` per layer in `key_value_memory_dict[layer_number]`, and
under Megatron's dynamic engine one per request in an `SKADynamicInferenceContext` slot.

Per-head parameters `eta` (η) and `rho` (ρ, γ̂ = 1 + 0.5·sigmoid(ρ)) have shape [H / TP]; they are
1-D (Megatron's default optimizer rule skips weight decay on 1-D parameters) and carry
`no_weight_decay = True` for trainers with their own rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.utils import deprecate_inference_params, get_pg_rank, get_pg_size

from echo_megatron.ops import SKAState, ska, ska_context_parallel, ska_prefill, ska_step
from echo_megatron.ops.context_parallel import CP_BACKENDS, CP_NORMS

from .config import SKAConfig
from .ska_dynamic import ska_dynamic_forward

RHO_INIT = -4.0
PER_HEAD_PARAMETERS = ("eta", "rho")
IN_PROJ_SPLIT_NAMES = ("query", "key", "value")


def effective_gamma(rho: Tensor) -> Tensor:
    """γ̂ = 1 + 0.5·sigmoid(ρ): in (1, 1.5) with a live gradient everywhere (SPEC §2, §9 trap 7)."""
    return 1.0 + 0.5 * torch.sigmoid(rho)


@dataclass
class SKASubmodules:
    """Specs of the fused q/k/v projection (column-parallel) and the output projection (row-parallel)."""

    in_proj: Union[ModuleSpec, type] = IdentityOp
    out_proj: Union[ModuleSpec, type] = IdentityOp


class SpectralKoopmanAttention(MegatronModule):
    """SKA mixer: hidden_states [s/SP, b, d] -> (out [s/SP, b, d], bias [d] or None).

    Args:
        config: an `SKAConfig`, or a plain `TransformerConfig` (then H = `num_attention_heads`,
            r = P = `kv_channels` and the other SKA options at `SKAConfig`'s defaults; see
            `SKAConfig.from_transformer_config`).
        submodules: `SKASubmodules(in_proj, out_proj)`.
        layer_number: 1-based global layer number (key of the inference state).
        pg_collection: process groups (`tp` splits the heads; `cp`, as in Megatron's attention, is the
            context-parallel group: with more than one rank the layer runs `ska_context_parallel`).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SKASubmodules,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        *,
        name: Optional[str] = None,
        cp_comm_type: Optional[str] = None,
        pp_layer_offset: Optional[int] = None,
    ):
        config = SKAConfig.from_transformer_config(config)
        super().__init__(config)
        del cp_comm_type, pp_layer_offset  # accepted for TransformerLayer compatibility
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        cp_group = getattr(pg_collection, "cp", None)
        self.cp_group = cp_group if cp_group is not None and get_pg_size(cp_group) > 1 else None
        if self.cp_group is not None:
            _check_context_parallel_options(config)
        tp_size = get_pg_size(self.tp_group)
        if config.ska_num_heads % tp_size:
            raise ValueError(f"ska_num_heads ({config.ska_num_heads}) must be divisible by the tensor-parallel size ({tp_size})")

        self.layer_number = layer_number
        self.num_heads = config.ska_num_heads
        self.num_heads_local = self.num_heads // tp_size
        self.rank = config.ska_rank
        self.value_dim = config.ska_value_dim
        # Per-rank layout of in_proj's output: [q of local heads | k of local heads | v of local heads].
        self.in_proj_split_sections = (
            self.num_heads_local * self.rank,
            self.num_heads_local * self.rank,
            self.num_heads_local * self.value_dim,
        )
        # Megatron's CPU init draws in_proj's full master weight from the default generator and keeps
        # contiguous rows, which do not match our per-rank [q | k | v] layout: remember the state to redraw it.
        in_proj_rng_state = torch.get_rng_state() if config.use_cpu_initialization else None
        self.in_proj = build_module(
            submodules.in_proj,
            config.hidden_size,
            self.num_heads * (2 * self.rank + self.value_dim),
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_qkv_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.tp_group,
            name=f"{name}.in_proj" if name is not None else None,
        )
        self.in_proj.weight.partition_sizes = list(self.in_proj_split_sections)
        self.out_proj = build_module(
            submodules.out_proj,
            self.num_heads * self.value_dim,
            config.hidden_size,
            config=config,
            init_method=torch.nn.init.zeros_ if config.ska_zero_init_output else config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
            name=f"{name}.out_proj" if name is not None else None,
        )
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        local = dict(dtype=config.params_dtype, device=device)
        self.eta = torch.nn.Parameter(torch.full((self.num_heads_local,), float(config.ska_eta_init), **local))
        self.rho = torch.nn.Parameter(torch.full((self.num_heads_local,), RHO_INIT, **local))
        for param in (self.eta, self.rho):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
            param.no_weight_decay = True
        if config.perform_initialization:
            self._init_query_key_orthogonal()
            if in_proj_rng_state is not None:
                self._init_value_rows_from_master(in_proj_rng_state)

    @torch.no_grad()
    def _init_query_key_orthogonal(self) -> None:
        """Each head's q and k rows [r, d] orthogonal (orthonormal rows for r <= d).

        Like Megatron's parallel linears: with `use_cpu_initialization` the blocks of all heads are drawn
        from the default generator and each rank keeps its own (so q/k do not depend on the TP size),
        otherwise the local heads are drawn under the model-parallel RNG. v rows keep `init_method` (with
        `use_cpu_initialization` rows of its master weight: `_init_value_rows_from_master`).
        """
        weight = self.in_proj.weight
        hidden = weight.shape[1]

        def orthogonal_blocks(count: int) -> Tensor:
            blocks = torch.empty(count, self.rank, hidden, dtype=torch.float32, device=weight.device)
            for block in blocks:
                torch.nn.init.orthogonal_(block)
            return blocks

        if self.config.use_cpu_initialization:
            blocks = orthogonal_blocks(2 * self.num_heads).view(2, self.num_heads, self.rank, hidden)
            start = get_pg_rank(self.tp_group) * self.num_heads_local
            blocks = blocks[:, start : start + self.num_heads_local]
        else:
            with get_cuda_rng_tracker().fork():
                blocks = orthogonal_blocks(2 * self.num_heads_local)
        query_key = 2 * self.num_heads_local * self.rank
        weight[:query_key].copy_(blocks.reshape(query_key, hidden))

    @torch.no_grad()
    def _init_value_rows_from_master(self, rng_state: Tensor) -> None:
        """v rows of this rank's heads from in_proj's master weight [H·(2r + P), d] (TP = 1 layout).

        Redraws, from `rng_state` (the default generator before in_proj was built), the master weight that
        Megatron's `_initialize_affine_weight_cpu` drew, then restores the generator: v then does not
        depend on the TP size, and at TP = 1 it is exactly what Megatron wrote.
        """
        weight = self.in_proj.weight
        resume_state = torch.get_rng_state()
        torch.set_rng_state(rng_state)
        master = torch.empty(self.num_heads * (2 * self.rank + self.value_dim), weight.shape[1], dtype=torch.float32)
        self.config.init_method(master)
        torch.set_rng_state(resume_state)
        local_values = self.num_heads_local * self.value_dim
        start = 2 * self.num_heads * self.rank + get_pg_rank(self.tp_group) * local_values
        weight[-local_values:].copy_(master[start : start + local_values])

    def gamma(self) -> Tensor:
        """Effective γ̂ per local head [H / TP], computed in at least fp32 (bf16 would round γ̂ ≈ 1.009 to 1)."""
        return effective_gamma(self.rho.to(torch.promote_types(self.rho.dtype, torch.float32)))

    def operator_options(self) -> dict:
        """The `echo_megatron.ops` options this layer runs with (besides η, γ̂ and the backend)."""
        config = self.config
        return dict(chunk_size=config.ska_chunk_size, power=config.ska_power, eps=config.ska_eps,
                    norm=config.ska_norm, power_iters=config.ska_power_iters)

    def project(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden_states [s/SP, b, d] -> q, k [b, s, H/TP, r] and v [b, s, H/TP, P] of this rank's heads."""
        qkv, _ = self.in_proj(hidden_states)
        seq_len, batch = qkv.shape[:2]
        q, k, v = torch.split(qkv.transpose(0, 1), self.in_proj_split_sections, dim=-1)
        heads = self.num_heads_local
        return (q.reshape(batch, seq_len, heads, self.rank), k.reshape(batch, seq_len, heads, self.rank),
                v.reshape(batch, seq_len, heads, self.value_dim))

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        inference_context: Optional[BaseInferenceContext] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        sequence_len_offset: Optional[int] = None,
        *,
        inference_params: Optional[BaseInferenceContext] = None,
        **kwargs,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """hidden_states [s/SP, b, d] -> (out [s/SP, b, d], bias [d] or None).

        SKA is causal by construction: `attention_mask` and the rotary/attention kwargs are ignored.
        Packed THD batches (b = 1) use `packed_seq_params.cu_seqlens_q(_padded)`: every sequence is
        independent. Under context parallelism (CP size c > 1) the rank holds segments i and 2c−1−i of
        each sequence (or document) and exchanges per-segment statistics only. With a static inference
        context the layer prefills at sequence offset 0 and decodes token by token afterwards (constant memory).
        """
        inference_context = deprecate_inference_params(inference_context, inference_params)
        q, k, v = self.project(hidden_states)
        batch, seq_len = q.shape[:2]
        if inference_context is not None:
            y = self._inference(q, k, v, inference_context)
        elif self.cp_group is not None:
            y = ska_context_parallel(q, k, v, self.eta, self.gamma(), cp_group=self.cp_group,
                                     cu_seqlens=_packed_cu_seqlens(packed_seq_params, batch),
                                     backend=self.config.ska_backend, **self.operator_options())
        else:
            y = ska(q, k, v, eta=self.eta, gamma=self.gamma(), cu_seqlens=_packed_cu_seqlens(packed_seq_params, batch),
                    backend=self.config.ska_backend, **self.operator_options())
        y = y.reshape(batch, seq_len, self.num_heads_local * self.value_dim).transpose(0, 1).contiguous()
        return self.out_proj(y)

    def _inference(self, q: Tensor, k: Tensor, v: Tensor, context: BaseInferenceContext) -> Tensor:
        """Static batching: prefill at offset 0 (resets the state), then decode steps. Dynamic batching:
        per-request state slots of an `SKADynamicInferenceContext` (`ska_dynamic.py`)."""
        if self.config.sequence_parallel:
            raise ValueError("SpectralKoopmanAttention inference needs sequence_parallel=False (as Megatron's Mamba mixer)")
        if self.cp_group is not None:
            raise ValueError("SpectralKoopmanAttention inference needs context_parallel_size=1 (decoding is not "
                             "split over context-parallel ranks)")
        if not context.is_static_batching():
            return ska_dynamic_forward(self, q, k, v, context)
        cache = context.key_value_memory_dict
        if context.sequence_len_offset == 0:
            y, state = ska_prefill(q, k, v, eta=self.eta, gamma=self.gamma(), **self.operator_options())
        else:
            state = cache.get(self.layer_number)
            if not isinstance(state, SKAState):
                raise RuntimeError(f"SKA layer {self.layer_number}: decoding at sequence_len_offset="
                                   f"{context.sequence_len_offset} without a prefill at offset 0")
            gamma, outputs = self.gamma(), []
            for t in range(q.shape[1]):
                y_t, state = ska_step(q[:, t], k[:, t], v[:, t], state, eta=self.eta, gamma=gamma)
                outputs.append(y_t)
            y = torch.stack(outputs, dim=1)
        cache[self.layer_number] = state
        return y

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None, tp_group=None
    ) -> ShardedStateDict:
        """TP-independent checkpoint: in_proj split into `.query`/`.key`/`.value` (each TP-sharded on
        axis 0, as Megatron's Mamba mixer and Gated DeltaNet do) and η, ρ axis-mapped over heads."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = tp_group if tp_group is not None else self.tp_group
        own: dict = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, tensor_parallel_layers_axis_map={name: 0 for name in PER_HEAD_PARAMETERS},
            sharded_offsets=sharded_offsets, tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
        for child_name, child in self.named_children():
            sharded.update(sharded_state_dict_default(child, f"{prefix}{child_name}.", sharded_offsets, metadata,
                                                      tp_group=tp_group))
        for tensor_name in ("weight", "bias"):
            key = f"{prefix}in_proj.{tensor_name}"
            if key in sharded:
                sharded[key] = _split_tensor_factory(sharded[key], list(self.in_proj_split_sections),
                                                     list(IN_PROJ_SPLIT_NAMES), 0)
        return sharded


def _check_context_parallel_options(config: SKAConfig) -> None:
    """Options that context-parallel SKA supports: causal norms, the torch and Triton paths."""
    if config.ska_norm not in CP_NORMS:
        raise ValueError(f"context parallelism needs ska_norm in {CP_NORMS}, got {config.ska_norm!r} "
                         "(sequence_max is non-causal)")
    if config.ska_backend not in CP_BACKENDS:
        raise ValueError(f"context parallelism needs ska_backend in {CP_BACKENDS}, got {config.ska_backend!r} "
                         "(the slow reference has no context-parallel form)")


def _packed_cu_seqlens(packed_seq_params: Optional[PackedSeqParams], batch: int) -> Optional[Tensor]:
    """Sequence boundaries [N+1] of a packed THD batch (padded boundaries when given), else None."""
    if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
        return None
    if batch != 1:
        raise ValueError(f"packed THD sequences need batch size 1, got {batch}")
    if packed_seq_params.cu_seqlens_q_padded is not None:
        return packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q
