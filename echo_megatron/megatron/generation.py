"""Generation with Megatron-Core's dynamic inference engine (continuous batching) and per-request memory.

    engine = build_engine(model, tokenizer, max_requests=4, max_sequence_length=4096)
    records = engine.generate(["1 2 3"], SamplingParams(num_tokens_to_generate=16, top_k=1))  # greedy

`build_engine` wraps the model as Megatron does (`GPTInferenceWrapper`, `TextGenerationController`,
`DynamicInferenceEngine`), with Megatron's process-wide `InferenceMode` on only while the engine runs the
model (training in the same process stays possible); hybrid models whose `'*'` layers are SKA get an
`SKADynamicInferenceContext` (SKA state slots, no KV cache), others Megatron's own `DynamicInferenceContext`.
Without CUDA the engine runs in CPU mode (`cpu_inference.py`). `memory_per_request` says what one request holds, by layer kind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass

import torch

from megatron.core.inference.config import InferenceConfig, MambaInferenceStateConfig
from megatron.core.inference.contexts import DynamicInferenceContext
from megatron.core.inference.engines import DynamicInferenceEngine
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController
from megatron.core.inference.utils import InferenceMode

from echo_megatron.ops.chunked import work_dtype

from .cpu_inference import enable_cpu_dynamic_inference
from .ska_dynamic import SKADynamicInferenceContext
from .ska_layer import SpectralKoopmanAttention

BLOCK_SIZE_TOKENS = 64


def ska_layers(model: torch.nn.Module) -> list[SpectralKoopmanAttention]:
    """The model's SKA mixers, in layer order."""
    return [module for module in model.modules() if isinstance(module, SpectralKoopmanAttention)]


def ska_state_floats(rank: int, value_dim: int) -> int:
    """Floats of one head's decode state (SPEC §4): G, M, C and m over completed chunks and over the current
    chunk (2·(2r² + Pr + 1)), the last key (r) and the readout R (Pr): 4r² + 3Pr + r + 2."""
    return 4 * rank * rank + 3 * value_dim * rank + rank + 2


@dataclass(frozen=True)
class RequestMemory:
    """Inference state of one request at `tokens` tokens, in bytes (this rank's share of the heads)."""

    tokens: int
    ska: int  # SKA states (constant in tokens)
    mamba: int  # Mamba (conv, ssm) states (constant in tokens)
    kv: int  # KV cache of the model's softmax-attention layers (grows with tokens; 0 for SKA models)
    softmax_kv: int  # KV cache the '*' layers would need as softmax attention (same heads, kv_channels)

    @property
    def total(self) -> int:
        return self.ska + self.mamba + self.kv


def memory_per_request(model: torch.nn.Module, tokens: int) -> RequestMemory:
    """Per-request inference memory of `model` (a `HybridModel`) at `tokens` tokens of context, computed
    from its configuration; `softmax_kv` is the baseline: the same `'*'` layers as softmax attention with
    `num_query_groups` (or `num_attention_heads`) KV heads of width `kv_channels`, in the model's dtype."""
    config = model.config
    layer_types = list(model.decoder.layer_type_list)
    tp = config.tensor_model_parallel_size
    element = config.params_dtype.itemsize
    ska = sum(layer.num_heads_local * ska_state_floats(layer.rank, layer.value_dim)
              * work_dtype(layer.config.params_dtype).itemsize for layer in ska_layers(model))
    mamba_config = MambaInferenceStateConfig.from_model(model)
    mamba = 0
    if mamba_config is not None:
        mamba = layer_types.count("M") * (
            math.prod(mamba_config.conv_states_shape) * mamba_config.conv_states_dtype.itemsize
            + math.prod(mamba_config.ssm_states_shape) * mamba_config.ssm_states_dtype.itemsize)
    kv_heads = (config.num_query_groups or config.num_attention_heads) // tp
    kv_per_layer = 2 * tokens * kv_heads * config.kv_channels * element
    softmax_layers = layer_types.count("*") - len(ska_layers(model))
    return RequestMemory(tokens=tokens, ska=ska, mamba=mamba, kv=softmax_layers * kv_per_layer,
                         softmax_kv=layer_types.count("*") * kv_per_layer)


