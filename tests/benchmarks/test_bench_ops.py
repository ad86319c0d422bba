"""benchmarks/bench_ops.py: the attention baseline runs PyTorch's CPU flash kernel, not the math backend."""

import importlib.util
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ops.py"
_spec = importlib.util.spec_from_file_location("bench_ops", _PATH)
bench_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_ops)


def _bhtd(*widths, t=128):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 8, t, w, generator=gen) for w in widths]


def test_equal_head_widths_run_the_flash_kernel():
    """The benchmark picks flash for equal widths, and its runner forces it (an order of ATTENTION_BACKENDS
    or a probe that picks another kernel fails here)."""
    q, k, v = _bhtd(64, 64, 64)
    assert bench_ops.fastest_attention_backend(q, k, v) == SDPBackend.FLASH_ATTENTION
    _, backend = bench_ops._attention_runner(128, backward=False)
    assert backend == "FLASH_ATTENTION"


def test_unequal_widths_fall_back_and_the_runner_reports_the_backend_that_ran():
    q, k, v = _bhtd(48, 48, 64)  # the old benchmark's shapes: flash refuses them
    assert bench_ops.fastest_attention_backend(q, k, v) != SDPBackend.FLASH_ATTENTION
    _, backend = bench_ops._attention_runner(256, backward=True)
    assert backend == "FLASH_ATTENTION"


def test_decode_step_uses_the_flash_kernel_on_the_kv_cache():
    _, cache_bytes, backend = bench_ops._decode_runner(256, "attention")
    assert backend == "FLASH_ATTENTION" and cache_bytes == 2 * 8 * 256 * 64 * 4
