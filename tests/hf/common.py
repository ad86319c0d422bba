"""Shared helpers for the Hugging Face tests: tiny Megatron models with perturbed weights, checkpoints, logits."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import torch

import echo_megatron.hf  # noqa: F401  (before CPU mode: transformers' NemotronH must pick its PyTorch path)
from tests.megatron.common import VOCAB, full_logits, tiny_model

SEQ = 40  # five SKA chunks of S = 8; crosses the CPU Mamba scan chunk (32) as well

ARCHITECTURES = {
    # name: (pattern, tiny_model kwargs)
    "ska": ("M*M-", dict()),
    "koopman": ("M*M-", dict(ffn="koopman")),
    "softmax_gqa": ("M*M-", dict(attention="softmax", num_query_groups=2)),
    "swiglu_ska": ("M*-*", dict(gated_linear_unit=True, activation_func=torch.nn.functional.silu)),
}


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every weight away from its initial value; Mamba's dt_bias far negative on half the heads (softplus
    below transformers' 0.001 clamp), η and ρ per head, SKA's zero-initialised output projection."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith("dt_bias"):
            param.copy_(torch.where(torch.arange(param.numel()) % 2 == 0, -12.0 + noise, param + noise))
        elif name.endswith(("eta", "rho", "gamma", "omega", "A_log", "D")) or "norm" in name:
            param.add_(0.1 * noise)
        else:
            param.add_(noise * (0.5 * param.std() + 0.02) if param.numel() > 1 else 0.1 * noise)


def perturbed_model(architecture: str, seed: int = 0):
    pattern, kwargs = ARCHITECTURES[architecture]
    model = tiny_model(pattern, seed=seed, **kwargs).eval()
    perturb(model, seed + 1)
    return model


def launcher_args(model, **overrides) -> Namespace:
    """A stored-args Namespace shaped like the launcher's (Megatron-LM names) for a `tiny_model`."""
    config = model.config
    fields = dict(
        hybrid_layer_pattern=model.hybrid_layer_pattern, num_layers=config.num_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, group_query_attention=config.num_query_groups is not None
        and config.num_query_groups != config.num_attention_heads, num_query_groups=config.num_query_groups,
        kv_channels=config.kv_channels, ffn_hidden_size=config.ffn_hidden_size,
        swiglu=config.gated_linear_unit, squared_relu=False, norm_epsilon=config.layernorm_epsilon,
        normalization=config.normalization, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        position_embedding_type="none", padded_vocab_size=model.vocab_size, vocab_size=VOCAB,
        seq_length=model.max_sequence_length, untie_embeddings_and_output_weights=True,
        mamba_state_dim=config.mamba_state_dim, mamba_head_dim=config.mamba_head_dim,
        mamba_num_groups=config.mamba_num_groups, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        spec=["echo_megatron.megatron.specs", "echo_hybrid_stack_spec_local"],
        **{name: getattr(config, name) for name in vars(config) if name.startswith("ska_")},
    )
    fields.update(overrides)
    return Namespace(**fields)


def save_launcher_checkpoint(model, directory: Path, iteration: int = 8, **args_overrides) -> Path:
    """Write `model` as megatron.training's save_checkpoint does (torch_dist, iter_NNNNNNN, tracker file);
    `args_overrides` change the stored args."""
    from megatron.core import dist_checkpointing

    path = directory / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": launcher_args(model, **args_overrides),
                             "iteration": iteration,
                             "checkpoint_version": 3.0}, str(path))
    (directory / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return directory


def write_tokenizer(directory: Path) -> Path:
    """A WordLevel tokenizer over VOCAB ids ("w0" …, then <unk>, <s>, </s>) saved for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 3)} | {"<unk>": VOCAB - 3, "<s>": VOCAB - 2, "</s>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(directory)
    return directory


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |Δ| / max |reference|."""
    return ((other.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


__all__ = ["ARCHITECTURES", "SEQ", "VOCAB", "full_logits", "perturb", "perturbed_model", "launcher_args",
           "save_launcher_checkpoint", "write_tokenizer", "relative_error"]
