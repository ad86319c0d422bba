"""Shared helpers for the Megatron integration tests (tiny models on CPU, gloo process groups)."""

from __future__ import annotations

import contextlib
import socket

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.hybrid.hybrid_model import HybridModel

from echo_megatron.megatron import SKAConfig, SpectralKoopmanAttention, build_hybrid_model
from echo_megatron.megatron.cpu import enable_cpu_mode, install_cpu_rng_tracker

VOCAB = 48
PATTERN = "M*M-"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_model_parallel(tp: int = 1, seed: int = 0) -> None:
    """(Re)initialise Megatron's model-parallel state at TP size `tp` and seed its CPU RNG tracker."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    install_cpu_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def single_process_model_parallel(seed: int = 0):
    """CPU mode, a one-rank gloo group (unless one exists) and TP=1 model-parallel state."""
    enable_cpu_mode()
    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    initialize_model_parallel(1, seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if owns_group:
            torch.distributed.destroy_process_group()


def tiny_config(pattern: str = PATTERN, **overrides) -> SKAConfig:
    """A small SKAConfig for `pattern`: d=64, 4 SKA heads with r=12 (not a power of two), P=16, S=8."""
    fields = dict(
        num_layers=len(pattern), hidden_size=64, num_attention_heads=4, ska_num_heads=4, ska_rank=12,
        ska_value_dim=16, ska_chunk_size=8, mamba_state_dim=8, mamba_head_dim=16, mamba_num_groups=2,
        ffn_hidden_size=128, normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True,
    )
    fields.update(overrides)
    return SKAConfig(**fields)


def tiny_model(pattern: str = PATTERN, ffn: str = "mlp", attention: str = "ska", seed: int = 0,
               seq_length: int = 256, **config_overrides) -> HybridModel:
    """`build_hybrid_model` on `tiny_config`, seeded."""
    torch.manual_seed(seed)
    return build_hybrid_model(tiny_config(pattern, **config_overrides), pattern, VOCAB, seq_length, ffn=ffn,
                              attention=attention)


def full_logits(model: HybridModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] of a training-mode forward."""
    batch, length = input_ids.shape
    position_ids = torch.arange(length).expand(batch, length)
    return model(input_ids, position_ids, None, runtime_gather_output=True)


def ska_modules(model: torch.nn.Module) -> list[SpectralKoopmanAttention]:
    """The SKA mixers of a model, in layer order."""
    return [module for module in model.modules() if isinstance(module, SpectralKoopmanAttention)]
