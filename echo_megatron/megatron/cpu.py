"""CPU mode: Megatron-Core + mamba-ssm on a machine without CUDA (and without Transformer Engine).

Call `enable_cpu_mode()` before building models (then seed with Megatron's
`model_parallel_cuda_manual_seed`); it is explicit (nothing imports this module on a GPU code path),
idempotent, a no-op when CUDA is available, and independent of import order (Megatron's modules are
patched in place). It changes exactly this:

- `TRITON_INTERPRET=1` unless already set, so any Triton kernel still reached runs in the interpreter.
- Stub modules for mamba-ssm's missing CUDA extensions (`selective_scan_cuda`, `causal_conv1d_cuda`),
  so `mamba_ssm` imports; calling into a stub raises a RuntimeError.
- `torch.cuda.current_device()` returns the CPU device (Megatron allocates parameters there) and
  `torch.cuda.synchronize()` is a no-op (Megatron's distributed checkpointing calls it).
- Megatron's Mamba mixer (`megatron.core.ssm.mamba_mixer`): the fused conv1d + SSD training kernel
  and the SSD prefill kernel become the pure-PyTorch `mamba_split_conv1d_scan_torch` /
  `mamba_chunk_scan_torch` below (packed sequences via `seq_idx`, masks applied *before* every
  exponential so gradients stay finite for large dt·|A|); the gated RMSNorm uses mamba-ssm's
  `rms_norm_ref`; decoding uses Megatron's own PyTorch fallbacks (`causal_conv1d_update` and
  `selective_state_update` set to None).
- The hybrid stack's final norm (`TENorm` in `megatron.core.models.hybrid.hybrid_block`) becomes
  `TorchNorm`; the specs' own norms are chosen by the local specs.
- The default causal / sliding-window masks of Megatron's softmax attention are built on the CPU.
- Megatron's RNG-state tracker forks the CPU generator, so `model_parallel_cuda_manual_seed(seed)`
  works (and gives each tensor-parallel rank its own model-parallel stream, as on GPUs).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import math
import os
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.tensor_parallel import random as tensor_parallel_random

from .norm import use_torch_final_norm

CUDA_EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")
CPU_SCAN_CHUNK = 32  # chunk of the pure-PyTorch SSD scan: Megatron's 128 makes dense intra-chunk terms 4x larger

_enabled = False


def cpu_mode_enabled() -> bool:
    """Whether `enable_cpu_mode()` has switched this process to CPU mode."""
    return _enabled


def enable_cpu_mode() -> bool:
    """Switch this process to CPU mode (see the module docstring).

    Returns True when CPU mode is active, False when CUDA is available (then nothing is changed).
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _install_extension_stubs()
    torch.cuda.current_device = _cpu_device
    torch.cuda.synchronize = _nothing_to_synchronize
    _patch_mamba_mixer()
    use_torch_final_norm(only_without_te=False)
    _patch_causal_masks()
    install_cpu_rng_tracker()
    _enabled = True
    return True


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _nothing_to_synchronize(device=None) -> None:
    """CPU work is synchronous."""


# ---------------------------------------------------------------------------------------------
# Missing CUDA extensions
# ---------------------------------------------------------------------------------------------


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{name}.{attr} is a CUDA extension, unavailable in echo-megatron's CPU mode")

        return unavailable

    module.__getattr__ = __getattr__
    return module


def _install_extension_stubs() -> None:
    for name in CUDA_EXTENSIONS:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = _stub_module(name)


# ---------------------------------------------------------------------------------------------
# Mamba-2 (SSD) in plain PyTorch
# ---------------------------------------------------------------------------------------------


