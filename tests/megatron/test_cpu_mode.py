"""CPU mode: the PyTorch Mamba-2 kernels against the sequential SSM recurrence, the patches it
installs, its RNG tracker, and that it is a no-op with CUDA and never imported implicitly."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from echo_megatron.megatron import TorchNorm
from echo_megatron.megatron.cpu import (
    CPURNGStatesTracker,
    causal_conv1d_torch,
    enable_cpu_mode,
    mamba_chunk_scan_torch,
    mamba_split_conv1d_scan_torch,
)

F64 = torch.float64


def sequential_ssm(x, dt, A, B, C, D, z, dt_bias, seq_idx=None, initial_state=None):
    """h_t = exp(dt_t·A) h_{t-1} + dt_t x_t B_tᵀ (reset at sequence starts), y_t = (h_t C_t + D x_t)·silu(z_t)."""
    batch, length, heads, _ = x.shape
    repeat = heads // B.shape[2]
    dt = F.softplus(dt + dt_bias)
    B, C = B.repeat_interleave(repeat, 2), C.repeat_interleave(repeat, 2)
    state = x.new_zeros(batch, heads, x.shape[-1], B.shape[-1]) if initial_state is None else initial_state
    outputs = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)[:, None, None, None]
        state = torch.exp(dt[:, t] * A)[..., None, None] * state + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]
        skip = D[:, None] if D.dim() == 1 else D
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + skip * x[:, t])
    return torch.stack(outputs, 1) * F.silu(z), state


def ssm_inputs(batch=2, length=37, heads=4, head_dim=3, groups=2, state=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=randn(batch, length, heads, head_dim), dt=randn(batch, length, heads),
                A=-3 * torch.rand(heads, generator=g, dtype=dtype), B=randn(batch, length, groups, state),
                C=randn(batch, length, groups, state), D=randn(heads), z=randn(batch, length, heads, head_dim),
                dt_bias=randn(heads))


PACKED = torch.tensor([[0] * 5 + [1] * 20 + [2] * 12, [0] * 37])


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunk_scan_matches_the_sequential_recurrence(chunk_size, packed, with_initial_state):
    inputs = ssm_inputs()
    seq_idx = PACKED if packed else None
    initial = torch.randn(2, 4, 3, 5, dtype=F64) if with_initial_state else None
    y, final = mamba_chunk_scan_torch(**inputs, chunk_size=chunk_size, dt_softplus=True, seq_idx=seq_idx,
                                      initial_states=initial, return_final_states=True)
    y_ref, final_ref = sequential_ssm(**inputs, seq_idx=seq_idx, initial_state=initial)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-12)


def test_chunk_scan_gradients_match_the_recurrence_and_per_head_d():
    inputs = {k: v.requires_grad_() for k, v in ssm_inputs(length=21, seed=1).items()}
    inputs["D"] = torch.randn(4, 3, dtype=F64, requires_grad=True)  # D per (head, channel)
    seq_idx = torch.tensor([[0] * 9 + [1] * 12] * 2)
    y = mamba_chunk_scan_torch(**inputs, chunk_size=8, dt_softplus=True, seq_idx=seq_idx)
    y_ref, _ = sequential_ssm(**inputs, seq_idx=seq_idx)
    weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum(), list(inputs.values()))
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), list(inputs.values()))
    for name, grad, grad_ref in zip(inputs, grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-11, msg=f"d/d{name}")


def test_chunk_scan_has_finite_gradients_when_decay_underflows():
    """dt·|A| summed over a chunk far beyond 88 (exp overflow in fp32): masks precede every exp."""
    inputs = ssm_inputs(batch=1, length=256, heads=2, groups=1, dtype=torch.float32, seed=2)
    inputs["dt"] = torch.full((1, 256, 2), 50.0)
    inputs["A"] = torch.tensor([-5.0, -8.0])
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    y = mamba_chunk_scan_torch(**inputs, chunk_size=128, dt_softplus=True)
    y.square().sum().backward()
    assert torch.isfinite(y).all()
    for name, value in inputs.items():
        assert torch.isfinite(value.grad).all(), name


def test_causal_conv1d_respects_sequence_boundaries():
    x, weight, bias = torch.randn(2, 6, 37, dtype=F64), torch.randn(6, 4, dtype=F64), torch.randn(6, dtype=F64)
    dense = F.conv1d(x, weight[:, None], bias, padding=3, groups=6)[..., :37]
    torch.testing.assert_close(causal_conv1d_torch(x, weight, bias), dense)
    packed = causal_conv1d_torch(x, weight, bias, seq_idx=PACKED, activation="silu")
    pieces = [F.conv1d(x[:1, :, a:b], weight[:, None], bias, padding=3, groups=6)[..., : b - a] for a, b in ((0, 5), (5, 25), (25, 37))]
    torch.testing.assert_close(packed[:1], F.silu(torch.cat(pieces, -1)))
    torch.testing.assert_close(packed[1:], F.silu(dense[1:]))


def test_split_conv1d_scan_composes_conv_scan_and_gate():
    batch, length, heads, head_dim, groups, state = 2, 37, 4, 3, 2, 5
    dim, width = heads * head_dim, 4
    zxbcdt = torch.randn(batch, length, 2 * dim + 2 * groups * state + heads, dtype=F64)
    conv_weight = torch.randn(dim + 2 * groups * state, width, dtype=F64)
    conv_bias, dt_bias = torch.randn(dim + 2 * groups * state, dtype=F64), torch.randn(heads, dtype=F64)
    A, D = -3 * torch.rand(heads, dtype=F64), torch.randn(heads, dtype=F64)
    y = mamba_split_conv1d_scan_torch(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size=16, seq_idx=PACKED,
                                      headdim=head_dim, ngroups=groups)
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * groups * state, heads], dim=-1)
    xBC = causal_conv1d_torch(xBC.transpose(1, 2), conv_weight, conv_bias, PACKED, "silu").transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, groups * state, groups * state], dim=-1)
    y_ref, _ = sequential_ssm(x.reshape(batch, length, heads, head_dim), dt, A, B.reshape(batch, length, groups, state),
                              C.reshape(batch, length, groups, state), D, z.reshape(batch, length, heads, head_dim),
                              dt_bias, seq_idx=PACKED)
    torch.testing.assert_close(y, y_ref.reshape(batch, length, dim), rtol=1e-10, atol=1e-12)


def test_enable_cpu_mode_is_idempotent_and_patches_megatron():
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.ssm import mamba_mixer
    from megatron.core.transformer import utils

    assert enable_cpu_mode() is True
    patched = (mamba_mixer.mamba_split_conv1d_scan_combined, mamba_mixer.ExtendedRMSNorm, torch.cuda.current_device)
    assert enable_cpu_mode() is True
    assert (mamba_mixer.mamba_split_conv1d_scan_combined, mamba_mixer.ExtendedRMSNorm, torch.cuda.current_device) == patched
    assert mamba_mixer.mamba_split_conv1d_scan_combined is mamba_split_conv1d_scan_torch
    assert mamba_mixer.mamba_chunk_scan_combined is mamba_chunk_scan_torch
    assert mamba_mixer.HAVE_MAMBA_SSM and mamba_mixer.selective_state_update is None
    assert mamba_mixer.causal_conv1d_update is None and mamba_mixer.causal_conv1d_fn is None
    assert torch.cuda.current_device() == torch.device("cpu")
    assert hybrid_block.TENorm is TorchNorm
    for module in (utils, fused_softmax):
        mask = module.get_default_causal_mask(4)
        assert mask.device.type == "cpu" and torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).triu(1))


def test_gated_rms_norm_matches_its_definition():
    enable_cpu_mode()
    from megatron.core.ssm import mamba_mixer

    norm = mamba_mixer.ExtendedRMSNorm(12, eps=1e-5, group_size=4, norm_before_gate=False, dtype=F64)
    with torch.no_grad():
        norm.weight.normal_()
    x, z = torch.randn(3, 12, dtype=F64), torch.randn(3, 12, dtype=F64)
    gated = (x * F.silu(z)).view(3, 3, 4)
    expected = (gated / gated.square().mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 12) * norm.weight
    torch.testing.assert_close(norm(x, z), expected)


def test_rng_tracker_forks_named_cpu_streams():
    tracker = CPURNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    tracker.add("data-parallel-rng", 7)
    torch.manual_seed(0)
    outside = torch.get_rng_state()
    with tracker.fork():
        first = torch.randn(3)
    with tracker.fork():
        second = torch.randn(3)
    assert torch.equal(torch.get_rng_state(), outside)
    torch.manual_seed(123)
    torch.testing.assert_close(torch.cat([first, second]), torch.randn(6))
    with tracker.fork("data-parallel-rng"):
        other = torch.randn(3)
    assert not torch.equal(other, first)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("another", 7)
    with pytest.raises(ValueError, match="is not added"):
        with tracker.fork("expert-parallel-rng"):
            pass


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_no_op_when_cuda_is_available():
    out = run_python(
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "original = torch.cuda.current_device\n"
        "from echo_megatron.megatron.cpu import enable_cpu_mode, cpu_mode_enabled\n"
        "from megatron.core.ssm import mamba_mixer\n"
        "print(enable_cpu_mode(), cpu_mode_enabled(), torch.cuda.current_device is original,\n"
        "      mamba_mixer.HAVE_MAMBA_SSM, 'selective_scan_cuda' in sys.modules)\n"
    )
    assert out.split() == ["False", "False", "True", "False", "False"]


def test_gpu_code_paths_never_import_cpu_mode():
    out = run_python(
        "import sys\n"
        "import echo_megatron.megatron, echo_megatron.megatron.specs, echo_megatron.megatron.ska_layer\n"
        "import echo_megatron.megatron.presets, echo_megatron.megatron.inference\n"
        "print('echo_megatron.megatron.cpu' in sys.modules)\n"
    )
    assert out.split() == ["False"]
