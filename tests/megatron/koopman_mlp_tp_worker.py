"""torchrun --nproc-per-node 2 -m tests.megatron.koopman_mlp_tp_worker <dir>: KoopmanMLP at TP=2 == TP=1.

For sequence parallel off and on: build at TP=1, save a distributed checkpoint, load it at TP=2 into a
differently initialised module and compare output, input gradient and parameter gradients; then save
at TP=2, load back at TP=1 and compare again. Writes "sp=<flag>" lines to <out_dir>/passed.
"""

import sys
from pathlib import Path

import torch

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from echo_megatron.megatron.cpu import enable_cpu_mode
from echo_megatron.megatron.koopman_mlp import KoopmanMLP, KoopmanMLPSubmodules

from .common import initialize_model_parallel

HIDDEN, SEQ, BATCH = 40, 6, 3
SUBMODULES = KoopmanMLPSubmodules(
    lift=ColumnParallelLinear, gate=ColumnParallelLinear, readout=RowParallelLinear
)


def build(tp: int, sequence_parallel: bool, seed: int) -> KoopmanMLP:
    """A fresh module at the given TP size (model-parallel state re-initialised)."""
    initialize_model_parallel(tp, seed)
    torch.manual_seed(seed)
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, add_bias_linear=True,
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel and tp > 1,
        use_cpu_initialization=True, params_dtype=torch.float64,
    )
    mlp = KoopmanMLP(config, SUBMODULES)
    with torch.no_grad():  # moduli on both sides of 1, non-zero biases
        mlp.gamma.uniform_(0.3, 1.6)
        mlp.omega.normal_(0.0, 0.8)
        for name, param in mlp.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return mlp


def run(mlp: KoopmanMLP, x: torch.Tensor) -> dict:
    """Output, input gradient and gathered parameter gradients of sum(out · w) for full [s, b, h] x."""
    x = x.clone().requires_grad_(True)
    local_x = scatter_to_sequence_parallel_region(x) if mlp.config.sequence_parallel else x
    out, bias = mlp(local_x)
    out = out + bias
    if mlp.config.sequence_parallel:
        out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    result = {"out": out.detach(), "dx": x.grad}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for name, param in mlp.named_parameters():
        grad = param.grad
        if getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(grad) for _ in range(tp_group.size())]
            torch.distributed.all_gather(parts, grad.contiguous(), group=tp_group)
            grad = torch.cat(parts, dim=param.partition_dim)
        elif mlp.config.sequence_parallel:  # row-parallel bias: partial sums over sequence shards
            torch.distributed.all_reduce(grad, group=tp_group)
        result[name] = grad
    return result


def save(mlp: KoopmanMLP, path: Path) -> None:
    if torch.distributed.get_rank() == 0:
        path.mkdir()
    torch.distributed.barrier()
    dist_checkpointing.save(mlp.sharded_state_dict(), str(path))


def load(mlp: KoopmanMLP, path: Path) -> None:
    mlp.load_state_dict(dist_checkpointing.load(mlp.sharded_state_dict(), str(path)))


def assert_same(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys(), (label, got.keys(), want.keys())
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12, msg=f"{label}: {key}")


def main(out_dir: Path) -> None:
    enable_cpu_mode()
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(123)
    x = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)
    passed = []
    for sp in (False, True):
        tp1 = build(1, sp, seed=1)
        want = run(tp1, x)
        save(tp1, out_dir / f"tp1_sp{sp}")

        tp2 = build(2, sp, seed=2)
        load(tp2, out_dir / f"tp1_sp{sp}")
        assert tp2.gamma.shape == (tp1.gamma.shape[0] // 2,)
        assert_same(run(tp2, x), want, f"TP=1 -> TP=2, sp={sp}")
        save(tp2, out_dir / f"tp2_sp{sp}")

        back = build(1, sp, seed=3)
        load(back, out_dir / f"tp2_sp{sp}")
        assert_same(run(back, x), want, f"TP=2 -> TP=1, sp={sp}")
        passed.append(f"sp={sp}")
    parallel_state.destroy_model_parallel()
    if torch.distributed.get_rank() == 0:
        (out_dir / "passed").write_text("\n".join(passed))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
