"""Drop-in for stock Megatron-LM: `pretrain_hybrid.py --spec echo_megatron.megatron.specs <stack spec>` builds
a plain `TransformerConfig` (`core_transformer_config_from_args(args)` without `config_class`, then
`hybrid_config_from_args`) and Megatron's `HybridModelBuilder`; the SKA layers must accept it with the
documented defaults. The model must be the very model an `SKAConfig` with default `ska_*` fields gives:
same parameters, same logits, same gradients.

Runs in a fresh interpreter (Megatron's argument parser reads `sys.argv` and sets globals). The CPU uses
the local spec (`echo_hybrid_stack_spec_local`); on GPUs the same command names `echo_hybrid_stack_spec`.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ARGV = [
    "pretrain_hybrid.py", "--spec", "echo_megatron.megatron.specs", "echo_hybrid_stack_spec_local",
    "--num-layers", "4", "--hybrid-layer-pattern", "M*M-", "--hidden-size", "64", "--num-attention-heads", "4",
    "--kv-channels", "12", "--ffn-hidden-size", "128", "--mamba-head-dim", "16", "--mamba-state-dim", "8",
    "--seq-length", "96", "--max-position-embeddings", "96", "--micro-batch-size", "2", "--vocab-size", "64",
    "--tokenizer-type", "NullTokenizer", "--normalization", "RMSNorm", "--disable-bias-linear",
    "--transformer-impl", "local", "--use-cpu-initialization", "--no-gradient-accumulation-fusion",
    "--position-embedding-type", "none", "--lr", "1e-3", "--train-iters", "1", "--no-persist-layer-norm",
    "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--distributed-backend", "gloo",
    "--hidden-dropout", "0", "--attention-dropout", "0",
]

SCRIPT = textwrap.dedent("""
    import sys, typing
    import typing_extensions
    if not hasattr(typing, "override"):  # megatron.training imports typing.override (Python >= 3.12)
        typing.override = typing_extensions.override
    import torch
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.argument_utils import core_transformer_config_from_args, hybrid_config_from_args
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.models.hybrid import HybridModelBuilder
    from echo_megatron.megatron import SKAConfig, SpectralKoopmanAttention, initialize_single_process

    initialize_single_process(seed=0)
    sys.argv = ARGV
    args = parse_args()
    validate_args(args)

    def build(config):
        initialize_single_process(seed=0)
        model = HybridModelBuilder(hybrid_config_from_args(args, config)).build_model(
            ProcessGroupCollection.use_mpu_process_groups())
        tokens = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(96).expand(2, 96)  # 96 > ska_chunk_size 64: chunk 1 reads chunk 0
        for param in model.parameters():  # a non-zero output projection, so the SKA path carries gradient
            if param.ndim == 2 and param.abs().sum() == 0:
                torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(2))
        logits = model(tokens, positions, None, runtime_gather_output=True)
        logits.float().square().mean().backward()
        return model, logits.detach()

    plain = core_transformer_config_from_args(args)  # what pretrain_hybrid.py does: no config_class
    assert type(plain) is TransformerConfig, type(plain)
    model, logits = build(plain)
    ska = [m for m in model.modules() if isinstance(m, SpectralKoopmanAttention)]
    assert len(ska) == 1, model
    c = ska[0].config
    assert (c.ska_num_heads, c.ska_rank, c.ska_value_dim, c.ska_chunk_size, c.ska_power) == (4, 12, 12, 64, 2), c
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()), [n for n, p in model.named_parameters() if p.grad is None]
    assert ska[0].in_proj.weight.grad.abs().sum() > 0

    tuned = core_transformer_config_from_args(args, SKAConfig)  # the SKAConfig route, all ska_* defaults
    reference, reference_logits = build(tuned)
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=0)
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, grads[name], rtol=0, atol=0)
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=0, atol=0)
    print("ok", tuple(logits.shape))
""")


def test_pretrain_hybrid_style_plain_transformer_config(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    code = f"ARGV = {ARGV!r}\n{SCRIPT}"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split()[-4:] == ["ok", "(2,", "96,", "128)"]