def causal_conv1d_torch(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, seq_idx: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """Depthwise causal conv1d, like `causal_conv1d_fn`: x [b, d, l], weight [d, w], bias [d] -> [b, d, l].

    With seq_idx [b, l] (packed sequences) an output only sees inputs of its own sequence.
    """
    width = weight.shape[-1]
    length = x.shape[-1]
    if seq_idx is None:
        out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., :length]
    else:
        windows = F.pad(x, (width - 1, 0)).unfold(-1, width, 1)  # [b, d, l, w]: inputs t-w+1 .. t
        window_seq = F.pad(seq_idx, (width - 1, 0), value=-1).unfold(-1, width, 1)  # [b, l, w]
        same = (window_seq == seq_idx.unsqueeze(-1)).to(x.dtype)
        out = torch.einsum("bdlw,blw,dw->bdl", windows, same, weight)
        if bias is not None:
            out = out + bias[:, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return out


def _ssd_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, seq_idx: Tensor | None,
    initial_states: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The SSD recurrence h_t = exp(dt_t·A) h_{t-1} + dt_t x_t B_tᵀ, y_t = h_t C_t, in fp32 (fp64 stays fp64).

    x [b, l, h, p], dt [b, l, h] (after bias/softplus/limits), A [h], B, C [b, l, g, n],
    seq_idx [b, l] non-decreasing or None, initial_states [b, h, p, n] or None
    -> (y [b, l, h, p], final state [b, h, p, n]). Intra-chunk terms are dense; chunk states are
    passed sequentially over chunks. Every decay exponent is masked before `exp`. The result does
    not depend on the chunk size, so chunks are capped at `CPU_SCAN_CHUNK` (the fastest on CPU).
    """
    chunk_size = min(chunk_size, CPU_SCAN_CHUNK)
    batch, length, heads, head_dim = x.shape
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    repeat = heads // B.shape[2]
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    B = B.to(dtype).repeat_interleave(repeat, dim=2)
    C = C.to(dtype).repeat_interleave(repeat, dim=2)
    pad = (-length) % chunk_size
    if seq_idx is None:
        seq_idx = torch.zeros(batch, length, dtype=torch.long, device=x.device)
    if pad:  # padded tokens have dt = 0: no decay and no contribution
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], dim=1)
    chunks = (length + pad) // chunk_size
    x, B, C = (t.reshape(batch, chunks, chunk_size, heads, -1) for t in (x, B, C))
    dt = dt.reshape(batch, chunks, chunk_size, heads)
    seq = seq_idx.reshape(batch, chunks, chunk_size)
    cum = torch.cumsum(dt * A, dim=2)  # [b, c, s, h]: log-decay from the chunk start

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    visible = causal & (seq[..., :, None] == seq[..., None, :])  # [b, c, l, s]
    log_decay = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [b, c, l, s, h]
    decay = torch.where(visible[..., None], log_decay, -math.inf).exp()
    scores = torch.einsum("bclhn,bcshn->bclsh", C, B) * decay * dt[:, :, None]
    y_intra = torch.einsum("bclsh,bcshp->bclhp", scores, x)

    end_seq = seq[:, :, -1]  # [b, c]: the sequence a chunk-end state belongs to
    to_end = (cum[:, :, -1:] - cum).exp() * dt * (seq == end_seq[..., None]).unsqueeze(-1)
    chunk_states = torch.einsum("bcsh,bcshn,bcshp->bchpn", to_end, B, x)

    state = x.new_zeros(batch, heads, head_dim, B.shape[-1]) if initial_states is None else initial_states.to(dtype)
    state_seq = seq[:, 0, 0]
    y_inter = []
    for c in range(chunks):
        carried = (seq[:, c] == state_seq[:, None]).unsqueeze(-1) * cum[:, c].exp()  # [b, s, h]
        y_inter.append(torch.einsum("bshn,bhpn,bsh->bshp", C[:, c], state, carried))
        keep = (end_seq[:, c] == state_seq).unsqueeze(-1) * cum[:, c, -1].exp()  # [b, h]
        state = keep[..., None, None] * state + chunk_states[:, c]
        state_seq = end_seq[:, c]
    y = y_intra + torch.stack(y_inter, dim=1)
    return y.reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length], state


def mamba_chunk_scan_torch(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
    z: Tensor | None = None, dt_bias: Tensor | None = None, initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None, cu_seqlens: Tensor | None = None, dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")), return_final_states: bool = False,
    return_varlen_states: bool = False, state_dtype: torch.dtype | None = None,
):
    """PyTorch drop-in for `mamba_ssm`'s `mamba_chunk_scan_combined` (same arguments and results).

    x [b, l, h, p], dt [b, l, h], A [h], B, C [b, l, g, n], D [h] or [h, p], z [b, l, h, p] (gate
    y·silu(z)), dt_bias [h] -> y [b, l, h, p] in x's dtype (and the final state [b, h, p, n] in fp32
    with return_final_states). States are always fp32, so `state_dtype` is accepted and not needed.
    """
    if return_varlen_states or cu_seqlens is not None:
        raise NotImplementedError("mamba_chunk_scan_torch: varlen states (dynamic inference) are not supported in CPU mode")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    dt = dt.to(work)
    if dt_bias is not None:
        dt = dt + dt_bias.to(work)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    y, final_state = _ssd_scan(x, dt, A, B, C, chunk_size, seq_idx, initial_states)
    if D is not None:
        y = y + x.to(y.dtype) * (D.to(y.dtype) if D.dim() == 2 else D.to(y.dtype)[:, None])
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    y = y.to(x.dtype)
    return (y, final_state) if return_final_states else y


def mamba_split_conv1d_scan_torch(
    zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
    chunk_size: int, initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")), return_final_states: bool = False, activation: str = "silu",
    rmsnorm_weight: Tensor | None = None, rmsnorm_eps: float = 1e-6, outproj_weight: Tensor | None = None,
    outproj_bias: Tensor | None = None, headdim: int | None = None, ngroups: int = 1, norm_before_gate: bool = True,
    state_dtype: torch.dtype | None = None,
):
    """PyTorch drop-in for `mamba_ssm`'s `mamba_split_conv1d_scan_combined` as Megatron's Mamba mixer
    calls it (its gated RMSNorm and out_proj are separate modules, so no rmsnorm_weight / outproj).

    zxbcdt [b, l, 2·dim + 2·g·n + h] = [z | x B C (through the causal conv) | dt] -> y·silu(z) [b, l, dim].
    """
    if rmsnorm_weight is not None or outproj_weight is not None:
        raise NotImplementedError("mamba_split_conv1d_scan_torch: rmsnorm_weight / outproj_weight are not supported")
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("mamba_split_conv1d_scan_torch: headdim is required when D is 1-D")
        heads = D.shape[0]
    else:
        heads, headdim = D.shape
    dim = heads * headdim
    state_width = (conv1d_weight.shape[0] - dim) // 2  # ngroups · dstate
    if zxbcdt.shape[-1] != 2 * dim + 2 * state_width + heads:
        raise ValueError(f"mamba_split_conv1d_scan_torch: zxbcdt has width {zxbcdt.shape[-1]}, expected "
                         f"{2 * dim + 2 * state_width + heads} (no extra SwiGLU channels in CPU mode)")
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * state_width, heads], dim=-1)
    xBC = causal_conv1d_torch(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx, activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, state_width, state_width], dim=-1)
    batch, length = x.shape[:2]
    z = z.reshape(batch, length, heads, headdim)
    out = mamba_chunk_scan_torch(
        x.reshape(batch, length, heads, headdim), dt, A, B.reshape(batch, length, ngroups, -1),
        C.reshape(batch, length, ngroups, -1), chunk_size, D=D, z=z, dt_bias=dt_bias,
        initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states,
    )
    if return_final_states:
        return out[0].reshape(batch, length, dim), out[1]
    return out.reshape(batch, length, dim)


def _gated_rms_norm_class() -> type:
    """mamba-ssm's gated RMSNorm module with its PyTorch reference forward, plus Megatron's sharding."""
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm, rms_norm_ref

    from megatron.core.utils import get_tensor_model_parallel_group_if_none
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

    class GatedRMSNormCPU(RMSNorm):
        """norm(x · silu(z)) (or norm(x) · silu(z)) per group, via `rms_norm_ref`; weight TP-sharded on axis 0."""

        def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
            return rms_norm_ref(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                                norm_before_gate=self.norm_before_gate, upcast=x.dtype != torch.float64)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            tp_group = getattr(self, "tp_group", None) or get_tensor_model_parallel_group_if_none(None)
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
                tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"],
            )

    return GatedRMSNormCPU


def _patch_mamba_mixer() -> None:
    from megatron.core.ssm import mamba_mixer

    mamba_mixer.ExtendedRMSNorm = _gated_rms_norm_class()
    mamba_mixer.RMSNormGated = mamba_mixer.ExtendedRMSNorm
    mamba_mixer.HAVE_MAMBA_SSM = True
    mamba_mixer.MAMBA_HAS_STATE_DTYPE = True
    mamba_mixer.mamba_split_conv1d_scan_combined = mamba_split_conv1d_scan_torch
    mamba_mixer.mamba_chunk_scan_combined = mamba_chunk_scan_torch
    mamba_mixer.causal_conv1d_fn = None  # prefill: Megatron's F.conv1d path
    mamba_mixer.causal_conv1d_update = None  # decode: Megatron's PyTorch fallbacks
    mamba_mixer.selective_state_update = None


# ---------------------------------------------------------------------------------------------
# Norms, masks, RNG
# ---------------------------------------------------------------------------------------------


def _default_causal_mask(sq: int) -> Tensor:
    """Upper-triangular [sq, sq] boolean mask (True = masked), on the CPU."""
    return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


def _sliding_window_causal_mask(sq: int, skv: int, window_size: tuple[int, int]) -> Tensor:
    """Megatron's sliding-window mask [sq, skv] (True = masked), on the CPU."""
    ones = torch.ones(sq, skv, dtype=torch.bool)
    return ~torch.tril(torch.triu(ones, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])


