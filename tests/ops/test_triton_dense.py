"""The dense building blocks of `ops/triton/dense.py`, each alone against torch (Triton interpreter), and the
statistics step its chunk_causal kernels recompute with (`_advance_visible`, from `kernels.py`).

Each test launches a small probe kernel that calls one building block on awkward sizes (logical sizes
that are not multiples of the tiles, padding, transposed operands) and compares with torch in fp64 (to
round-off) and fp32 (products with tf32x3: fp32-level accuracy). The kernels that chain them are compared
with the torch path in `test_triton.py`.
"""

from __future__ import annotations

import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from echo_megatron.ops.triton import runtime

CPU = torch.device("cpu")
dense = runtime.kernels_for(CPU)  # the interpreted kernels' namespace (kernels.py + dense.py)


def _run(probe, *args, **constexprs) -> None:
    runtime.launch(InterpretedFunction(probe), (1,), *args, **constexprs)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float64 else "tf32x3"


def _tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 2e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _probe_product(A, sa_r, sa_c, B, sb_r, sb_c, D, OUT, n_rows, n_cols, n_inner, alpha,
                   HAS_D: tl.constexpr, LOWER_HALF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, TILE: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    dense._product(A, sa_r, sa_c, B, sb_r, sb_c, OUT, n_cols, 1, D, n_cols, 1, n_rows, n_cols, n_inner, alpha,
                   HAS_D, LOWER_HALF, BM, BN, BK, TILE, ACC, DOT_PRECISION)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("transpose_a,transpose_b,has_d,lower_half", [
    (False, False, False, False), (True, False, True, False), (False, True, False, True), (True, True, True, True)])
def test_product_matches_torch(dtype, transpose_a, transpose_b, has_d, lower_half):
    gen = torch.Generator().manual_seed(0)
    n_rows, n_cols, n_inner = 20, 37, 5
    a = torch.randn(n_inner, n_rows, generator=gen, dtype=dtype) if transpose_a else torch.randn(
        n_rows, n_inner, generator=gen, dtype=dtype)
    b = torch.randn(n_cols, n_inner, generator=gen, dtype=dtype) if transpose_b else torch.randn(
        n_inner, n_cols, generator=gen, dtype=dtype)
    d = torch.randn(n_rows, n_cols, generator=gen, dtype=dtype)
    out = torch.full((n_rows, n_cols), float("nan"), dtype=dtype)
    sa = (1, n_rows) if transpose_a else (n_inner, 1)
    sb = (1, n_inner) if transpose_b else (n_cols, 1)
    _run(_probe_product, a, *sa, b, *sb, d, out, n_rows, n_cols, n_inner, 0.75, HAS_D=has_d, LOWER_HALF=lower_half,
         BM=32, BN=64, BK=16, TILE=16, ACC=_acc(dtype), DOT_PRECISION=_precision(dtype))
    expected = 0.75 * (a.mT if transpose_a else a) @ (b.mT if transpose_b else b) + (d if has_d else 0)
    if lower_half:  # strict lower triangle and half the diagonal
        half_diagonal = torch.zeros_like(expected)
        half_diagonal.diagonal().copy_(0.5 * expected.diagonal())
        expected = expected.tril(-1) + half_diagonal
    assert _rel(out, expected) <= _tol(dtype)


def _probe_cholesky_block(A, L, X, BAD, n, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    a = tl.load(A + rows[:, None] * BLOCK + rows[None, :])
    lower, inverse, bad = dense._cholesky_block(a, n, BLOCK)
    tl.store(L + rows[:, None] * BLOCK + rows[None, :], lower)
    tl.store(X + rows[:, None] * BLOCK + rows[None, :], inverse)
    tl.store(BAD, bad)


def _spd(n: int, dtype: torch.dtype, seed: int, tokens: int | None = None) -> torch.Tensor:
    z = torch.randn(tokens or 3 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z.mT @ z + 1e-3 * torch.eye(n, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cholesky_block_matches_torch_and_pads_with_the_identity(dtype):
    n = 11
    a = torch.full((16, 16), float("nan"), dtype=dtype)  # entries at or past n must not be read
    a[:n, :n] = _spd(n, dtype, seed=1)
    lower, inverse, bad = torch.empty_like(a), torch.empty_like(a), torch.zeros((), dtype=torch.int32)
    _run(_probe_cholesky_block, a, lower, inverse, bad, n, BLOCK=16)
    expected = torch.linalg.cholesky(a[:n, :n].double())
    assert bad.item() == 0
    assert _rel(lower[:n, :n].double(), expected) <= _tol(dtype)
    assert _rel(inverse[:n, :n].double(), torch.linalg.inv(expected)) <= 50 * _tol(dtype)
    assert torch.equal(lower[n:, n:], torch.eye(16 - n, dtype=dtype)) and not lower[n:, :n].any()

    a[:n, :n] = -a[:n, :n]  # not positive definite: every pivot fails
    _run(_probe_cholesky_block, a, lower, inverse, bad, n, BLOCK=16)
    assert bad.item() > 0


def _probe_blocked(G, shift, LOWER, X, DIAG_INV, BAD, n, BR: tl.constexpr, BLOCK: tl.constexpr,
                   ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    bad = dense._cholesky_inverse_blocked(G, shift, LOWER, X, DIAG_INV, n, BR, BLOCK, ACC, DOT_PRECISION)
    tl.store(BAD, bad)


@pytest.mark.parametrize("n,block_r,dtype", [
    (5, 16, torch.float64), (5, 16, torch.float32), (37, 64, torch.float64), (37, 64, torch.float32),
    (70, 128, torch.float64), pytest.param(70, 128, torch.float32, marks=pytest.mark.slow)])
def test_blocked_cholesky_inverse_matches_torch(n, block_r, dtype):
    """X = L⁻¹ of sym(G) + shift·I (G not symmetric to the last bit, as a sum of products is not), L in the
    workspace; over several 16-wide block columns and with a partial last block."""
    gram = _spd(n, dtype, seed=n)
    gram = gram + 1e-3 * torch.randn(n, n, generator=torch.Generator().manual_seed(9), dtype=dtype).tril(-1)
    shift = 0.25
    lower = torch.full((block_r, block_r), float("nan"), dtype=dtype)
    x = torch.full((n, n), float("nan"), dtype=dtype)
    diag_inv = torch.full((block_r, 16), float("nan"), dtype=dtype)
    bad = torch.full((), -1, dtype=torch.int32)
    _run(_probe_blocked, gram, shift, lower, x, diag_inv, bad, n, BR=block_r, BLOCK=16, ACC=_acc(dtype),
         DOT_PRECISION=_precision(dtype))
    g_tilde = 0.5 * (gram + gram.mT).double() + shift * torch.eye(n, dtype=torch.float64)
    expected = torch.linalg.cholesky(g_tilde)
    assert bad.item() == 0
    assert _rel(lower[:n, :n].double(), expected) <= 10 * _tol(dtype)
    assert _rel(x.double(), torch.linalg.inv(expected)) <= 100 * _tol(dtype)

    gram[n // 2, n // 2] = -1e3  # one failing pivot is counted
    _run(_probe_blocked, gram, shift, lower, x, diag_inv, bad, n, BR=block_r, BLOCK=16, ACC=_acc(dtype),
         DOT_PRECISION=_precision(dtype))
    assert bad.item() > 0


def _probe_small_blocks(A, VEC, U, OUT, FILLED, SCALARS, n, BR: tl.constexpr, TILE: tl.constexpr,
                        ACC: tl.constexpr):
    tl.store(SCALARS + 2, dense._power_step(A, 1, n, VEC, U, n, BR, TILE, ACC))  # Aᵀ x / ‖Aᵀ x‖
    dense._transpose_add(A, n, OUT, n, n, 2.0, -0.5, BR, TILE)
    dense._fill(FILLED, n, n - 1, n, 7.0, BR, BR, TILE)
    tl.store(SCALARS, dense._inner(A, n, OUT, n, n, BR, TILE, ACC))
    tl.store(SCALARS + 1, dense._trace(A, n, n, BR, ACC))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_power_step_transpose_add_inner_trace_fill_match_torch(dtype):
    n, block_r = 37, 64
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(n, n, generator=gen, dtype=dtype)
    vec = torch.zeros(block_r, dtype=dtype)
    vec[:n] = torch.randn(n, generator=gen, dtype=dtype)
    u = torch.full((block_r,), float("nan"), dtype=dtype)
    out = torch.full((n, n), float("nan"), dtype=dtype)
    filled = torch.zeros(n, n, dtype=dtype)
    scalars = torch.zeros(3, dtype=dtype)
    _run(_probe_small_blocks, a, vec, u, out, filled, scalars, n, BR=block_r, TILE=32, ACC=_acc(dtype))
    expected_u = a.mT @ vec[:n]
    assert _rel(u[:n], expected_u / expected_u.norm()) <= _tol(dtype) and not u[n:].any()
    assert _rel(scalars[2], expected_u.norm()) <= _tol(dtype)
    expected_out = 2.0 * a - 0.5 * a.mT
    assert _rel(out, expected_out) <= _tol(dtype)
    assert (filled[:n - 1] == 7.0).all() and not filled[n - 1].any()
    assert _rel(scalars[0], (a * expected_out).sum()) <= _tol(dtype)
    assert _rel(scalars[1], a.trace()) <= _tol(dtype)


def _probe_spectral_norm(A, VEC, SIGMA, START, n, ITERS: tl.constexpr, BR: tl.constexpr, TILE: tl.constexpr,
                         ACC: tl.constexpr):
    tl.store(SIGMA, dense._spectral_norm(A, n, tl.load(START), VEC, ITERS, BR, TILE, ACC))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,block_r,iters", [(5, 16, 6), (37, 64, 6), (37, 64, 0), (70, 128, 6)])
@pytest.mark.parametrize("zero", [False, True], ids=["random", "zero"])
def test_spectral_norm_matches_torch(dtype, n, block_r, iters, zero):
    """`_spectral_norm` (W in registers up to width 64, in tiles through `_power_step` at 128) equals the torch
    path's power iteration (`chunked.spectral_norm_estimate`, SPEC §2 step 4); a zero matrix gives σ = 0. The
    padding past n is NaN, so reading it would show."""
    from echo_megatron.ops.chunked import spectral_norm_estimate

    gen = torch.Generator().manual_seed(6)
    a = torch.zeros(n, n, dtype=dtype) if zero else torch.randn(n, n, generator=gen, dtype=dtype) / n ** 0.5
    padded = torch.full((block_r, block_r), float("nan"), dtype=dtype)
    padded[:n, :n] = a
    vec = torch.full((2 * block_r,), float("nan"), dtype=dtype)
    sigma = torch.full((1,), float("nan"), dtype=dtype)
    start = torch.full((1,), n ** -0.5, dtype=dtype)  # 1/√n in the work dtype, as the kernel's PARAMS[3]
    _run(_probe_spectral_norm, padded, vec, sigma, start, n, ITERS=iters, BR=block_r, TILE=16, ACC=_acc(dtype))
    expected = spectral_norm_estimate(a[None], iters)
    assert (sigma == 0).all() if zero else _rel(sigma, expected) <= _tol(dtype)


def _probe_advance_visible(SRC, DST, K, V, W, fresh, start, end, seg_begin, R, P, HAS_MASK: tl.constexpr,
                           BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    dense._advance_visible(SRC, DST, fresh != 0, K, V, W, start, end, seg_begin, R, P, R, 1, P, 1, 1, HAS_MASK, BS,
                           BR, BP, BN, ACC, DOT_PRECISION)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seg_begin,masked,in_place,fresh", [
    (0, False, False, False),  # the lag pair into the chunk counts
    (6, True, True, False),  # the chunk starts its sequence: no lag pair into it; masked tokens and pairs add nothing
    (3, True, False, False),
    (0, False, True, True),  # the next chunk starts a sequence: zeros
])
def test_advance_visible_adds_one_chunks_statistics(dtype, seg_begin, masked, in_place, fresh):
    """`_advance_visible` (kernels.py; the chunk_causal dense kernels' recomputation, `_visible_row`): the visible
    statistics row after tokens [start, end) = the row before + G = Σ z̃ z̃ᵀ, M = Σ z̃_t z̃_{t-1}ᵀ (t - 1 >=
    seg_begin), C = Σ ṽ z̃ᵀ over them (z̃ = w·z, ṽ = w·v), as the flat row G | M | C. r = 5, P = 7 in 16-wide
    blocks, 13 tokens in steps of 8, 8 columns at a time."""
    rank, value_dim, start, end = 5, 7, 6, 19
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(23, rank, generator=gen, dtype=dtype)
    values = torch.randn(23, value_dim, generator=gen, dtype=dtype)
    weights = (torch.rand(23, generator=gen) > 0.3).to(dtype) if masked else torch.ones(23, dtype=dtype)
    width = 2 * rank * rank + value_dim * rank
    before = torch.randn(width, generator=gen, dtype=dtype)
    src = before.clone()
    dst = src if in_place else torch.full((width,), float("nan"), dtype=dtype)
    _run(_probe_advance_visible, src, dst, keys, values, weights, int(fresh), start, end, seg_begin, rank, value_dim,
         HAS_MASK=masked, BS=8, BR=16, BP=16, BN=8, ACC=_acc(dtype), DOT_PRECISION=_precision(dtype))
    if fresh:
        assert torch.equal(dst, torch.zeros(width, dtype=dtype))
        return
    z, v = keys * weights[:, None], values * weights[:, None]
    tokens = torch.arange(start, end)
    paired = tokens[tokens - 1 >= seg_begin]
    gram = z[tokens].mT @ z[tokens]
    lag = z[paired].mT @ z[paired - 1]
    cross = v[tokens].mT @ z[tokens]
    assert _rel(dst, before + torch.cat([gram.flatten(), lag.flatten(), cross.flatten()])) <= _tol(dtype)
