"""torch.nn LayerNorm / RMSNorm built like Megatron's `TENorm`, for specs without Transformer Engine."""

from __future__ import annotations

import torch

from megatron.core.transformer.transformer_config import TransformerConfig

NORMALIZATIONS = ("LayerNorm", "RMSNorm")


class TorchNorm:
    """`TorchNorm(config, hidden_size, eps)` -> `torch.nn.LayerNorm` or `torch.nn.RMSNorm` over [..., hidden_size].

    Same call signature as `TENorm`, so it fills any `LayerNormBuilder` slot of a spec. Unlike
    Megatron's `WrappedTorchNorm` it supports sequence parallelism: the weights are tagged
    `sequence_parallel`, which is how Megatron's `finalize_model_grads` (and any trainer) knows to
    all-reduce their gradients over the tensor-parallel group. Parameters are created on the CPU with
    `use_cpu_initialization`, else on `torch.cuda.current_device()`, in `config.params_dtype`.
    """

    def __new__(
        cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, has_residual: bool = False
    ) -> torch.nn.Module:
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(f"TorchNorm: config.normalization must be one of {NORMALIZATIONS}, got {config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("TorchNorm: config.layernorm_zero_centered_gamma=True needs Transformer Engine")
        if has_residual and config.fused_residual_rmsnorm:
            raise ValueError("TorchNorm: config.fused_residual_rmsnorm=True needs Transformer Engine")
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        norm_class = torch.nn.LayerNorm if config.normalization == "LayerNorm" else torch.nn.RMSNorm
        norm = norm_class(hidden_size, eps=eps, device=device, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def use_torch_final_norm(only_without_te: bool = True) -> bool:
    """Megatron's `HybridStack` builds its final norm with `TENorm` whatever the layer spec, and `TENorm`
    raises ImportError without Transformer Engine: make it `TorchNorm` (same math, same parameter name).

    With `only_without_te` (GPUs) only when Transformer Engine is not installed; CPU mode swaps it always.
    Returns whether the final norm is `TorchNorm` now.
    """
    from megatron.core.extensions.transformer_engine import HAVE_TE
    from megatron.core.models.hybrid import hybrid_block

    if only_without_te and HAVE_TE:
        return hybrid_block.TENorm is TorchNorm
    hybrid_block.TENorm = TorchNorm
    return True
