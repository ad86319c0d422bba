"""Megatron core attention through PyTorch's `scaled_dot_product_attention` (the local softmax baseline).

`SDPAttention` has the constructor and forward contract of Megatron's local `DotProductAttention`
(the `core_attention` of a `SelfAttention`): q [sq, b, np, hn], k/v [sk, b, ng, hn] -> context
[sq, b, np·hn], heads split over tensor-parallel ranks (np = heads / TP, ng = query groups / TP; sequence
parallelism gathers the sequence before core attention, so it never reaches here). Where
`DotProductAttention` materialises the [b·np, sq, sk] score matrix, this calls
`F.scaled_dot_product_attention`, whose dispatcher picks a fused kernel: on CUDA flash, cuDNN or
memory-efficient attention; on the CPU the flash kernel (equal q/k/v head widths, no dropout), else the
math path. `backend` names the kernel the last call ran (`torch.nn.attention.SDPBackend` name, from the
dispatcher's own choice); the first call of each layer, and every change, is logged.

Masks (`attn_mask_type` of the call, else of the module; `attention_mask` in Megatron's convention,
True = masked out):
- `causal` without a mask tensor: causal over sq = sk; sq = 1 is a decode step over cached keys (no mask,
  as `DotProductAttention`); other sq != sk raise (use `causal_bottom_right`).
- `causal_bottom_right`: causal aligned to the last key (any sq <= sk; sq < sk through a boolean mask).
- `no_mask`: full attention.
- `padding` / `arbitrary` / `causal` with a boolean mask tensor broadcastable to [b, np, sq, sk]: that mask
  (as `DotProductAttention`, a given mask replaces the causal one). A row with every key masked out gives
  NaN or 0 here (SDPA) and a uniform average in `DotProductAttention` (its -10000 fill).
- Packed sequences (`packed_seq_params`, THD: q/k/v [t, np, hn]): self-attention over each sequence of
  `cu_seqlens_q` (= `cu_seqlens_kv`), one SDPA call per sequence; with `cu_seqlens_q_padded` the padding
  tokens' outputs are 0. Causal for `causal` / `padding_causal`, full for `no_mask` / `padding`.
- Attention dropout (`attention_dropout` in training) is SDPA's `dropout_p`, drawn inside Megatron's
  model-parallel RNG tracker as `DotProductAttention` does.

Unsupported, with an error naming the option: context parallelism, sliding-window attention,
`softmax_type` other than "vanilla", `attention_bias`. `apply_query_key_layer_scaling` divides and
multiplies the scores by the layer number in `DotProductAttention` (an fp16 range guard of the
materialised scores): the product is the plain scale, which is what is used here.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

logger = logging.getLogger(__name__)

MASKED_TYPES = (AttnMaskType.padding, AttnMaskType.arbitrary, AttnMaskType.causal)
"""Mask types that accept an `attention_mask` tensor."""
PACKED_CAUSAL = {AttnMaskType.causal: True, AttnMaskType.padding_causal: True,
                 AttnMaskType.no_mask: False, AttnMaskType.padding: False}
"""Mask types of packed (THD) sequences -> causal within each sequence."""


class SDPAttention(MegatronModule):
    """Core attention by `F.scaled_dot_product_attention`: a drop-in for `DotProductAttention` (see the module
    docstring). Same arguments as `DotProductAttention.__init__`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(f"SDPAttention: context_parallel_size must be 1, got {config.context_parallel_size} "
                             "(context parallelism needs Transformer Engine's attention)")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention: softmax_type must be 'vanilla', got {config.softmax_type!r}")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError(f"SDPAttention: sliding-window attention (window_size={config.window_size}) is not "
                             "supported; use DotProductAttention or Transformer Engine")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp_size = self.tp_group.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head)
                              if softmax_scale is None else softmax_scale)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.backend: Optional[str] = None
        """`SDPBackend` name of the kernel the last forward ran (None before the first)."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np·hn] (THD: [t, np, hn] -> [t, np·hn])."""
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if packed_seq_params is not None:
            return self._packed(query, key, value, attention_mask, mask_type, packed_seq_params)
        mask, is_causal = self._sdpa_mask(mask_type, attention_mask, query.shape[0], key.shape[0], query.device)
        return self._attend(query, key, value, mask, is_causal)

    def _sdpa_mask(self, mask_type: AttnMaskType, attention_mask: Optional[Tensor], sq: int, sk: int,
                   device: torch.device):
        """(attn_mask for SDPA, is_causal) for Megatron's mask type and mask."""
        if attention_mask is not None:
            if mask_type not in MASKED_TYPES:
                raise ValueError(f"SDPAttention: an attention_mask tensor needs attn_mask_type in "
                                 f"{[t.name for t in MASKED_TYPES]}, got {mask_type.name}")
            if attention_mask.dtype != torch.bool:
                raise ValueError(f"SDPAttention: attention_mask must be boolean (True = masked out), got "
                                 f"{attention_mask.dtype}")
            return ~attention_mask, False
        if mask_type == AttnMaskType.no_mask or (mask_type == AttnMaskType.causal and sq == 1):
            return None, False
        if mask_type in (AttnMaskType.causal, AttnMaskType.causal_bottom_right) and sq == sk:
            return None, True
        if mask_type == AttnMaskType.causal_bottom_right and sq < sk:
            return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq), False
        if mask_type == AttnMaskType.causal:
            raise ValueError(f"SDPAttention: attn_mask_type causal needs equal query and key lengths (or one "
                             f"query), got sq={sq}, sk={sk}; use causal_bottom_right")
        raise ValueError(f"SDPAttention: attn_mask_type {mask_type.name} needs an attention_mask tensor "
                         f"(or packed_seq_params for padding_causal); supported without one: causal, "
                         f"causal_bottom_right, no_mask")

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask, is_causal: bool) -> Tensor:
        """q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np·hn] by one SDPA call."""
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        dropout_p = self.dropout_p if self.training else 0.0
        options = dict(attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale)
        grouped = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        choice = self._choose(q, k, v, grouped, options)
        if grouped and choice == SDPBackend.MATH:  # a fused kernel without grouped heads beats the math path
            repeats = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            k_full, v_full = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
            expanded = self._choose(q, k_full, v_full, False, options)
            if expanded != SDPBackend.MATH:
                k, v, grouped, choice = k_full, v_full, False, expanded
        self._record(choice)
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, enable_gqa=grouped, **options)
        else:
            context = F.scaled_dot_product_attention(q, k, v, enable_gqa=grouped, **options)
        sq, b = query.shape[:2]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)

    @staticmethod
    def _choose(q: Tensor, k: Tensor, v: Tensor, grouped: bool, options: dict) -> SDPBackend:
        """The kernel `F.scaled_dot_product_attention` dispatches to for these inputs (its own chooser)."""
        return SDPBackend(torch._fused_sdp_choice(q, k, v, options["attn_mask"], options["dropout_p"],
                                                  options["is_causal"], scale=options["scale"], enable_gqa=grouped))

    def _record(self, choice: SDPBackend) -> None:
        if choice.name != self.backend:
            logger.info("SDPAttention layer %d: %s", self.layer_number, choice.name)
            self.backend = choice.name

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                mask_type: AttnMaskType, params: PackedSeqParams) -> Tensor:
        """THD: q [t, np, hn], k/v [t, ng, hn] -> [t, np·hn], attention within each packed sequence."""
        cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
        if params.qkv_format != "thd" or attention_mask is not None or mask_type not in PACKED_CAUSAL:
            raise ValueError(f"SDPAttention: packed sequences need qkv_format 'thd' (got {params.qkv_format!r}), "
                             f"no attention_mask, attn_mask_type in {[t.name for t in PACKED_CAUSAL]} "
                             f"(got {mask_type.name})")
        if cu_kv is not None and not torch.equal(cu_q, cu_kv):
            raise ValueError("SDPAttention: packed sequences must be self-attention (cu_seqlens_q == cu_seqlens_kv)")
        lengths = cu_q.diff().tolist()
        starts = (cu_q if params.cu_seqlens_q_padded is None else params.cu_seqlens_q_padded).tolist()
        pieces, end = [], 0
        for start, length in zip(starts[:-1], lengths):
            if start > end:  # padding of the previous sequence
                pieces.append(query.new_zeros(start - end, self.hidden_size_per_partition))
            piece = slice(start, start + length)
            if length:
                out = self._attend(query[piece, None], key[piece, None], value[piece, None], None,
                                   PACKED_CAUSAL[mask_type])
                pieces.append(out[:, 0])
            end = start + length
        if query.shape[0] > end:
            pieces.append(query.new_zeros(query.shape[0] - end, self.hidden_size_per_partition))
        return torch.cat(pieces)
