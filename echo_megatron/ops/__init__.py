"""Spectral Koopman Attention operator: one dispatching API over reference, torch and Triton paths.

Shapes: q, k [B, T, H, r]; v [B, T, H, P]; eta, gamma [H]; y [B, T, H, P]. See SPEC §2–4.
"""

from __future__ import annotations

from torch import Tensor

from . import decode as _decode
from .chunked import ska_chunked
from .context_parallel import ska_context_parallel
from .decode import SKAState, StateSlots
from .reference import ska_reference
from .validation import DECODE_BACKENDS, DECODE_NORMS, check_backend, check_devices, check_finite, check_heads, check_options, check_sequence_inputs, promote

__all__ = ["ska", "ska_prefill", "ska_step", "ska_step_slots", "SKAState", "StateSlots", "ska_chunked", "ska_reference", "ska_context_parallel"]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_auto(backend: str, q: Tensor) -> str:
    """backend, with "auto" resolved: Triton for CUDA tensors (when triton imports), torch otherwise."""
    if backend == "auto":
        return "triton" if q.is_cuda and _triton_available() else "torch"
    return backend


def ska(
    q: Tensor, k: Tensor, v: Tensor, *, eta: Tensor, gamma: Tensor, chunk_size: int = 64, power: int = 2,
    eps: float = 1e-3, norm: str = "causal_max", mode: str = "chunk_causal", mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None, power_iters: int = 6, backend: str = "auto", validate: bool = False,
) -> Tensor:
    """Spectral Koopman Attention.

    Args:
        q, k: queries and keys [B, T, H, r]; v: values [B, T, H, P].
        eta: output scale η per head [H]; gamma: effective γ̂ per head [H] (1 + 0.5·sigmoid(ρ) in a layer).
        chunk_size: S >= 1; a query in chunk c reads the tokens of chunks < c (chunk_causal).
        power: K >= 0, power of the whitened Koopman operator in the readout.
        eps: ridge > 0 (λ = eps·m² with a max-norm, eps with norm="none").
        norm: "causal_max" (m over the visible tokens), "sequence_max" (m over the whole sequence:
            non-causal in chunk_causal mode, warns) or "none".
        mode: "chunk_causal" (training, causal) or "prefix" (one readout over all visible tokens).
        mask: [B, T] of 0/1; tokens with 0 add nothing to the statistics (they still get an output).
        cu_seqlens: [N+1] int offsets of packed sequences (B must be 1); each sequence is independent.
        power_iters: power-iteration steps for the spectral-norm estimate σ (no gradient), at most 32.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch", "reference" (slow loops),
            "triton" (on CPU tensors it runs the kernels under the Triton interpreter).
        validate: also check the data (finite q/k/v, 0/1 mask, well-formed cu_seqlens): host syncs, so off by
            default. Without it the default path reads no tensor value on the host, except that packed
            sequences (cu_seqlens) need their chunk count on the host to size the grid.
    Returns:
        y [B, T, H, P] in the common dtype of q, k, v (promoted, never downcast); statistics are computed in
        fp32 (fp64 for fp64 inputs). NaN/Inf inputs give NaN outputs wherever they are read, in every backend
        (see `validation`); all tensors must be on one device.
    """
    check_sequence_inputs(q, k, v, eta, gamma, chunk_size=chunk_size, power=power, eps=eps, norm=norm, mode=mode,
                          mask=mask, cu_seqlens=cu_seqlens, power_iters=power_iters, backend=backend,
                          validate=validate)
    q, k, v = promote(q, k, v)
    backend = _resolve_auto(backend, q)
    options = dict(chunk_size=chunk_size, power=power, eps=eps, norm=norm, mode=mode, mask=mask,
                   cu_seqlens=cu_seqlens, power_iters=power_iters)
    if backend == "reference":
        return ska_reference(q, k, v, eta, gamma, **options)
    if backend == "triton":
        from .triton import ska_triton

        return ska_triton(q, k, v, eta, gamma, **options)
    return ska_chunked(q, k, v, eta, gamma, **options)