def _patch_causal_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    for module in (utils, fused_softmax):
        module.get_default_causal_mask = _default_causal_mask
        module.get_sliding_window_causal_mask = _sliding_window_causal_mask


class CPURNGStatesTracker(tensor_parallel_random.CudaRNGStatesTracker):
    """Megatron's named RNG states (data-parallel, model-parallel, expert) on the CPU generator."""

    def add(self, name: str, seed: int) -> None:
        """Track a new named state seeded with `seed`."""
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = tensor_parallel_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Draw from the named state inside the block; the default generator is restored after."""
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added: call model_parallel_cuda_manual_seed(seed) first")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_cpu_rng_tracker() -> None:
    """Make a fresh `CPURNGStatesTracker` Megatron's RNG tracker (done by `enable_cpu_mode`; call it
    again if other code replaced the tracker). Seed it with `model_parallel_cuda_manual_seed(seed)`."""
    tensor_parallel_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    tensor_parallel_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


class CPUEvent:
    """A `torch.cuda.Event` stand-in: CPU work is synchronous, so every wait is already satisfied."""

    def __init__(self, *args, **kwargs) -> None:
        """Takes `torch.cuda.Event`'s arguments (enable_timing, blocking, interprocess); none applies on CPU."""

    def record(self, stream=None) -> None:
        """Nothing to mark: the work before this call has already run."""

    def synchronize(self) -> None:
        """Nothing to wait for: the recorded work has already run."""

    def wait(self, stream=None) -> None:
        """Nothing to wait for: the recorded work has already run."""

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: "CPUEvent") -> float:
        return 0.0


class CPUStream:
    """A `torch.cuda.Stream` stand-in: CPU work is already ordered, so every operation is a no-op."""

    def __init__(self, *args, **kwargs) -> None:
        """Takes `torch.cuda.Stream`'s arguments (device, priority); none applies on CPU."""

    def synchronize(self) -> None:
        """Nothing to wait for: the stream's work has already run."""

    def wait_stream(self, stream) -> None:
        """Nothing to order: every CPU stream runs on the calling thread, in program order."""

    def wait_event(self, event) -> None:
        """Nothing to order: the event's work has already run."""

    def record_event(self, event: CPUEvent | None = None) -> CPUEvent:
        return event or CPUEvent()
