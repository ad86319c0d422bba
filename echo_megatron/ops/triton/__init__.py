"""Triton kernels for Spectral Koopman Attention, forward and backward (SPEC §3, issue 4).

`ska_triton(q, k, v, eta, gamma, *, chunk_size, power, eps, norm, mode, mask, cu_seqlens, power_iters)`
has the signature and semantics of `echo_megatron.ops.chunked.ska_chunked`; reach it through
`echo_megatron.ops.ska(..., backend="triton")` (or backend="auto" on CUDA tensors).

* `kernels.py` — the @triton.jit kernels: chunk statistics, segmented scan, per-slot dense algebra,
  readout, each with its backward.
* `dense.py` — the per-slot dense algebra (loaded into `kernels.py`'s namespace).
* `function.py` — the autograd Functions (one per stage; `ChunkCausal`, chunk_causal mode in one node), the
  launches and `ska_triton`.
* `runtime.py` — CUDA tensors run the compiled kernels; CPU tensors run the very same kernels under the
  Triton interpreter, in any process: no TRITON_INTERPRET has to be exported before triton is imported
  (an interpreted copy of `kernels.py` is loaded on demand). bf16 is widened to fp32 there (the
  interpreter's bf16 `tl.dot` is wrong).
* `aot.py` — compiles the recorded launches of a call for sm_90 without a GPU (registers, spills, shared
  memory), used by the tests and `benchmarks/bench_kernels.py`.
"""

from .function import ska_triton

__all__ = ["ska_triton"]
