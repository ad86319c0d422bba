"""The sm_90 compile report (`ops/triton/aot.py`): every kernel of a bf16 forward+backward, and of decoding,
compiles for H100/H200 at r ∈ {32, 48, 64, 128} without spills, within an SM's shared
memory, and the dense kernels leave room for at least two programs per SM at r = 64 (issue 18). Compiled with
Triton's bundled ptxas, no GPU needed."""

from __future__ import annotations

import pytest

from echo_megatron.ops.triton.aot import KernelResources, sm90_report
from echo_megatron.ops.triton.function import DENSE_PROGRAMS_PER_SM

H100_SHARED_MEMORY = 227 * 1024  # bytes one program may use on sm_90
# the walks (backward at r <= 64; at 128 the two stages'), the dense and readout kernels, and the two stages that
# context parallelism runs
KERNELS = {"visible_stats_fwd_kernel", "visible_stats_bwd_kernel", "segment_scan_kernel", "chunk_stats_fwd_kernel",
           "chunk_stats_bwd_kernel", "readout_matrix_fwd_kernel", "readout_matrix_bwd_kernel", "readout_fwd_kernel",
           "readout_bwd_kernel"}
DENSE = {"readout_matrix_fwd_kernel", "readout_matrix_bwd_kernel"}
DECODE_KERNELS = {"decode_step_kernel", "readout_matrix_fwd_kernel"}  # the step; the listed recompute

@pytest.mark.parametrize("registers,warps,shared,expected", [
    (255, 4, 0, 2),  # 256 registers × 128 threads = half the register file
    (218, 4, 4096, 2), (125, 4, 1024, 4), (255, 8, 0, 1),
    (32, 4, 0, 16),  # 64 warps per SM at most
    (24, 1, 0, 32),  # 32 programs per SM at most
    (64, 4, 100 * 1024, 2),  # shared memory: 2 × (100 KiB + 1 KiB) <= 228 KiB
])
def test_programs_per_sm_follows_the_occupancy_rules(registers, warps, shared, expected):
    assert KernelResources("k", "", warps, registers, 0, shared).programs_per_sm == expected


@pytest.mark.parametrize("decode", [False, True], ids=["training", "decode"])
def test_every_kernel_fits_hopper_at_every_rank(decode):
    rows = sm90_report(decode=decode)
    assert {res.name for _, _, res in rows} == (DECODE_KERNELS if decode else KERNELS)
    assert {(rank, value_dim) for rank, value_dim, _ in rows} == {(32, 32), (48, 64), (64, 64), (128, 128)}
    for rank, value_dim, res in rows:
        assert res.spill_bytes == 0, (rank, value_dim, res)
        assert res.shared_bytes <= H100_SHARED_MEMORY, (rank, value_dim, res)
    for rank, _, res in rows:
        if res.name in DENSE and rank <= 64:
            assert res.num_warps == 4 and res.programs_per_sm >= 2, res
        if res.name in DENSE:  # the persistent grid's programs per SM are all resident at once
            assert res.programs_per_sm >= DENSE_PROGRAMS_PER_SM, res