def inference_context(model: torch.nn.Module, *, max_requests: int, max_sequence_length: int,
                      max_tokens: int | None = None, enable_chunked_prefill: bool = False,
                      block_size_tokens: int = BLOCK_SIZE_TOKENS, all_logits: bool = False) -> DynamicInferenceContext:
    """Megatron's dynamic inference context for `model` serving up to `max_requests` requests of up to
    `max_sequence_length` tokens each (prompt + generated), at most `max_tokens` tokens per forward (default:
    all of them; with `enable_chunked_prefill` longer prompts are prefilled in pieces). With `all_logits` a
    prefill materialises logits at every prompt position (needed for prompt log-probs; Megatron's default
    keeps only the last). SKA models get an `SKADynamicInferenceContext`.

    The block budget (`buffer_size_gb`) is sized for exactly that: with SKA it is bookkeeping only (no KV
    tensor is allocated); for softmax layers it is their KV cache.
    """
    if max_requests < 1 or max_sequence_length < 1:
        raise ValueError(f"max_requests and max_sequence_length must be >= 1, got {max_requests}, "
                         f"{max_sequence_length}")
    enable_cpu_dynamic_inference()
    blocks = max_requests * math.ceil(max_sequence_length / block_size_tokens) + 2
    memory = memory_per_request(model, block_size_tokens)  # softmax_kv: the bytes Megatron books per block
    buffer_bytes = blocks * memory.softmax_kv + max_requests * memory.mamba
    inference_config = InferenceConfig(
        block_size_tokens=block_size_tokens, buffer_size_gb=1.01 * buffer_bytes / 1024**3, max_requests=max_requests,
        max_tokens=max_tokens or max_requests * max_sequence_length, max_sequence_length=max_sequence_length,
        mamba_inference_state_config=MambaInferenceStateConfig.from_model(model),
        enable_chunked_prefill=enable_chunked_prefill, materialize_only_last_token_logits=not all_logits, unified_memory_level=0,
    )
    layers = ska_layers(model)
    if layers:
        return SKADynamicInferenceContext(model.config, inference_config, layers)
    return DynamicInferenceContext(model.config, inference_config)


@contextlib.contextmanager
def _inference_mode_within():
    """Megatron's process-wide `InferenceMode` on inside the block, then as it was before."""
    was_active = InferenceMode.is_active()
    InferenceMode.set_active()
    try:
        yield
    finally:
        if not was_active:
            InferenceMode.unset_active()


class ScopedInferenceModeWrapper(GPTInferenceWrapper):
    """Megatron's `GPTInferenceWrapper` whose forwards (every model run of the engine: steps, warm-ups, dummy
    steps) have Megatron's process-wide `InferenceMode` on."""

    def run_one_forward_step(self, *args, **kwargs):
        with _inference_mode_within():
            return super().run_one_forward_step(*args, **kwargs)


class ScopedInferenceModeEngine(DynamicInferenceEngine):
    """Megatron's `DynamicInferenceEngine` that leaves `InferenceMode` as it found it when built or resumed.

    Megatron's sets the process-wide `InferenceMode` in `__init__` and `resume()` and clears it only in
    `suspend()`: a training forward of the same process after `build_engine` took the inference path and
    failed ("Inference must always gather TP logits"). With a `ScopedInferenceModeWrapper` the flag is on
    exactly while the engine runs the model."""

    def __init__(self, controller: TextGenerationController, context: DynamicInferenceContext):
        with _inference_mode_within():
            super().__init__(controller, context)

    def resume(self) -> None:
        with _inference_mode_within():
            super().resume()


def build_engine(model: torch.nn.Module, tokenizer, **context_options) -> DynamicInferenceEngine:
    """Megatron's `DynamicInferenceEngine` (a `ScopedInferenceModeEngine`) for `model` (set to eval mode) on an
    `inference_context(model, **context_options)`."""
    if (list(model.decoder.layer_type_list).count("*") > len(ska_layers(model))
            and importlib.util.find_spec("flash_attn") is None):
        raise RuntimeError("Megatron-Core 0.19.2's dynamic engine runs softmax attention layers with flash-attn only "
                           "(not installed here); decode such models with echo_megatron.megatron.inference."
                           "greedy_generate (static context)")
    model.eval()
    context = inference_context(model, **context_options)
    controller = TextGenerationController(ScopedInferenceModeWrapper(model, context), tokenizer)
    return ScopedInferenceModeEngine(controller, context)
