"""Constant-memory generation with Megatron's static inference context (SPEC §4, §6).

Each cached layer keeps its state in `context.key_value_memory_dict[layer_number]`: SKA layers an
`echo_megatron.ops.SKAState` and Mamba-2 layers their (conv, ssm) tensors, both of fixed size;
softmax-attention layers (baselines) a KV cache. A step at sequence offset 0 is a prefill and resets
every state; later steps decode one token each.

Megatron-Core 0.19.2's Mamba mixer decodes only one sequence (batch size 1) under static batching
(`patches/mamba-static-decode-batch.patch` fixes it: `echo-megatron patch-megatron`); with the patch
applied, or without Mamba layers, any batch size decodes.

Megatron's dynamic engine (continuous batching, per-request state slots) is `generation.build_engine`
(`ska_dynamic.py`: SKA states in slots beside Mamba's, no KV cache).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.utils import InferenceMode
from megatron.core.ssm.mamba_mixer import MambaMixer

from echo_megatron.patching import patch_applied

MAMBA_DECODE_PATCH = "mamba-static-decode-batch"


def static_inference_context(batch_size: int, max_sequence_length: int, all_logits: bool = False) -> StaticInferenceContext:
    """A Megatron `StaticInferenceContext`; with `all_logits` a prefill returns logits at every position
    (Megatron's default materialises only the last one)."""
    context = StaticInferenceContext(batch_size, max_sequence_length)
    context.config.materialize_only_last_token_logits = not all_logits
    return context


@torch.no_grad()
def forward_step(model: torch.nn.Module, context: StaticInferenceContext, input_ids: Tensor) -> Tensor:
    """Run `input_ids` [b, s] at the context's offset (0: prefill) and advance it by s.

    Returns full-vocabulary logits [b, s, V], or [b, 1, V] (last position) when the context only
    materialises last-token logits.
    """
    batch, length = input_ids.shape
    if (context.sequence_len_offset > 0 and batch > 1 and any(isinstance(m, MambaMixer) for m in model.modules())
            and not patch_applied(MAMBA_DECODE_PATCH)):
        raise NotImplementedError(
            "Megatron-Core 0.19.2's Mamba mixer decodes only batch size 1 under static batching "
            "(MambaMixer._decode hands [1, b, ·] to _ssm_decode, which reads it as [b, s, ·]): decode one "
            f"sequence at a time, or apply patches/{MAMBA_DECODE_PATCH}.patch with `echo-megatron patch-megatron`"
        )
    if context.sequence_len_offset + length > context.max_sequence_length:
        raise ValueError(f"sequence_len_offset {context.sequence_len_offset} + {length} tokens exceeds "
                         f"max_sequence_length {context.max_sequence_length}")
    start = context.sequence_len_offset
    position_ids = torch.arange(start, start + length, device=input_ids.device).expand(batch, length)
    with InferenceMode.active():
        logits = model(input_ids, position_ids, None, inference_context=context, runtime_gather_output=True)
    context.increment_sequence_len_offset(length)
    return logits


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompt_ids: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding: prompt [b, T0] (T0 >= 1) -> [b, T0 + max_new_tokens], one prefill then one token per step."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must have shape [b, T0] with T0 >= 1, got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    context = static_inference_context(prompt_ids.shape[0], prompt_ids.shape[1] + max_new_tokens)
    tokens = prompt_ids
    step_input = prompt_ids
    for _ in range(max_new_tokens):
        next_token = forward_step(model, context, step_input)[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        step_input = next_token
    return tokens


def cache_nbytes(context: StaticInferenceContext) -> dict[int, int]:
    """Bytes of inference state held per cached layer, by layer number: an SKA layer's `SKAState`, a
    Mamba layer's (conv, ssm) tensors, a softmax layer's KV cache (which, alone, grows with the tokens)."""
    sizes = {}
    for layer, cached in context.key_value_memory_dict.items():
        tensors = cached if isinstance(cached, (tuple, list)) else (cached,)
        sizes[layer] = sum(t.nbytes for t in tensors)
    return sizes
