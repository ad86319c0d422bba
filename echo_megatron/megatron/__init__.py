"""Megatron-Core integration of Spectral Koopman Attention: config, layer, specs, presets, inference.

Start a process with `initialize_single_process(seed=0)` (process group, model-parallel state, RNG
seed; on machines without CUDA it enables `echo_megatron.megatron.cpu.enable_cpu_mode()`, which is
never imported by this package's import itself).
"""

from .config import SKAConfig
from .koopman_mlp import KoopmanMLP, KoopmanMLPSubmodules
from .norm import TorchNorm
from .parallel import initialize_single_process
from .presets import PRESETS, HybridPreset, get_preset
from .ska_layer import SKASubmodules, SpectralKoopmanAttention, effective_gamma
from .specs import (
    echo_hybrid_stack_spec,
    echo_hybrid_stack_spec_local,
    echo_koopman_stack_spec,
    echo_koopman_stack_spec_local,
    softmax_hybrid_stack_spec,
    softmax_hybrid_stack_spec_local,
    softmax_koopman_stack_spec,
    softmax_koopman_stack_spec_local,
    build_hybrid_model,
    stack_spec,
)

__all__ = [
    "SKAConfig", "SpectralKoopmanAttention", "SKASubmodules", "effective_gamma", "KoopmanMLP",
    "KoopmanMLPSubmodules", "TorchNorm", "initialize_single_process", "build_hybrid_model", "stack_spec", "PRESETS", "HybridPreset",
    "get_preset", "echo_hybrid_stack_spec", "echo_hybrid_stack_spec_local", "echo_koopman_stack_spec",
    "echo_koopman_stack_spec_local", "softmax_hybrid_stack_spec", "softmax_hybrid_stack_spec_local",
    "softmax_koopman_stack_spec", "softmax_koopman_stack_spec_local",
]
