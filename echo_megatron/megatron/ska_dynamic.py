"""SKA in Megatron-Core's dynamic inference engine: a constant-size recurrent state per request.

Megatron-Core 0.19.2's `DynamicInferenceContext` gives every `'*'` layer a paged KV cache and only `'M'`
layers per-request state slots (`MambaInferenceStateConfig`, `mamba_metadata.request_to_mamba_state_idx`).
`SKADynamicInferenceContext` is that context, subclassed through its allocation hooks (no change to
Megatron's files):

- `_allocate_memory_buffer`: the KV buffer holds no layer (an SKA model's `'*'` layers are all SKA; the
  block tables stay, as bookkeeping of tokens in flight, but no KV tensor has a byte).
- `_allocate_mamba_states`: next to Mamba's (conv, ssm) slots, one `SKASlots` per SKA layer with the same
  number of slots. A request's SKA state lives in the slot of its Mamba state, so it is allocated, reused
  and freed exactly when Megatron allocates, reuses and frees the request's Mamba slot.
- `_execute_pending_mamba_ops`: slots Megatron zeroes for new requests are zeroed for SKA too.

In a step the tokens are packed `[decode tokens (one per decode request) | prefill tokens of each prefill
request]` (`mamba_metadata.batch_indices_decode`, `batch_indices_prefill`, `cu_seqlens_list`). All decode
requests take one `ska_step_slots` on their slots, each at its own chunk position (the slots count tokens on
the device): no tensor value is read on the host, and on CUDA that is a step kernel plus a readout recompute
for only the requests that complete a chunk. Each prefill request uses Megatron's host-side bookkeeping for
its slot (`mamba_metadata.request_to_mamba_state_idx`) and the tokens it has already seen
(`request_kv_length_offsets`): a first piece runs `ska_prefill` (the chunked forward), a later piece of a
chunked prefill continues token by token. The outputs therefore equal the static path and the training
forward (SPEC §4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core.inference.config import InferenceConfig
from megatron.core.inference.contexts import DynamicInferenceContext
from megatron.core.transformer.transformer_config import TransformerConfig

from echo_megatron.ops import SKAState, StateSlots, ska_prefill, ska_step, ska_step_slots
from echo_megatron.ops.chunked import Statistics, work_dtype


class SKASlots(StateSlots):
    """Decode states of one SKA layer for `slots` requests (`ops.StateSlots`), plus the copy of a prefill's
    `SKAState` in and out of one slot (`gather`, `scatter`, at a slot index held on the host)."""

    def gather(self, slot: int, position: int) -> SKAState:
        """The `SKAState` of the request in `slot` (views into the slots)."""
        return SKAState(**self.options, completed=Statistics(*(x[slot : slot + 1] for x in self.completed)),
                        partial=Statistics(*(x[slot : slot + 1] for x in self.partial)),
                        last_key=self.last_key[slot : slot + 1], readout=self.readout[slot : slot + 1],
                        position=position)

    def scatter(self, slot: int, state: SKAState, tokens: int) -> None:
        """Store the one-request `state` in `slot`, which has now seen `tokens` tokens."""
        stored = [*self.completed, *self.partial, self.last_key, self.readout]
        for x, new in zip(stored, [*state.completed, *state.partial, state.last_key, state.readout]):
            x[slot].copy_(new[0])
        self.tokens[slot].fill_(tokens)


class SKADynamicInferenceContext(DynamicInferenceContext):
    """`DynamicInferenceContext` for hybrid models whose `'*'` layers are SKA: SKA state slots, no KV cache.

    Args:
        model_config: the model's `TransformerConfig` (an `SKAConfig`).
        inference_config: Megatron's `InferenceConfig`; needs `mamba_inference_state_config` (the model has
            Mamba layers: their slots carry the SKA slots), no prefix caching, no speculative tokens.
        ska_layers: the model's SKA mixers (`SpectralKoopmanAttention`), in layer order.
    """

    def __init__(self, model_config: TransformerConfig, inference_config: InferenceConfig, ska_layers: list):
        if inference_config.mamba_inference_state_config is None:
            raise ValueError("SKADynamicInferenceContext needs a hybrid model with Mamba layers "
                             "(inference_config.mamba_inference_state_config is None)")
        if inference_config.enable_prefix_caching:
            raise ValueError("SKADynamicInferenceContext does not support enable_prefix_caching=True "
                             "(SKA states are not cached per block)")
        if inference_config.num_speculative_tokens:
            raise ValueError("SKADynamicInferenceContext does not support speculative decoding "
                             f"(num_speculative_tokens={inference_config.num_speculative_tokens})")
        if inference_config.num_cuda_graphs:
            raise ValueError("SKADynamicInferenceContext does not support CUDA graphs (num_cuda_graphs="
                             f"{inference_config.num_cuda_graphs}): prefill requests are stepped one by one from the host")
        layer_types = inference_config.mamba_inference_state_config.layer_type_list
        if sum(symbol == "*" for symbol in layer_types) != len(ska_layers):
            raise ValueError(f"every '*' layer must be SKA: pattern has {layer_types.count('*')} '*' layers, "
                             f"the model {len(ska_layers)} SKA mixers")
        self.ska_layers = ska_layers
        super().__init__(model_config, inference_config)

    def _allocate_memory_buffer(self) -> None:
        """No KV cache: the `'*'` layers are SKA (Megatron's buffer, with zero attention layers)."""
        self.memory_buffer = torch.empty((2, 0, self.kv_block_allocator.total_count, self.block_size_tokens,
                                          self.num_attention_heads_per_partition,
                                          self.hidden_size_per_attention_head),
                                         dtype=self.params_dtype, device=torch.cuda.current_device())

    def _allocate_mamba_states(self) -> None:
        super()._allocate_mamba_states()
        device = self.mamba_conv_states.device
        self.ska_slots = [
            SKASlots(self.max_requests, layer.num_heads_local, layer.rank, layer.value_dim, layer.operator_options(),
                     work_dtype(layer.config.params_dtype), device)
            for layer in self.ska_layers
        ]

    def _execute_pending_mamba_ops(self) -> None:
        if self._pending_mamba_zeros:
            slots = torch.tensor(self._pending_mamba_zeros, dtype=torch.long, device=self.mamba_conv_states.device)
            for ska_slots in self.ska_slots:
                ska_slots.zero(slots)
        super()._execute_pending_mamba_ops()

    def ska_state_bytes_per_request(self) -> int:
        """Bytes of SKA state one request holds, all SKA layers together (independent of its length)."""
        return sum(slots.nbytes_per_request for slots in self.ska_slots)

    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache allocated (0: SKA layers have none)."""
        return self.memory_buffer.nbytes


def ska_dynamic_forward(layer, q: Tensor, k: Tensor, v: Tensor, context: SKADynamicInferenceContext) -> Tensor:
    """One dynamic-batching step of an SKA layer: q, k [1, N, H, r], v [1, N, H, P] (N packed tokens) ->
    y [1, N, H, P]; reads and updates the requests' slots."""
    if not isinstance(context, SKADynamicInferenceContext):
        raise TypeError("SKA layers under dynamic batching need an SKADynamicInferenceContext (no KV cache, "
                        f"SKA state slots): got {type(context).__name__}; build it with "
                        "echo_megatron.megatron.generation.build_engine")
    slots = context.ska_slots[context.layer_map[layer.layer_number - 1]]
    metadata = context.mamba_metadata
    dims = context.batch_dimensions
    eta, gamma = layer.eta, layer.gamma()
    decode_count, prefill_count = dims.decode_req_count, dims.prefill_req_count
    y = torch.zeros_like(v)
    if decode_count:  # one batched step, each request at its own position: no host read, no data-dependent shape
        rows = metadata.batch_indices_decode[:decode_count]
        y[0, :decode_count] = ska_step_slots(q[0, :decode_count], k[0, :decode_count], v[0, :decode_count], slots,
                                             rows, eta=eta, gamma=gamma)
    # prefill: Megatron's host-side bookkeeping gives each request's slot and the tokens it has already seen
    first = context.paused_request_count + decode_count
    bounds = metadata.cu_seqlens_list if prefill_count else []
    for request in range(prefill_count):
        slot = int(metadata.request_to_mamba_state_idx[first + request])
        seen = int(context.request_kv_length_offsets[first + request])
        start, end = decode_count + bounds[request], decode_count + bounds[request + 1]
        if seen == 0:
            y[:, start:end], state = ska_prefill(q[:, start:end], k[:, start:end], v[:, start:end], eta=eta,
                                                 gamma=gamma, **slots.options)
        else:  # a later piece of a chunked prefill
            state = slots.gather(slot, seen % slots.options["chunk_size"])
            for t in range(start, end):
                y[:, t], state = ska_step(q[:, t], k[:, t], v[:, t], state, eta=eta, gamma=gamma)
        slots.scatter(slot, state, seen + end - start)
    return y
