"""Triton kernels (run by the Triton interpreter on CPU) against the torch chunked path (SPEC §3, issue 4).

Every stage kernel is compared with its torch counterpart in `echo_megatron.ops.chunked`, outputs and
gradients, then the whole operator (`ska(..., backend="triton")` vs `backend="torch"`) on awkward sizes:
T not a multiple of S, r ∈ {5, 24, 64}, P not a power of two, masks, packed sequences. fp64 runs are
exact to round-off; fp32/fp16 runs are held to the torch path's own error against fp64. Every kernel
output is allocated NaN-filled, so an element a kernel forgets to write fails the comparison.
The interpreter computes bf16 `tl.dot` wrongly: only fp16/fp32/fp64 are run here.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from echo_megatron.ops import ska
from echo_megatron.ops.chunked import ChunkLayout, Statistics, chunk_statistics, readout_matrices, work_dtype
from echo_megatron.ops.triton import function as tfn
from echo_megatron.ops.triton import runtime

from .common import GRAD_NAMES, forward_and_grads, fuzz_case, make_inputs, rel_err

FP64_TOL = 1e-10


@pytest.fixture(autouse=True)
def nan_poisoned_kernel_outputs(monkeypatch):
    """Kernel outputs start as NaN (floats) or a huge negative index (ints) instead of uninitialised memory."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -(2**30), dtype=dtype, device=device)

    monkeypatch.setattr(tfn, "empty", poisoned)