def ska_prefill(
    q: Tensor, k: Tensor, v: Tensor, *, eta: Tensor, gamma: Tensor, chunk_size: int = 64, power: int = 2,
    eps: float = 1e-3, norm: str = "causal_max", power_iters: int = 6, validate: bool = False,
) -> tuple[Tensor, SKAState]:
    """chunk_causal SKA over a prompt, plus the constant-size decode state after it.

    q, k: [B, T0, H, r]; v: [B, T0, H, P] (T0 may be 0) -> (y [B, T0, H, P], state).
    norm must be "causal_max" or "none" (decoding cannot see the future). dtypes, devices, NaN and
    `validate` as in `ska`.
    """
    check_heads(q, k, v, eta, gamma, token_axes=2)
    check_options(chunk_size=chunk_size, power=power, eps=eps, norm=norm, power_iters=power_iters,
                  norms=DECODE_NORMS)
    if validate:
        check_finite(q=q, k=k, v=v)
    q, k, v = promote(q, k, v)
    return _decode.prefill(q, k, v, eta, gamma, chunk_size=chunk_size, power=power, eps=eps, norm=norm,
                           power_iters=power_iters)


def _decode_backend(backend: str, q: Tensor) -> str:
    check_backend(backend, DECODE_BACKENDS)
    return _resolve_auto(backend, q)


def ska_step(
    q: Tensor, k: Tensor, v: Tensor, state: SKAState, *, eta: Tensor, gamma: Tensor, backend: str = "auto"
) -> tuple[Tensor, SKAState]:
    """One decode step: q, k [B, H, r]; v [B, H, P] -> (y [B, H, P], new state of the same size).

    prefill(T0) followed by n steps equals `ska(..., mode="chunk_causal")` over T0 + n tokens. backend:
    "auto" (Triton for CUDA tensors, torch otherwise), "torch", or "triton" (one kernel launch per token, plus
    the readout recompute when the token completes its chunk; under the Triton interpreter on CPU tensors).
    The state passed in is left unchanged.
    """
    if not isinstance(state, SKAState):
        raise TypeError(f"state must be an SKAState from ska_prefill, got {type(state).__name__}")
    check_heads(q, k, v, eta, gamma, token_axes=1)
    check_devices(q, state=state.readout)
    expected = tuple(state.readout.shape[:2]) + (state.readout.shape[3],)
    if tuple(q.shape) != expected or v.shape[-1] != state.readout.shape[2]:
        raise ValueError(f"q, k must have shape [B, H, r] = {expected} and v [B, H, P] with P = "
                         f"{state.readout.shape[2]} to match the state, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    q, k, v = promote(q, k, v)
    if _decode_backend(backend, q) == "triton":
        from .triton.decode import step_triton

        return step_triton(q, k, v, state, eta=eta, gamma=gamma)
    return _decode.step(q, k, v, state, eta=eta, gamma=gamma)


def ska_step_slots(
    q: Tensor, k: Tensor, v: Tensor, slots: StateSlots, rows: Tensor, *, eta: Tensor, gamma: Tensor,
    backend: str = "auto",
) -> Tensor:
    """One decode step for the requests held in `slots` at indices `rows` [B] (distinct, on the device), each
    at its own position in its chunk (a serving engine's batch): q, k [B, H, r]; v [B, H, P] -> y [B, H, P];
    the slots are updated in place. Reads no tensor value on the host. backend as in `ska_step` ("triton":
    the readout is recomputed only for the rows that complete a chunk; "torch" recomputes it for every row
    and keeps it where a chunk completes)."""
    check_heads(q, k, v, eta, gamma, token_axes=1)
    check_devices(q, state=slots.readout, rows=rows)
    expected = (rows.shape[0], *slots.readout.shape[1:2], slots.readout.shape[3])
    if rows.dim() != 1 or tuple(q.shape) != expected or v.shape[-1] != slots.readout.shape[2]:
        raise ValueError(f"rows must be [B] and q, k [B, H, r] = {expected}, v [B, H, P] with P = "
                         f"{slots.readout.shape[2]}, got rows {tuple(rows.shape)}, q {tuple(q.shape)}, "
                         f"v {tuple(v.shape)}")
    q, k, v = promote(q, k, v)
    if _decode_backend(backend, q) == "triton":
        from .triton.decode import step_slots_triton

        return step_slots_triton(q, k, v, slots, rows, eta=eta, gamma=gamma)
    return _decode.step_slots(q, k, v, slots, rows, eta=eta, gamma=gamma)
