"""Spectral Koopman MLP (SPEC §7) against a plain-torch complex-number computation with its own weights,
the |λ| ≤ 1 clamp and its live gradient (SPEC §9 trap 7), and TP=2 == TP=1 through distributed checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from echo_megatron.megatron.koopman_mlp import KoopmanMLP, KoopmanMLPSubmodules, koopman_width

from .common import free_port

pytestmark = pytest.mark.usefixtures("model_parallel_tp1")


def make_mlp(hidden_size=40, gate=True, bias=True, dtype=torch.float64, seed=0) -> KoopmanMLP:
    torch.manual_seed(seed)
    config = TransformerConfig(
        num_layers=1, hidden_size=hidden_size, num_attention_heads=1, add_bias_linear=bias,
        use_cpu_initialization=True, params_dtype=dtype,
    )
    submodules = KoopmanMLPSubmodules(
        lift=ColumnParallelLinear, readout=RowParallelLinear,
        gate=ColumnParallelLinear if gate else None,
    )
    mlp = KoopmanMLP(config, submodules)
    with torch.no_grad():  # non-zero biases, and moduli on both sides of 1
        for name, param in mlp.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
        mlp.gamma.uniform_(0.3, 1.6)
        mlp.omega.normal_(0.0, 0.8)
    return mlp


def reference(mlp: KoopmanMLP, x: torch.Tensor) -> torch.Tensor:
    """SPEC §7 with complex numbers: out = W_r (λ̂ ⊙ SiLU(W_l x + b_l)) [⊙ σ(W_g x + b_g)] + b_r, where
    λ̂ = (γ − iω)·s, s = 1/max(1, |γ − iω|) taken as a constant (the module's clamp convention)."""
    lam = torch.complex(mlp.gamma, -mlp.omega)
    lam_hat = lam * (1.0 / lam.abs().clamp_min(1.0)).detach()
    g = F.silu(F.linear(x, mlp.lift.weight, mlp.lift.bias))
    z = torch.view_as_real(lam_hat * torch.view_as_complex(g.unflatten(-1, (-1, 2)))).flatten(-2)
    if mlp.gate is not None:
        z = z * torch.sigmoid(F.linear(x, mlp.gate.weight, mlp.gate.bias))
    out = F.linear(z, mlp.readout.weight)
    return out if mlp.readout.bias is None else out + mlp.readout.bias


@pytest.mark.parametrize("hidden_size,width", [(128, 384), (448, 1216), (768, 2048), (40, 128)])
def test_width_matches_spec(hidden_size, width):
    assert koopman_width(hidden_size) == width


@pytest.mark.parametrize("gate,bias", [(True, True), (False, False)])
def test_forward_and_gradients_match_plain_torch(gate, bias):
    mlp = make_mlp(gate=gate, bias=bias)
    assert mlp.lift.weight.shape == (128, 40) and mlp.gamma.shape == mlp.omega.shape == (64,)
    x = torch.randn(7, 3, 40, dtype=torch.float64, requires_grad=True)
    out, out_bias = mlp(x)
    assert out.shape == (7, 3, 40) and (out_bias is None) == (not bias)
    full = out if out_bias is None else out + out_bias
    expected = reference(mlp, x)
    torch.testing.assert_close(full, expected, rtol=1e-12, atol=1e-12)

    weight = torch.randn_like(full)
    params = [x] + list(mlp.parameters())
    got = torch.autograd.grad((full * weight).sum(), params)
    want = torch.autograd.grad((expected * weight).sum(), params)
    for name, g, w in zip(["x"] + [n for n, _ in mlp.named_parameters()], got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)
        assert g.abs().sum() > 0, f"no gradient reaches {name}"


def test_clamp_bounds_modulus_and_keeps_gamma_gradient():
    mlp = make_mlp(gate=False)
    x = torch.randn(5, 2, 40, dtype=torch.float64)
    with torch.no_grad():
        mlp.omega[:8] = 0.0
        mlp.gamma[:4] = 1.5  # |λ| = 1.5: clamped to λ̂ = 1
        mlp.gamma[4:8] = 1.0  # |λ| = 1: untouched, same forward value as the clamped pairs
    re, im = mlp.eigenvalues()
    assert (torch.hypot(re, im) <= 1 + 1e-12).all()
    assert torch.equal(re[:8], torch.ones(8, dtype=torch.float64)) and (im[:8] == 0).all()

    out, bias = mlp(x)
    (out + bias).pow(2).sum().backward()
    grad = mlp.gamma.grad
    # A fully differentiated γ/|γ| has zero derivative at ω = 0: a dead mode. Here the gradient lives
    # and is the unclamped one scaled by 1/|λ| = 1/1.5.
    assert (grad[:4].abs() > 1e-8).all()
    with torch.no_grad():
        mlp.gamma[:4] = 1.0
    mlp.zero_grad()
    out_unclamped, bias_unclamped = mlp(x)
    torch.testing.assert_close(out_unclamped, out, rtol=0, atol=0)
    (out_unclamped + bias_unclamped).pow(2).sum().backward()
    torch.testing.assert_close(grad[:4], mlp.gamma.grad[:4] / 1.5, rtol=1e-12, atol=0)


@pytest.mark.parametrize("cpu_init", [True, False])
def test_gamma_and_omega_init(cpu_init):
    torch.manual_seed(1)
    config = TransformerConfig(
        num_layers=1, hidden_size=768, num_attention_heads=1, use_cpu_initialization=cpu_init
    )
    mlp = KoopmanMLP(
        config, KoopmanMLPSubmodules(lift=ColumnParallelLinear, readout=RowParallelLinear)
    )
    assert mlp.gate is None and mlp.gamma.shape == (1024,) and mlp.omega.shape == (1024,)
    assert torch.equal(mlp.gamma, torch.ones(1024))
    assert 0.09 < mlp.omega.std().item() < 0.11 and abs(mlp.omega.mean().item()) < 0.01
    assert mlp.gamma.tensor_model_parallel and mlp.omega.partition_dim == 0


def test_gate_with_norm_fused_lift_is_rejected():
    class NormFusedLift(ColumnParallelLinear):
        """Stands for TELayerNormColumnParallelLinear, whose fused norm weight is `layer_norm_weight`."""

        def __init__(self, input_size, *args, **kwargs):
            super().__init__(input_size, *args, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))

    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=1, use_cpu_initialization=True
    )
    submodules = KoopmanMLPSubmodules(
        lift=NormFusedLift, readout=RowParallelLinear, gate=ColumnParallelLinear
    )
    with pytest.raises(ValueError, match="submodules.gate"):
        KoopmanMLP(config, submodules)


@pytest.mark.multiproc
def test_tensor_parallel_two_ranks_equals_one(tmp_path):
    repo = Path(__file__).parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "tests.megatron.koopman_mlp_tp_worker", str(tmp_path),
    ]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / "passed").read_text().split() == ["sp=False", "sp=True"]