def _weights(shape: torch.Size, dtype: torch.dtype, seed: int = 123) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _grads(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of Σ ⟨w_i, out_i⟩ with fixed pseudo-random w_i."""
    loss = sum((o.double() * _weights(o.shape, torch.float64, seed=i)).sum() for i, o in enumerate(outputs))
    return list(torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True))


def _assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], names: list[str], tol: float) -> None:
    for name, a, b in zip(names, actual, expected):
        assert torch.isfinite(a).all(), f"{name}: non-finite (unwritten?) entries"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        err = rel_err(a, b)
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------------------
# stage (a): per-chunk statistics
# ---------------------------------------------------------------------------------------------------------

STAT_CASES = [  # (B, T, H, r, P, S, cu_seqlens, masked)
    (2, 37, 2, 5, 7, 16, None, False),
    (2, 37, 1, 24, 33, 8, None, True),
    (1, 50, 2, 5, 7, 8, [0, 3, 3, 20, 50], True),
    (1, 70, 1, 64, 20, 32, [0, 41, 70], False),
]


def _table_and_layout(seq_len: int, chunk: int, cu_seqlens: list[int] | None):
    bounds = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    return tfn.ChunkTable.build(seq_len, chunk, bounds, torch.device("cpu")), ChunkLayout.build(
        seq_len, chunk, bounds, torch.device("cpu"))


def _unflatten(rows: torch.Tensor, rank: int, value_dim: int) -> list[torch.Tensor]:
    """Flat statistics rows [..., D] -> [G, M, C]."""
    square = rank * rank
    return [rows[..., :square].unflatten(-1, (rank, rank)), rows[..., square:2 * square].unflatten(-1, (rank, rank)),
            rows[..., 2 * square:].unflatten(-1, (value_dim, rank))]


@pytest.mark.parametrize("case", STAT_CASES, ids=lambda c: "B{}T{}H{}r{}P{}S{}-cu{}-mask{}".format(
    *c[:6], c[6] is not None, c[7]))
@pytest.mark.parametrize("norm_keys", [1, 2], ids=["masked_norms", "all_norms"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_chunk_statistics_kernel_matches_torch(case, norm_keys, dtype):
    batch, seq_len, heads, rank, value_dim, chunk, cu_seqlens, masked = case
    inputs = make_inputs(batch, seq_len, heads, rank, value_dim, dtype=dtype, requires_grad=True, seed=seq_len)
    k, v = inputs["k"], inputs["v"]
    mask = (torch.rand(batch, seq_len, generator=torch.Generator().manual_seed(1)) > 0.3) if masked else None
    table, layout = _table_and_layout(seq_len, chunk, cu_seqlens)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    weights = None if mask is None else mask.to(work)
    stats, max_norm = tfn.ChunkStatistics.apply(k, v, weights, table, norm_keys)
    got = _unflatten(stats, rank, value_dim) + [max_norm]

    expected = list(chunk_statistics(k.to(work), v.to(work), layout, mask))
    if norm_keys == 2:  # every key counts, masked or not (sequence_max)
        expected[3] = torch.linalg.vector_norm(layout.to_chunks(k.to(work)), dim=-1).amax(dim=-1)
    tol = FP64_TOL if dtype == torch.float64 else 1e-5
    names = ["G", "M", "C", "max_norm"]
    _assert_close(got, expected, names, tol)
    _assert_close(_grads(got, [k, v]), _grads(expected, [k, v]), ["dk", "dv"], tol if dtype == torch.float64 else 2e-3)


# ---------------------------------------------------------------------------------------------------------
# stage (a'): segmented scans (exclusive prefix / per-sequence totals, sums and maxima)
# ---------------------------------------------------------------------------------------------------------


def _torch_scan(x: torch.Tensor, layout: ChunkLayout, total: bool, use_max: bool) -> torch.Tensor:
    """Plain torch: exclusive prefix per sequence along dim 2, or per-sequence totals (0 when empty)."""
    pieces = []
    for c0, c1 in layout.segments:
        part = x[:, :, c0:c1]
        if total:
            empty = torch.zeros_like(x[:, :, 0])
            pieces.append((part.amax(dim=2) if use_max else part.sum(dim=2)) if c1 > c0 else empty)
        else:
            running = part.cummax(dim=2).values if use_max else part.cumsum(dim=2)
            pieces.append(torch.cat([torch.zeros_like(part[:, :, :1]), running[:, :, :-1]], dim=2))
    return torch.stack(pieces, dim=2) if total else torch.cat(pieces, dim=2)


@pytest.mark.parametrize("cu_seqlens", [None, [0, 3, 3, 40, 75, 100]], ids=["one_sequence", "packed"])
@pytest.mark.parametrize("total, sequence_max", [(False, False), (True, False), (False, True)],
                         ids=["exclusive", "totals", "exclusive_sums_sequence_max"])
def test_segment_scans_match_torch(cu_seqlens, total, sequence_max):
    table, layout = _table_and_layout(100, 8, cu_seqlens)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 3, table.num_chunks, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    maxima = torch.rand(2, 3, table.num_chunks, generator=gen, dtype=torch.float64)
    maxima[0, 0, 5] = maxima[0, 0, 9] = 2.0  # ties: cummax takes the later chunk, amax splits
    maxima[1, 2, 6] = maxima[1, 2, 7] = 3.0  # adjacent ties
    maxima.requires_grad_()
    got = list(tfn.SegmentScan.apply(rows, maxima, table, total, sequence_max))
    expected_max = _torch_scan(maxima, layout, total or sequence_max, use_max=True)
    if sequence_max and not total:  # the sequence's max repeated for each of its chunks
        expected_max = expected_max.index_select(2, layout.chunk_segment)
    expected = [_torch_scan(rows, layout, total, use_max=False), expected_max]
    _assert_close(got, expected, ["sum", "max"], 1e-14)
    _assert_close(_grads(got, [rows, maxima]), _grads(expected, [rows, maxima]), ["d_sum", "d_max"], 1e-14)


# the last: P padded to 128, where the backward is the two stages' (`WALK_BWD_TILING`)
@pytest.mark.parametrize("case", STAT_CASES + [(1, 40, 1, 5, 80, 16, [0, 23, 40], True)],
                         ids=lambda c: "B{}T{}H{}r{}P{}S{}-cu{}-mask{}".format(*c[:6], c[6] is not None, c[7]))
@pytest.mark.parametrize("total, sequence_max, norm_keys", [(False, False, 1), (False, False, 0), (True, False, 1),
                                                         (False, True, 2)],
                         ids=["exclusive", "exclusive_no_norm", "totals", "exclusive_sums_sequence_max"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_visible_statistics_walk_equals_statistics_then_scan(case, total, sequence_max, norm_keys, dtype):
    """The fused walk (stages a and a' in one launch each way) writes what the two stages write, bit for bit (the
    same sums in the same order), and its gradients equal theirs to round-off, ties of chunk maxima included."""
    batch, seq_len, heads, rank, value_dim, chunk, cu_seqlens, masked = case
    inputs = make_inputs(batch, seq_len, heads, rank, value_dim, dtype=dtype, requires_grad=True, seed=seq_len)
    k, v = inputs["k"].detach().clone(), inputs["v"]
    k[:, seq_len - 1] = k[:, 0] = 4 * k[:, 0]  # the largest key twice, in the first and the last chunk: tied maxima
    k.requires_grad_()
    mask = (torch.rand(batch, seq_len, generator=torch.Generator().manual_seed(1)) > 0.3) if masked else None
    if mask is not None:
        mask[:, [0, seq_len - 1]] = True
    table, _ = _table_and_layout(seq_len, chunk, cu_seqlens)
    weights = None if mask is None else mask.to(torch.float64 if dtype == torch.float64 else torch.float32)
    got = list(tfn.VisibleStatistics.apply(k, v, weights, table, norm_keys, total, sequence_max))
    expected = list(tfn.SegmentScan.apply(*tfn.ChunkStatistics.apply(k, v, weights, table, norm_keys), table, total,
                                          sequence_max))
    for name, a, b in zip(["sums", "max"], got, expected):
        assert torch.equal(a, b), f"{name}: max difference {(a - b).abs().max():.2e}"
    _assert_close(_grads(got, [k, v]), _grads(expected, [k, v]), ["dk", "dv"],
                  1e-14 if dtype == torch.float64 else 1e-6)


# ---------------------------------------------------------------------------------------------------------
# stage (b): dense per-slot algebra
# ---------------------------------------------------------------------------------------------------------


def _visible_statistics(batch: int, heads: int, rank: int, value_dim: int, chunk: int, seq_len: int,
                        dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Realistic visible statistics (exclusive prefix of real chunk statistics): rows [B, H, NC, D], m [B, H, NC]."""
    inputs = make_inputs(batch, seq_len, heads, rank, value_dim, dtype=torch.float64, seed=seed)
    layout = ChunkLayout.build(seq_len, chunk, None, torch.device("cpu"))
    stats = chunk_statistics(inputs["k"], inputs["v"], layout, None)
    prefix = [torch.cat([torch.zeros_like(x[:, :, :1]), x.cumsum(dim=2)[:, :, :-1]], dim=2) for x in stats[:3]]
    rows = torch.cat([x.flatten(3) for x in prefix], dim=-1)
    max_norm = torch.cat([torch.zeros_like(stats.max_norm[:, :, :1]), stats.max_norm.cummax(dim=2).values[:, :, :-1]],
                         dim=2)
    return rows.to(dtype).requires_grad_(), max_norm.to(dtype).requires_grad_()


def _torch_readout(rows, max_norm, gamma, rank, value_dim, **options):
    stats = Statistics(*_unflatten(rows, rank, value_dim), max_norm)
    return readout_matrices(stats, gamma.view(1, -1, 1), **options)


DENSE_CASES = [  # (r, P, K, norm)
    (5, 7, 2, "causal_max"), (5, 7, 0, "none"), (24, 33, 1, "causal_max"), (24, 17, 3, "none"),
    (64, 20, 2, "causal_max"),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "r{}P{}K{}-{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_readout_matrix_kernel_matches_torch(case, dtype):
    rank, value_dim, power, norm = case
    # chunks of 3r tokens keep the fp32 comparison well conditioned (chunk 1 already sees 3r keys)
    rows, max_norm = _visible_statistics(1, 2, rank, value_dim, 3 * rank, 9 * rank + 5, dtype, seed=rank + power)
    gamma = torch.tensor([1.2, 1.45], dtype=dtype, requires_grad=True)
    options = dict(power=power, eps=1e-3, norm=norm, power_iters=6)
    got = tfn.ReadoutMatrices.apply(rows, max_norm, gamma, rank, value_dim, power, 1e-3, norm, 6)
    expected = _torch_readout(rows, max_norm, gamma, rank, value_dim, **options)
    tol = FP64_TOL if dtype == torch.float64 else 2e-5
    _assert_close([got], [expected], ["R"], tol)
    _assert_close(_grads([got], [rows, max_norm, gamma]), _grads([expected], [rows, max_norm, gamma]),
                  ["d_stats", "d_max_norm", "d_gamma"], tol if dtype == torch.float64 else 2e-4)


def test_readout_matrix_kernel_jitter_rounds_and_failure():
    """A G̃ with a negative eigenvalue -5e-4·m² fails, then fails with +1e-4·m², then succeeds with +1e-3·m²
    exactly as in the torch path. One that no jitter can fix (not a Gram matrix: G = -100·m²·I) gives
    NaN in both."""
    rank, value_dim = 6, 5
    rows, max_norm = _visible_statistics(1, 1, rank, value_dim, 8, 40, torch.float64, seed=3)
    rows = rows.detach()
    gram = rows[..., :rank * rank].view(1, 1, -1, rank, rank)
    scale = max_norm.detach().clamp_min(1e-6) ** 2
    direction = torch.zeros(rank, dtype=torch.float64)
    direction[2] = 1.0
    # the 2nd coordinate of G̃ becomes -5e-4·m² (+ the keys' own contribution, projected out here)
    projector = torch.eye(rank, dtype=torch.float64) - torch.outer(direction, direction)
    negative = (1e-3 + 5e-4) * scale[..., None, None] * torch.outer(direction, direction)
    gram.copy_(projector @ gram @ projector - negative)
    rows.requires_grad_()
    gamma = torch.tensor([1.3], dtype=torch.float64, requires_grad=True)
    max_norm = max_norm.detach().requires_grad_()
    got = tfn.ReadoutMatrices.apply(rows, max_norm, gamma, rank, value_dim, 2, 1e-3, "causal_max", 6)
    expected = _torch_readout(rows, max_norm, gamma, rank, value_dim, power=2, eps=1e-3, norm="causal_max",
                              power_iters=6)
    _assert_close([got[:, :, 1:]], [expected[:, :, 1:]], ["R"], FP64_TOL)
    _assert_close(_grads([got], [rows, max_norm, gamma]), _grads([expected], [rows, max_norm, gamma]),
                  ["d_stats", "d_max_norm", "d_gamma"], FP64_TOL)

    hopeless = rows.detach().clone()
    hopeless[0, 0, 3, :rank * rank] = -100.0 * scale[0, 0, 3] * torch.eye(rank, dtype=torch.float64).flatten()
    failed_torch = _torch_readout(hopeless, max_norm, gamma, rank, value_dim, power=2, eps=1e-3, norm="causal_max",
                                  power_iters=6)
    failed = tfn.ReadoutMatrices.apply(hopeless, max_norm, gamma, rank, value_dim, 2, 1e-3, "causal_max", 6)
    for readout in (failed, failed_torch):  # the same in both: NaN for that matrix only
        assert torch.isnan(readout[0, 0, 3]).all()
        assert torch.isfinite(torch.cat([readout[0, 0, :3], readout[0, 0, 4:]])).all()


# ---------------------------------------------------------------------------------------------------------
# stage (c): readout Y_c = η R_c Q_c
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [False, True], ids=["per_chunk", "per_sequence"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_readout_kernel_matches_torch(total, dtype):
    batch, seq_len, heads, rank, value_dim = 2, 45, 2, 24, 7
    table, layout = _table_and_layout(seq_len, 16, None if batch > 1 else [0, 20, 45])
    inputs = make_inputs(batch, seq_len, heads, rank, value_dim, dtype=dtype, requires_grad=True)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    slots = table.num_slots(total)
    readout = torch.randn(batch, heads, slots, value_dim, rank, dtype=work, requires_grad=True)
    eta = inputs["eta"].to(work)
    got = tfn.Readout.apply(inputs["q"], readout, eta, table, total)
    per_chunk = readout.index_select(2, table.slots(total).long())
    expected = layout.from_chunks(layout.to_chunks(inputs["q"].to(work)) @ per_chunk.mT * eta[:, None, None, None]
                                  ).to(dtype)
    tol = FP64_TOL if dtype == torch.float64 else 1e-3
    _assert_close([got], [expected], ["y"], tol)
    wrt = [inputs["q"], readout, inputs["eta"]]
    _assert_close(_grads([got], wrt), _grads([expected], wrt), ["dq", "dR", "deta"], tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunk_readout_equals_readout_matrices_then_readout(dtype):
    """`ChunkReadout` (chunk_causal: each dense program reads its chunk out, and takes the readout's backward
    before its own) is `Readout` after `ReadoutMatrices`, the same building blocks in one launch each way:
    y, dq and the gradients of the statistics, max norms and γ̂ equal bit for bit; dη's shares are summed
    over the columns in the kernel first, so dη agrees to rounding. T not a multiple of S, r not a power of
    two, r wider than the 16 columns of dq the backward takes at a time."""
    batch, seq_len, heads, rank, value_dim, chunk = 1, 21, 2, 24, 7, 8
    rows, max_norm = _visible_statistics(batch, heads, rank, value_dim, chunk, seq_len, torch.float32, seed=3)
    table, _ = _table_and_layout(seq_len, chunk, None)
    inputs = make_inputs(batch, seq_len, heads, rank, value_dim, dtype=dtype, requires_grad=True)
    q, eta, gamma = inputs["q"], inputs["eta"], inputs["gamma"].float()
    options = (rank, value_dim, 2, 1e-3, "causal_max", 6)
    fused = tfn.ChunkReadout.apply(rows, max_norm, gamma, q, eta, table, *options)
    staged = tfn.Readout.apply(q, tfn.ReadoutMatrices.apply(rows, max_norm, gamma, *options), eta, table, False)
    assert torch.equal(fused, staged)
    wrt = [rows, max_norm, inputs["gamma"], q, eta]
    got, expected = _grads([fused], wrt), _grads([staged], wrt)
    for name, a, b in zip(["d_stats", "d_max_norm", "d_gamma", "dq"], got, expected):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
    _assert_close(got[4:], expected[4:], ["d_eta"], 1e-6)


def test_chunks_per_block_keeps_every_dense_program_busy(monkeypatch):
    """G on an H100 (132 SMs, 2 dense programs each) at H = 16, S = 64, the figures docs/performance.md quotes:
    at B = 1 1 at 2K (every row written), 3 at 4K, 7 at 8K, the cap 8 from 8.5K (132 chunks); 8 at B = 8, T = 4K;
    and wherever G > 1, B·H·⌈NC / G⌉ blocks still give each of the 264 programs one."""
    monkeypatch.setattr(tfn, "interpreted", lambda device: False)
    monkeypatch.setattr(tfn, "_multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    got = {(batch, seq_len): tfn.chunks_per_block(batch * 16, seq_len // 64, cuda)
           for batch, seq_len in [(1, 2048), (1, 4096), (1, 8192), (1, 8448), (1, 131072), (8, 4096)]}
    assert got == {(1, 2048): 1, (1, 4096): 3, (1, 8192): 7, (1, 8448): 8, (1, 131072): 8, (8, 4096): 8}
    for (batch, seq_len), every in got.items():
        assert every == 1 or batch * 16 * math.ceil(seq_len // 64 / every) >= 264


RECOMPUTE_CASES = [  # (case, every, norm, dtype)
    # 8 chunks in blocks of 3: blocks ending inside a sequence, sequences (one empty) starting inside a block, a last
    # block of one chunk
    (STAT_CASES[2], 3, "causal_max", torch.float64),
    (STAT_CASES[2], 3, "sequence_max", torch.float64),
    (STAT_CASES[2], 3, "none", torch.float16),
    (STAT_CASES[1], 5, "causal_max", torch.float64),  # 5 chunks, B = 2: one block per (b, h); r = 24, P = 33
    (STAT_CASES[3], 2, "causal_max", torch.float16),  # r = 64; the last chunk starts a sequence and a block
    ((1, 40, 1, 5, 80, 16, [0, 23, 40], True), 2, "none", torch.float64),  # P padded to 128
]


@pytest.mark.parametrize("case, every, norm, dtype", RECOMPUTE_CASES,
                         ids=lambda c: "B{}T{}H{}r{}P{}S{}-cu{}-mask{}".format(*c[:6], c[6] is not None, c[7])
                         if isinstance(c, tuple) else str(c))
def test_chunk_causal_recomputes_visible_statistics(case, every, norm, dtype):
    """`ChunkCausal` (the walk writes every `every`-th chunk's visible statistics, the dense kernels recompute the
    others from k and v) equals `ChunkReadout` after `VisibleStatistics` (every chunk's row written and read): y
    and every gradient, to rounding (the recomputation adds the chunks in the walk's order, its token steps may
    be shorter: bit for bit here where chunks are <= 16 tokens)."""
    batch, seq_len, heads, rank, value_dim, chunk, cu_seqlens, masked = case
    inputs = make_inputs(batch, seq_len, heads, rank, value_dim, dtype=dtype, requires_grad=True, seed=seq_len)
    mask = (torch.rand(batch, seq_len, generator=torch.Generator().manual_seed(1)) > 0.3) if masked else None
    weights = None if mask is None else mask.to(torch.float64 if dtype == torch.float64 else torch.float32)
    table, _ = _table_and_layout(seq_len, chunk, cu_seqlens)
    q, k, v, eta = inputs["q"], inputs["k"], inputs["v"], inputs["eta"]
    gamma = inputs["gamma"].to(work_dtype(dtype))
    norm_keys, sequence_max = tfn.NORM_KEYS[norm], norm == "sequence_max"
    options = (rank, value_dim, 2, 1e-3, norm, 6)
    got = tfn.ChunkCausal.apply(q, k, v, eta, gamma, weights, table, norm_keys, sequence_max, every, *options)
    visible, max_norm = tfn.VisibleStatistics.apply(k, v, weights, table, norm_keys, False, sequence_max)
    expected = tfn.ChunkReadout.apply(visible, max_norm, gamma, q, eta, table, *options)
    wrt = [inputs[name] for name in GRAD_NAMES]
    tol = 1e-12 if dtype == torch.float64 else 1e-3  # fp16 outputs: an ulp is 5e-4
    _assert_close([got, *_grads([got], wrt)], [expected, *_grads([expected], wrt)], ["y", *GRAD_NAMES], tol)


# ---------------------------------------------------------------------------------------------------------
# the whole operator: backend="triton" vs backend="torch"
# ---------------------------------------------------------------------------------------------------------

# (B, T, H, r, P, S, K): T not a multiple of S, r not a power of two, B·H > 1
OPERATOR_CASES = [
    (2, 37, 2, 5, 7, 16, 2),
    (1, 65, 2, 24, 33, 16, 1),
    (2, 12, 1, 5, 7, 1, 3),
    (1, 70, 1, 64, 20, 32, 2),
    (1, 150, 1, 5, 7, 100, 0),
]


def _compare_backends(inputs: dict, tol: float, **options) -> None:
    _assert_close(forward_and_grads(inputs, "triton", **options), forward_and_grads(inputs, "torch", **options),
                  ["y", *GRAD_NAMES], tol)


@pytest.mark.parametrize("case", OPERATOR_CASES, ids=lambda c: "B{}T{}H{}r{}P{}S{}K{}".format(*c))
def test_operator_matches_torch_fp64(case):
    batch, seq_len, heads, rank, value_dim, chunk, power = case
    inputs = make_inputs(batch, seq_len, heads, rank, value_dim, requires_grad=True, seed=seq_len)
    _compare_backends(inputs, FP64_TOL, chunk_size=chunk, power=power)


@pytest.mark.filterwarnings("ignore:norm=\"sequence_max\"")
@pytest.mark.parametrize("mode", ["chunk_causal", "prefix"])
@pytest.mark.parametrize("norm", ["causal_max", "sequence_max", "none"])
def test_operator_modes_norms_and_masks_fp64(mode, norm):
    inputs = make_inputs(2, 45, 1, 6, 5, requires_grad=True, seed=4)
    mask = torch.rand(2, 45, generator=torch.Generator().manual_seed(2)) > 0.3
    _compare_backends(inputs, FP64_TOL, chunk_size=8, power=2, mode=mode, norm=norm, mask=mask)


@pytest.mark.parametrize("mode", ["chunk_causal", "prefix"])
def test_packed_sequences_match_torch_and_isolated_runs(mode):
    inputs = make_inputs(1, 60, 2, 5, 7, requires_grad=True, seed=3)
    cu_seqlens = torch.tensor([0, 17, 17, 41, 60])
    mask = torch.rand(1, 60, generator=torch.Generator().manual_seed(5)) > 0.2
    options = dict(chunk_size=8, power=2, mode=mode, cu_seqlens=cu_seqlens)
    _compare_backends(inputs, FP64_TOL, mask=mask, **options)
    packed = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend="triton",
                 **options)
    bounds = cu_seqlens.tolist()
    options.pop("cu_seqlens")
    for start, end in zip(bounds[:-1], bounds[1:]):
        alone = ska(inputs["q"][:, start:end], inputs["k"][:, start:end], inputs["v"][:, start:end],
                    eta=inputs["eta"], gamma=inputs["gamma"], backend="triton", **options)
        assert rel_err(packed[:, start:end], alone) <= 1e-12


@pytest.mark.parametrize("case", [OPERATOR_CASES[0], OPERATOR_CASES[1], OPERATOR_CASES[3]],
                         ids=["r5", "r24", "r64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_operator_low_precision_as_accurate_as_torch(case, dtype):
    """fp32/fp16 inputs: against the fp64 result on the same (rounded) inputs, the Triton path's error is
    within 10x the torch path's own error, or below the dtype's floor (fp32 statistics either way). The fp32
    floor is 1e-4: the kernels whiten with an explicit L⁻¹ (W = L⁻¹ M L⁻ᵀ as products), which costs up to
    ~1e-4 on dη at r = 64, where the torch path's two triangular solves reach ~1e-5."""
    batch, seq_len, heads, rank, value_dim, chunk, power = case
    low = make_inputs(batch, seq_len, heads, rank, value_dim, dtype=dtype, requires_grad=True, seed=seq_len)
    exact = {n: x.detach().double().requires_grad_() for n, x in low.items()}
    options = dict(chunk_size=chunk, power=power)
    truth = forward_and_grads(exact, "torch", **options)
    triton_out = forward_and_grads(low, "triton", **options)
    torch_out = forward_and_grads(low, "torch", **options)
    floor = 1e-4 if dtype == torch.float32 else 2e-3
    for name, t, c, x in zip(["y", *GRAD_NAMES], triton_out, torch_out, truth):
        assert t.dtype == dtype and torch.isfinite(t).all(), name
        assert rel_err(t, x) <= max(10 * rel_err(c, x), floor), f"{name}: {rel_err(t, x):.1e} vs {rel_err(c, x):.1e}"


def test_bf16_on_cpu_is_widened_exactly():
    """The interpreter's bf16 tl.dot is wrong, so bf16 runs widened to fp32: equal to the torch path on
    the same bf16 inputs up to bf16 rounding of the outputs, gradients in bf16."""
    inputs = make_inputs(1, 70, 2, 24, 17, dtype=torch.bfloat16, requires_grad=True, seed=70)
    got, expected = (forward_and_grads(inputs, backend, chunk_size=32) for backend in ("triton", "torch"))
    _assert_close(got, expected, ["y", *GRAD_NAMES], 1e-2)


def test_prefix_max_norm_ties_split_like_torch():
    """Two chunks share the largest key: the per-sequence max splits its gradient over both (torch amax)."""
    inputs = make_inputs(1, 40, 1, 5, 3, seed=7)
    inputs["k"][0, 30] = inputs["k"][0, 3] = 10.0 * inputs["k"][0, 3]
    inputs = {n: x.requires_grad_() for n, x in inputs.items()}
    _compare_backends(inputs, FP64_TOL, chunk_size=8, power=1, mode="prefix")


@pytest.mark.slow
def test_rank_128_runs_the_dense_kernels():
    """r = 100 (padded to 128, the largest the dense kernels take): equal to the torch path in fp64 (slow: about
    4 minutes in the interpreter; the blocked Cholesky at 128 is in the default run, test_triton_dense.py)."""
    inputs = make_inputs(1, 33, 1, 100, 9, requires_grad=True, seed=1)
    _compare_backends(inputs, FP64_TOL, chunk_size=16)


def test_dense_algebra_falls_back_to_torch_above_rank_128(monkeypatch):
    inputs = make_inputs(1, 40, 1, 130, 5, requires_grad=True, seed=1)
    monkeypatch.setattr(tfn, "_warned_dense_fallback", False)
    with pytest.warns(UserWarning, match="r <= 128"):
        ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend="triton",
            chunk_size=16)
    _compare_backends(inputs, FP64_TOL, chunk_size=16)


# ---------------------------------------------------------------------------------------------------------
# properties of the Triton path: causality, no NaN on adversarial inputs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 16, 17, 50])
def test_triton_outputs_never_see_the_future(cut):
    inputs = make_inputs(1, 64, 2, 5, 7, dtype=torch.float32, seed=8)
    options = dict(eta=inputs["eta"], gamma=inputs["gamma"], chunk_size=16, backend="triton")
    base = ska(inputs["q"], inputs["k"], inputs["v"], **options)
    changed = {n: x.clone() for n, x in inputs.items()}
    for name in ("q", "k", "v"):
        changed[name][:, cut:] = 1e3 * torch.randn_like(changed[name][:, cut:])  # large norms: probes m too
    out = ska(changed["q"], changed["k"], changed["v"], **options)
    assert torch.equal(out[:, :cut], base[:, :cut])
    assert not torch.equal(out[:, cut:], base[:, cut:])


ADVERSARIAL_SEEDS = (0, 2, 3, 5, 6, 10, 14, 15, 20, 21)
"""fuzz_case seeds of the full (slow) run: 5, 15 and 20 (fp32) are norm="none" with keys up to 1e6, where every
jitter round fails in fp32."""
ADVERSARIAL_SEEDS_QUICK = (3, 5, 6, 10, 21, 26)
"""Each key kind, mostly in few chunks (the interpreter's cost is per chunk): zero keys (26), repeated (10,
norm "none"), zeros then large (6), spread norms (3), low rank (21, prefix mode), and 5, one of the three
fp32 cases where every jitter round fails (fp32 only); 18 chunks of the full run's 77."""


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # fp16 gradients overflowing to ±inf
@pytest.mark.parametrize("dtype, seeds", [
    pytest.param(torch.float32, ADVERSARIAL_SEEDS_QUICK, id="float32"),
    pytest.param(torch.float16, tuple(s for s in ADVERSARIAL_SEEDS_QUICK if s != 5), id="float16"),
    pytest.param(torch.float32, ADVERSARIAL_SEEDS, id="float32-all", marks=pytest.mark.slow),
    pytest.param(torch.float16, ADVERSARIAL_SEEDS, id="float16-all", marks=pytest.mark.slow),
])
def test_adversarial_inputs_stay_finite(dtype, seeds):
    """Zero, repeated, low-rank and extreme-norm keys (test_robustness's generator): no NaN in outputs or
    gradients (an fp16 gradient beyond fp16's range may be ±inf, as fp16 overflow dictates)."""
    for seed in seeds:
        inputs, options = fuzz_case(seed, dtype)
        y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend="triton",
                **options)
        assert y.dtype == dtype and torch.isfinite(y).all(), (seed, options)
        grads = torch.autograd.grad(y.float().sum(), [inputs[n] for n in GRAD_NAMES])
        assert not any(torch.isnan(g).any() for g in grads), (seed, options)


# ---------------------------------------------------------------------------------------------------------
# runtime: interpreter on CPU without TRITON_INTERPRET, nothing leaks into compiled Triton
# ---------------------------------------------------------------------------------------------------------


def test_cpu_runs_interpreted_copy_and_restores_triton_language():
    compiled_sum, compiled_load = tl.sum, tl.core.load
    assert isinstance(compiled_sum, JITFunction)  # triton was imported without TRITON_INTERPRET
    assert runtime.interpreted(torch.device("cpu"))
    assert runtime.kernels_for(torch.device("cpu")) is not runtime._load(False)
    assert isinstance(runtime._load(False).readout_fwd_kernel, JITFunction)
    inputs = make_inputs(1, 20, 1, 5, 3)
    ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend="triton",
        chunk_size=8)
    assert tl.sum is compiled_sum and tl.core.load is compiled_load


def test_auto_backend_uses_torch_on_cpu(monkeypatch):
    import echo_megatron.ops.triton as triton_ops

    def refuse(*args, **kwargs):
        raise AssertionError("auto must not pick Triton for CPU tensors")

    monkeypatch.setattr(triton_ops, "ska_triton", refuse)
    inputs = make_inputs(1, 20, 1, 5, 3)
    ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], backend="auto")


H100_SHARED_MEMORY = 227 * 1024  # bytes per thread block on sm_90


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:norm=\"sequence_max\"")
def test_every_kernel_compiles_for_h100():
    """Every specialisation launched by forward+backward calls — the default H100 shape (r = 64, P = 128,
    S = 64, bf16) and fp32/fp16/fp64 calls covering masks, both modes, all norms, packed sequences and
    K ∈ {0, 1, 2, 3} — compiles for sm_90 with Triton's bundled ptxas and fits an H100 SM's register
    file and shared memory (slow: about a minute without Triton's cache)."""
    from echo_megatron.ops.triton.aot import compile_launches

    def record(calls):
        with runtime.recording(run=False) as launches:  # the specialisations a GPU would compile
            for dtype, shape, options in calls:
                inputs = make_inputs(*shape, dtype=dtype, requires_grad=True)
                y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"],
                        backend="triton", **options)
                y.float().sum().backward()
        return launches

    mask = torch.rand(2, 40, generator=torch.Generator().manual_seed(0)) > 0.3
    # bf16 is recorded with fp16 data (same code path; the interpreter cannot run bf16) and compiled as bf16
    h100_default = record([(torch.float16, (1, 128, 1, 64, 128), dict(chunk_size=64, power=2))])
    report = compile_launches(h100_default, arch=90, fp16_as="bf16")
    report += compile_launches(record([
        (torch.float32, (2, 40, 2, 24, 33), dict(chunk_size=16, power=1, mode="prefix", norm="sequence_max",
                                                 mask=mask)),
        (torch.float16, (1, 40, 2, 5, 7), dict(chunk_size=8, power=0, cu_seqlens=torch.tensor([0, 10, 40]))),
        (torch.float32, (2, 40, 2, 5, 7), dict(chunk_size=8, power=3, norm="none", mask=mask)),
        (torch.float64, (1, 40, 2, 5, 7), dict(chunk_size=8, power=3)),
    ]), arch=90)
    assert {r.name for r in report} == {"chunk_stats_fwd_kernel", "chunk_stats_bwd_kernel", "segment_scan_kernel",
                                        "readout_matrix_fwd_kernel", "readout_matrix_bwd_kernel",
                                        "readout_fwd_kernel", "readout_bwd_kernel"}
    assert len(report) >= 30
    for r in report:
        assert 0 < r.registers <= 255 and r.shared_bytes <= H100_SHARED_MEMORY, r
