"""Triton kernels of chunked SKA (SPEC §2–3), forward and backward.

Do not import this module directly: `echo_megatron.ops.triton.runtime.kernels_for(device)` loads it
compiled (CUDA tensors) or under the Triton interpreter (CPU tensors). Conventions:

* grids are (chunk or slot, batch·head) — one program per (chunk, B·H) — except the scan and the walks
  (statistics and scan in one pass), which go through the chunks of each sequence in order, one program
  per (B·H, column tile);
* tokens are read in place from [B, T, H, ·] tensors through strides and a chunk table
  (CHUNK_START/CHUNK_END: token range of each chunk; SEG_BEGIN/SEG_END: token range of its sequence);
* statistics are flat rows of width D = 2r² + P·r holding G (r×r), M (r×r), C (P×r), row-major, in
  the work dtype ACC (fp32; fp64 for fp64 inputs); key-norm maxima live in separate [B·H, N] rows;
* r and P are padded to BR, BP (powers of two ≥ 16, so that `tl.dot` applies); padded entries are
  masked on load and never stored;
* fp16/bf16 tokens enter `tl.dot` in their own dtype (their products are exact in fp32); fp32 operands
  use DOT_PRECISION ("ieee": no tf32 rounding, the torch path is exact fp32);
* PARAMS holds the floating options in ACC (so that fp64 runs are not rounded through fp32):
  [eps, first jitter, norm floor, 1/√r].
"""

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b accumulated in ACC."""
    return tl.dot(a, b, out_dtype=ACC, input_precision=DOT_PRECISION)


@triton.jit
def _split_tf32(b, SPLIT: tl.constexpr):
    """(hi, lo) with hi = b truncated to tf32's 10 mantissa bits and lo = b - hi (exact) if SPLIT; else (b, 0)."""
    if SPLIT:
        hi = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        lo = b - hi
    else:
        hi = b
        lo = tl.zeros(b.shape, dtype=b.dtype)
    return hi, lo


@triton.jit
def _mm_split(a, b_hi, b_lo, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b for b = b_hi + b_lo from `_split_tf32`. With SPLIT, a must be exact in tf32 (fp16/bf16 data
    in fp32): two tf32 MMAs then give fp32 accuracy (a·b_hi exact, a·b_lo to 2^-11 of a 2^-11 term),
    one fewer than tf32x3 and without splitting a."""
    if SPLIT:
        out = tl.dot(a, b_hi, out_dtype=ACC, input_precision="tf32") + tl.dot(a, b_lo, out_dtype=ACC,
                                                                               input_precision="tf32")
    else:
        out = _mm(a, b_hi, ACC, DOT_PRECISION)
    return out


@triton.jit
def _total(x):
    """Sum of all entries of a 2-D block."""
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _load_matrix(ptr, n_rows, n_cols, BROWS: tl.constexpr, BCOLS: tl.constexpr):
    """Row-major [n_rows, n_cols] block at ptr, zero-padded to [BROWS, BCOLS]."""
    rows = tl.arange(0, BROWS)
    cols = tl.arange(0, BCOLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_matrix(ptr, x, n_rows, n_cols, BROWS: tl.constexpr, BCOLS: tl.constexpr):
    """Store the leading [n_rows, n_cols] block of x row-major at ptr."""
    rows = tl.arange(0, BROWS)
    cols = tl.arange(0, BCOLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * n_cols + cols[None, :], x, mask=mask)


@triton.jit
def _load_tokens(base, t, t_ok, stride_t, width, stride_d, BW: tl.constexpr):
    """Rows t (where t_ok) of a [T, width] token matrix: [BS, BW] in its own dtype, zeros elsewhere."""
    d = tl.arange(0, BW)
    return tl.load(base + t[:, None] * stride_t + d[None, :] * stride_d, mask=t_ok[:, None] & (d[None, :] < width),
                   other=0.0)


@triton.jit
def _store_tokens(base, x, t, t_ok, stride_t, width, stride_d, BW: tl.constexpr):
    """Store x [BS, BW] into rows t (where t_ok) of a [T, width] token matrix, cast to its dtype."""
    d = tl.arange(0, BW)
    tl.store(base + t[:, None] * stride_t + d[None, :] * stride_d, x.to(base.dtype.element_ty),
             mask=t_ok[:, None] & (d[None, :] < width))


@triton.jit
def _load_weights(base, t, t_ok, stride_t, HAS_MASK: tl.constexpr, ACC: tl.constexpr):
    """Token weights w_t ∈ {0, 1} (1 without a mask), 0 where not t_ok: [BS] in ACC."""
    if HAS_MASK:
        w = tl.load(base + t * stride_t, mask=t_ok, other=0.0).to(ACC)
    else:
        w = t_ok.to(ACC)
    return w


@triton.jit
def _row_norms(z, w, WEIGHTED: tl.constexpr):
    """‖z_t‖ of the rows of z [BS, BR] (ACC), times w_t if WEIGHTED: [BS]."""
    norms = tl.sqrt(tl.sum(z * z, axis=1))
    if WEIGHTED:
        norms = norms * w
    return norms


@triton.jit
def _bits(BS: tl.constexpr):
    """1 << i for i < BS <= 32: one bit of an int32 word per token of a tile."""
    return tl.full([BS], 1, tl.int32) << tl.arange(0, BS)


@triton.jit
def _token_norms(k_base, w_base, t, end, stride_kt, stride_kd, stride_wt, R, HAS_MASK: tl.constexpr,
                 WEIGHTED: tl.constexpr, BR: tl.constexpr, ACC: tl.constexpr):
    """`_row_norms` of the keys of tokens t (0 from `end` on): [BS]."""
    ok = t < end
    z = _load_tokens(k_base, t, ok, stride_kt, R, stride_kd, BR).to(ACC)
    return _row_norms(z, _load_weights(w_base, t, ok, stride_wt, HAS_MASK, ACC), WEIGHTED)


@triton.jit
def _chunk_program(H, CHUNK_START, CHUNK_END):
    """(chunk c, batch·head bh, b, h, first token, one past the last token) of a token-level program;
    bh and the token range in int64, so that offsets past 2³¹ elements (long packed batches) are safe."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    return c, bh, bh // H, bh % H, tl.load(CHUNK_START + c).to(tl.int64), tl.load(CHUNK_END + c).to(tl.int64)


# ---------------------------------------------------------------------------------------------
# (a) per-chunk statistics
# ---------------------------------------------------------------------------------------------


@triton.jit
def _chunk_stats_columns(k_base, v_base, w_base, start, end, seg_begin, cols, R, P, stride_kt, stride_kd,
                         stride_vt, stride_vd, stride_wt, HAS_MASK: tl.constexpr, NORM_KEYS: tl.constexpr,
                         BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Columns `cols` [BN] of one chunk's G = Σ z̃ z̃ᵀ [BR, BN], M = Σ z̃_t z̃_{t-1}ᵀ [BR, BN] (the lag pair into the
    chunk included) and C = Σ ṽ z̃ᵀ [BP, BN] over its tokens start <= t < end (z̃ = w·z, ṽ = w·v), and its max key
    norm (NORM_KEYS: 0 none, 0 returned; 1 max ‖z̃‖, causal_max; 2 max ‖z‖ over every token, sequence_max)."""
    gram = tl.zeros([BR, BN], dtype=ACC)
    lag = tl.zeros([BR, BN], dtype=ACC)
    cross = tl.zeros([BP, BN], dtype=ACC)
    max_norm = tl.zeros([BS], dtype=ACC)
    for t0 in range(start, end, BS):
        t = t0 + tl.arange(0, BS)
        ok = t < end
        prev_ok = ok & (t - 1 >= seg_begin)
        z = _load_tokens(k_base, t, ok, stride_kt, R, stride_kd, BR)
        z_cols = tl.load(k_base + t[:, None] * stride_kt + cols[None, :] * stride_kd,
                         mask=ok[:, None] & (cols[None, :] < R), other=0.0)
        z_prev = tl.load(k_base + (t - 1)[:, None] * stride_kt + cols[None, :] * stride_kd,
                         mask=prev_ok[:, None] & (cols[None, :] < R), other=0.0)
        val = _load_tokens(v_base, t, ok, stride_vt, P, stride_vd, BP)
        w = _load_weights(w_base, t, ok, stride_wt, HAS_MASK, ACC)
        if HAS_MASK:
            z_vis = (z * w[:, None]).to(z.dtype)
            z_cols = (z_cols * w[:, None]).to(z.dtype)
            w_prev = _load_weights(w_base, t - 1, prev_ok, stride_wt, HAS_MASK, ACC)
            z_prev = (z_prev * w_prev[:, None]).to(z.dtype)
        else:
            z_vis = z
        gram += _mm(tl.trans(z_vis), z_cols, ACC, DOT_PRECISION)
        lag += _mm(tl.trans(z_vis), z_prev, ACC, DOT_PRECISION)
        cross += _mm(tl.trans(val), z_cols, ACC, DOT_PRECISION)
        if NORM_KEYS != 0:
            max_norm = tl.maximum(max_norm, _row_norms(z.to(ACC), w, HAS_MASK and NORM_KEYS == 1))
    return gram, lag, cross, tl.max(max_norm, axis=0)


@triton.jit
def _store_row_columns(row, gram, lag, cross, cols, R, P, BR: tl.constexpr, BP: tl.constexpr):
    """Store columns `cols` of G, M [BR, BN] and C [BP, BN] into the flat statistics row at `row`."""
    rr = tl.arange(0, BR)
    pp = tl.arange(0, BP)
    col_ok = cols[None, :] < R
    tl.store(row + rr[:, None] * R + cols[None, :], gram, mask=(rr[:, None] < R) & col_ok)
    tl.store(row + R * R + rr[:, None] * R + cols[None, :], lag, mask=(rr[:, None] < R) & col_ok)
    tl.store(row + 2 * R * R + pp[:, None] * R + cols[None, :], cross, mask=(pp[:, None] < P) & col_ok)


@triton.jit
def chunk_stats_fwd_kernel(
    K, V, WMASK, STATS, MNORM, CHUNK_START, CHUNK_END, SEG_BEGIN,
    H, NC, R, P,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_wb, stride_wt,
    HAS_MASK: tl.constexpr, NORM_KEYS: tl.constexpr,
    BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Columns n of chunk j's (G_j, M_j, C_j) and its max key norm (`_chunk_stats_columns`) into STATS[bh, j, :D]
    and MNORM[bh, j]. Each program owns BN columns (accumulators [BR, BN], [BR, BN], [BP, BN], so r = 128 fits
    on chip). Grid (NC, B·H, ⌈r / BN⌉).
    """
    c, bh, b, h, start, end = _chunk_program(H, CHUNK_START, CHUNK_END)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    gram, lag, cross, chunk_max = _chunk_stats_columns(
        K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, WMASK + b * stride_wb, start, end,
        tl.load(SEG_BEGIN + c), cols, R, P, stride_kt, stride_kd, stride_vt, stride_vd, stride_wt, HAS_MASK,
        NORM_KEYS, BS, BR, BP, BN, ACC, DOT_PRECISION)
    _store_row_columns(STATS + (bh * NC + c) * (2 * R * R + P * R), gram, lag, cross, cols, R, P, BR, BP)
    if tl.program_id(2) == 0:
        tl.store(MNORM + bh * NC + c, chunk_max)


@triton.jit
def _load_columns(ptr, n_rows, n_cols, cols, BROWS: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Columns `cols` of a row-major [n_rows, n_cols] matrix: [BROWS, BN]; with TRANSPOSED, the columns of
    its transpose (rows `cols` of the matrix, [n_cols, n_rows] view), zero-padded."""
    rows = tl.arange(0, BROWS)
    if TRANSPOSED:
        mask = (rows[:, None] < n_cols) & (cols[None, :] < n_rows)
        x = tl.load(ptr + cols[None, :] * n_cols + rows[:, None], mask=mask, other=0.0)
    else:
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    return x


@triton.jit
def _scratch_tile(which: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """Offsets of tile `which` (`_grad_tile`) in a program's scratch of the five: [4·BR + BP, BN] row-major."""
    if which == 3:
        rows = tl.arange(0, BP)
    else:
        rows = tl.arange(0, BR)
    return which * BR * BN + (which == 4) * (BP - BR) * BN + rows[:, None] * BN + tl.arange(0, BN)[None, :]


@triton.jit
def _grad_tile(src, which: tl.constexpr, cols, R, P, IN_ROW: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
               BN: tl.constexpr):
    """Tile `which` of what columns `cols` of dk and dv need of a gradient (dG, dM, dC) of chunk statistics:
    0 (dG + dGᵀ)[:, cols], 1 dM[:, cols], 2 dMᵀ[:, cols] [BR, BN], 3 dC[:, cols] [BP, BN], 4 dCᵀ[:, cols] [BR, BN];
    read from the flat row at src (IN_ROW) or from a program's scratch of the five tiles (`_scratch_tile`)."""
    if not IN_ROW:
        tile = tl.load(src + _scratch_tile(which, BR, BP, BN))
    elif which == 0:
        tile = _load_columns(src, R, R, cols, BR, False) + _load_columns(src, R, R, cols, BR, True)
    elif which == 1:
        tile = _load_columns(src + R * R, R, R, cols, BR, False)
    elif which == 2:
        tile = _load_columns(src + R * R, R, R, cols, BR, True)
    elif which == 3:
        tile = _load_columns(src + 2 * R * R, P, R, cols, BP, False)
    else:
        tile = _load_columns(src + 2 * R * R, P, R, cols, BR, True)
    return tile


@triton.jit
def _boundary(k_base, w_base, t, ok, d_lag, R, stride_kt, stride_kd, stride_wt, HAS_MASK: tl.constexpr,
              BR: tl.constexpr, ACC: tl.constexpr):
    """z̃_tᵀ dM [BN] (0 unless ok) for dM[:, cols] [BR, BN] of the chunk whose first lag pair is (z_t, z_{t-1}):
    what that pair adds to row t-1 of dz̃, the last token of the chunk before."""
    rr = tl.arange(0, BR)
    z = tl.load(k_base + t * stride_kt + rr * stride_kd, mask=ok & (rr < R), other=0.0).to(ACC)
    if HAS_MASK:
        z = z * tl.load(w_base + t * stride_wt, mask=ok, other=0.0).to(ACC)
    return tl.sum(z[:, None] * d_lag, axis=0)


@triton.jit
def _grad_product(a, grads, which: tl.constexpr, held_hi, held_lo, cols, R, P, IN_ROW: tl.constexpr,
                  BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  HALF_TOKENS: tl.constexpr):
    """a @ `_grad_tile` `which` of grads: the tile held, split, when read from a row (IN_ROW: row-layout reads cost
    registers at every step), else read from the program's scratch now."""
    if IN_ROW:
        out = _mm_split(a, held_hi, held_lo, ACC, DOT_PRECISION, HALF_TOKENS)
    else:
        tile_hi, tile_lo = _split_tf32(_grad_tile(grads, which, cols, R, P, False, BR, BP, BN), HALF_TOKENS)
        out = _mm_split(a, tile_hi, tile_lo, ACC, DOT_PRECISION, HALF_TOKENS)
    return out


@triton.jit
def _chunk_stats_grad(k_base, v_base, w_base, dk_base, dv_base, start, end, seg_begin, col0, grads,
                      IN_ROW: tl.constexpr, boundary, d_chunk_max, R, P,
                      stride_kt, stride_kd, stride_vt, stride_vd, stride_wt, stride_dkt, stride_dkd, stride_dvt,
                      stride_dvd, HAS_MASK: tl.constexpr, NORM_KEYS: tl.constexpr, BS: tl.constexpr,
                      TILES: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, HALF_TOKENS: tl.constexpr):
    """Store columns col0 … col0 + BN - 1 of dk and dv for the tokens start <= t < end of one chunk, from the
    gradient of its statistics (`_grad_tile`s of grads, IN_ROW or not), the next chunk's first lag pair's share of
    its last row (`_boundary`) and the gradient of its max key norm, split evenly over the tokens attaining it
    (torch's amax rule). Rows of dL/dz̃: z̃ (dG + dGᵀ) + ṽ dC + z̃_{t-1} dMᵀ + z̃_{t+1} dM; dṽ = z̃ dCᵀ. The tiles
    of dk are held through the token loop when read from a row (IN_ROW), else read from the scratch at every
    step (`_grad_product`: held, with the walk's state, they spill)."""
    weighted_norms: tl.constexpr = HAS_MASK and NORM_KEYS == 1
    cols = col0 + tl.arange(0, BN)
    if col0 < R:
        if IN_ROW:
            gram_hi, gram_lo = _split_tf32(_grad_tile(grads, 0, cols, R, P, True, BR, BP, BN), HALF_TOKENS)
            lag_hi, lag_lo = _split_tf32(_grad_tile(grads, 1, cols, R, P, True, BR, BP, BN), HALF_TOKENS)
            lag_t_hi, lag_t_lo = _split_tf32(_grad_tile(grads, 2, cols, R, P, True, BR, BP, BN), HALF_TOKENS)
            cross_hi, cross_lo = _split_tf32(_grad_tile(grads, 3, cols, R, P, True, BR, BP, BN), HALF_TOKENS)
        else:  # read at every step (`_grad_product` ignores these)
            gram_hi, gram_lo, lag_hi, lag_lo, lag_t_hi, lag_t_lo, cross_hi, cross_lo = (grads, grads, grads, grads,
                                                                                        grads, grads, grads, grads)
        if NORM_KEYS != 0:
            # the chunk max, then the tokens attaining it as one bit word per token tile (`hits`), so that the
            # loop below needs no norm of its own: norms recomputed there could differ in the last bit
            # (there `z` also feeds tl.dot) and drop the max's gradient
            best = tl.zeros([BS], dtype=ACC)
            for t0 in range(start, end, BS):
                best = tl.maximum(best, _token_norms(k_base, w_base, t0 + tl.arange(0, BS), end, stride_kt,
                                                     stride_kd, stride_wt, R, HAS_MASK, weighted_norms, BR, ACC))
            chunk_max = tl.max(best, axis=0)
            tiles = tl.arange(0, TILES)
            hits = tl.zeros([TILES], dtype=tl.int32)
            ties = tl.zeros([], dtype=ACC)
            for t0 in range(start, end, BS):
                t = t0 + tl.arange(0, BS)
                norms = _token_norms(k_base, w_base, t, end, stride_kt, stride_kd, stride_wt, R, HAS_MASK,
                                     weighted_norms, BR, ACC)
                hit = (t < end) & (norms == chunk_max) & (norms > 0)
                hits = tl.where(tiles == (t0 - start) // BS, tl.sum(tl.where(hit, _bits(BS), 0), axis=0), hits)
                ties += tl.sum(hit.to(ACC), axis=0)
            d_norm = d_chunk_max.to(ACC) / tl.maximum(ties, 1.0)
        for t0 in tl.range(start, end, BS, disable_licm=True):  # tiles read in the loop stay there
            t = t0 + tl.arange(0, BS)
            ok = t < end
            prev_ok = ok & (t - 1 >= seg_begin)
            next_ok = t + 1 < end
            w = _load_weights(w_base, t, ok, stride_wt, HAS_MASK, ACC)
            z = _load_tokens(k_base, t, ok, stride_kt, R, stride_kd, BR).to(ACC)
            z_prev = _load_tokens(k_base, t - 1, prev_ok, stride_kt, R, stride_kd, BR).to(ACC)
            z_prev = z_prev * _load_weights(w_base, t - 1, prev_ok, stride_wt, HAS_MASK, ACC)[:, None]
            z_next = _load_tokens(k_base, t + 1, next_ok, stride_kt, R, stride_kd, BR).to(ACC)
            z_next = z_next * _load_weights(w_base, t + 1, next_ok, stride_wt, HAS_MASK, ACC)[:, None]
            v_vis = _load_tokens(v_base, t, ok, stride_vt, P, stride_vd, BP).to(ACC) * w[:, None]
            dz = _grad_product(z * w[:, None], grads, 0, gram_hi, gram_lo, cols, R, P, IN_ROW, BR, BP, BN, ACC,
                               DOT_PRECISION, HALF_TOKENS)
            dz += _grad_product(v_vis, grads, 3, cross_hi, cross_lo, cols, R, P, IN_ROW, BR, BP, BN, ACC, DOT_PRECISION,
                                HALF_TOKENS)
            dz += _grad_product(z_prev, grads, 2, lag_t_hi, lag_t_lo, cols, R, P, IN_ROW, BR, BP, BN, ACC,
                                DOT_PRECISION, HALF_TOKENS)
            dz += _grad_product(z_next, grads, 1, lag_hi, lag_lo, cols, R, P, IN_ROW, BR, BP, BN, ACC, DOT_PRECISION,
                                HALF_TOKENS)
            dz += tl.where((t == end - 1)[:, None], boundary[None, :], 0.0)
            dk = dz * w[:, None]
            if NORM_KEYS != 0:  # d_norm · z/‖z‖ on the tokens attaining the chunk max (w = 1, ‖z‖ = max there)
                word = tl.sum(tl.where(tiles == (t0 - start) // BS, hits, 0), axis=0)
                hit = (word & _bits(BS)) != 0
                z_cols = tl.load(k_base + t[:, None] * stride_kt + cols[None, :] * stride_kd,
                                 mask=ok[:, None] & (cols[None, :] < R), other=0.0).to(ACC)
                dk += tl.where(hit, d_norm / chunk_max, 0.0)[:, None] * z_cols
            tl.store(dk_base + t[:, None] * stride_dkt + cols[None, :] * stride_dkd, dk.to(dk_base.dtype.element_ty),
                     mask=ok[:, None] & (cols[None, :] < R))
    if col0 < P:
        cross_t_hi, cross_t_lo = _split_tf32(_grad_tile(grads, 4, cols, R, P, IN_ROW, BR, BP, BN), HALF_TOKENS)
        for t0 in range(start, end, BS):
            t = t0 + tl.arange(0, BS)
            ok = t < end
            w = _load_weights(w_base, t, ok, stride_wt, HAS_MASK, ACC)
            z_vis = _load_tokens(k_base, t, ok, stride_kt, R, stride_kd, BR).to(ACC) * w[:, None]
            dv = _mm_split(z_vis, cross_t_hi, cross_t_lo, ACC, DOT_PRECISION, HALF_TOKENS) * w[:, None]
            tl.store(dv_base + t[:, None] * stride_dvt + cols[None, :] * stride_dvd, dv.to(dv_base.dtype.element_ty),
                     mask=ok[:, None] & (cols[None, :] < P))


@triton.jit
def chunk_stats_bwd_kernel(
    K, V, WMASK, DSTATS, DMNORM, DK, DV, CHUNK_START, CHUNK_END, SEG_BEGIN, SEG_END,
    H, NC, R, P,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_wb, stride_wt,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    HAS_MASK: tl.constexpr, NORM_KEYS: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
    BN: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, HALF_TOKENS: tl.constexpr,
    TILES: tl.constexpr,
):
    """Columns n of dk and dv for the tokens of chunk j (`_chunk_stats_grad`), from DSTATS[bh, j] = (dG_j, dM_j,
    dC_j) and DMNORM[bh, j], the gradient of the chunk's max key norm. The lag pair joining token end-1 to the
    next chunk of the same sequence belongs to that chunk (row j+1). Each program owns BN columns, so the
    gradient matrices it keeps on chip are [·, BN] slices. Grid (NC, B·H, ⌈max(r, P) / BN⌉).
    """
    c, bh, b, h, start, end = _chunk_program(H, CHUNK_START, CHUNK_END)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    has_next = end < tl.load(SEG_END + c)
    row = DSTATS + (bh * NC + c) * (2 * R * R + P * R)
    k_base = K + b * stride_kb + h * stride_kh
    w_base = WMASK + b * stride_wb
    rr = tl.arange(0, BR)
    lag_next = tl.load(row + 2 * R * R + P * R + R * R + rr[:, None] * R + cols[None, :],
                       mask=has_next & (rr[:, None] < R) & (cols[None, :] < R), other=0.0)
    boundary = _boundary(k_base, w_base, end, has_next, lag_next, R, stride_kt, stride_kd, stride_wt, HAS_MASK, BR,
                         ACC)
    _chunk_stats_grad(k_base, V + b * stride_vb + h * stride_vh, w_base, DK + b * stride_dkb + h * stride_dkh,
                      DV + b * stride_dvb + h * stride_dvh, start, end, tl.load(SEG_BEGIN + c), tl.program_id(2) * BN,
                      row, True, boundary, tl.load(DMNORM + bh * NC + c), R, P,
                      stride_kt, stride_kd, stride_vt, stride_vd, stride_wt, stride_dkt, stride_dkd, stride_dvt,
                      stride_dvd, HAS_MASK, NORM_KEYS, BS, TILES, BR, BP, BN, ACC, DOT_PRECISION, HALF_TOKENS)


# ---------------------------------------------------------------------------------------------
# (a') segmented scan over chunks: statistics rows and key-norm maxima in one launch
# ---------------------------------------------------------------------------------------------


@triton.jit
def _running_max_step(SMAX, c, x, top, MAX_TOTAL: tl.constexpr):
    """One chunk c of a sequence's maxima (`_segment_max_fwd`): without MAX_TOTAL stores the running max before c
    at SMAX + c; returns the running max after c (a chunk that ties the max takes it over: cummax's later one)."""
    if not MAX_TOTAL:
        tl.store(SMAX + c, top)
    return tl.where(x >= top, x, top)


@triton.jit
def _segment_max_finish(SMAX, s, c0, c1, top, TOTAL: tl.constexpr, MAX_TOTAL: tl.constexpr):
    """The sequence max `top` at slot s (TOTAL), or repeated for each of its chunks c0 ≤ c < c1 (MAX_TOTAL)."""
    if TOTAL:
        tl.store(SMAX + s, top)
    elif MAX_TOTAL:
        for c in range(c0, c1):
            tl.store(SMAX + c, top)


@triton.jit
def _segment_max_fwd(CMAX, SMAX, s, c0, c1, TOTAL: tl.constexpr, MAX_TOTAL: tl.constexpr, ACC: tl.constexpr):
    """The maxima of one sequence (chunks c0 ≤ c < c1) in the rows CMAX, SMAX of one B·H (segment_scan_kernel)."""
    top = tl.zeros([], dtype=ACC)
    for c in range(c0, c1):
        top = _running_max_step(SMAX, c, tl.load(CMAX + c).to(ACC), top, MAX_TOTAL)
    _segment_max_finish(SMAX, s, c0, c1, top, TOTAL, MAX_TOTAL)


@triton.jit
def _segment_max_bwd(CMAX, DSMAX, DCMAX, s, c0, c1, TOTAL: tl.constexpr, MAX_TOTAL: tl.constexpr, ACC: tl.constexpr):
    """DCMAX of one sequence (chunks c0 ≤ c < c1) from DSMAX, rows of one B·H, the maxima recomputed from
    CMAX exactly as `_segment_max_fwd` takes them (segment_scan_kernel)."""
    top = tl.zeros([], dtype=ACC)
    if MAX_TOTAL:
        d_top = tl.zeros([], dtype=ACC)
        for c in range(c0, c1):
            x = tl.load(CMAX + c).to(ACC)
            top = tl.where(x >= top, x, top)
            if not TOTAL:  # repeated for every chunk of the sequence: their gradients add up
                d_top += tl.load(DSMAX + c).to(ACC)
        if TOTAL:
            d_top += tl.load(DSMAX + s).to(ACC)
        ties = tl.zeros([], dtype=ACC)
        for c in range(c0, c1):
            ties += tl.where(tl.load(CMAX + c).to(ACC) == top, 1.0, 0.0)
        share = d_top / tl.maximum(ties, 1.0)
        for c in range(c0, c1):
            tl.store(DCMAX + c, tl.where(tl.load(CMAX + c).to(ACC) == top, share, 0.0))
    else:
        # the chunk `last` that set the running max receives the gradients of the chunks after it, up to and
        # including the next chunk that sets it; every address is written once (0 for the other chunks)
        last = c0 - 1
        since = tl.zeros([], dtype=ACC)
        for c in range(c0, c1):
            x = tl.load(CMAX + c).to(ACC)
            since += tl.load(DSMAX + c).to(ACC)
            record = x >= top
            tl.store(DCMAX + tl.where(record, last, c), tl.where(record, since, 0.0), mask=(last >= c0) | ~record)
            since = tl.where(record, 0.0, since)
            last = tl.where(record, c, last)
            top = tl.where(record, x, top)
        tl.store(DCMAX + last, since, mask=last >= c0)


@triton.jit
def segment_scan_kernel(
    X, OUT, CMAX, DSMAX, MOUT, SEG_CHUNKS, NSEG, NC, NOUT, D,
    TOTAL: tl.constexpr, MAX_TOTAL: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Sums of the statistics rows and maxima of the chunk key norms over the chunks [SEG_CHUNKS[s],
    SEG_CHUNKS[s+1]) of each sequence s, per slot (NOUT per B·H: the chunk, or with TOTAL the sequence).

    Forward (REVERSE=False): X [B·H, NC, D] -> OUT [B·H, NOUT, D]: the sum of the rows before c in its
    sequence (0 for its first chunk), or with TOTAL the sequence's sum (0 if empty). CMAX [B·H, NC] ->
    MOUT = SMAX [B·H, NOUT]: the running max max(0, CMAX of the chunks before c), or with MAX_TOTAL (implied by
    TOTAL) the sequence's max(0, CMAX of its chunks), repeated for each of its chunks without TOTAL.
    Backward (REVERSE=True, CMAX as in the forward): X = dOUT [B·H, NOUT, D] -> OUT = dX [B·H, NC, D];
    DSMAX = dSMAX [B·H, NOUT] -> MOUT = dCMAX [B·H, NC]: a running max's gradient goes to the chunk
    attaining it (the later one on ties, torch.cummax's rule), a sequence max's is split evenly over the
    chunks attaining it (torch.amax's). The program of the first column tile also scans the maxima.
    Grid (B·H, ⌈D / BLOCK⌉).
    """
    bh = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < D
    if REVERSE:
        x_base = X + bh * NOUT * D
        out_base = OUT + bh * NC * D
    else:
        x_base = X + bh * NC * D
        out_base = OUT + bh * NOUT * D
    for s in range(NSEG):
        c0 = tl.load(SEG_CHUNKS + s).to(tl.int64)
        c1 = tl.load(SEG_CHUNKS + s + 1).to(tl.int64)
        if REVERSE and TOTAL:  # every chunk of the sequence receives the gradient of its sum
            d_total = tl.load(x_base + s * D + cols, mask=col_ok, other=0.0)
            for c in range(c0, c1):
                tl.store(out_base + c * D + cols, d_total, mask=col_ok)
        else:
            acc = tl.zeros([BLOCK], dtype=ACC)
            for i in range(c1 - c0):
                if REVERSE:
                    c = c1 - 1 - i
                else:
                    c = c0 + i
                x = tl.load(x_base + c * D + cols, mask=col_ok, other=0.0)
                if not TOTAL:
                    tl.store(out_base + c * D + cols, acc, mask=col_ok)
                acc += x
            if TOTAL:
                tl.store(out_base + s * D + cols, acc, mask=col_ok)
        if tl.program_id(1) == 0:
            if REVERSE:
                _segment_max_bwd(CMAX + bh * NC, DSMAX + bh * NOUT, MOUT + bh * NC, s, c0, c1, TOTAL,
                                 MAX_TOTAL or TOTAL, ACC)
            else:
                _segment_max_fwd(CMAX + bh * NC, MOUT + bh * NOUT, s, c0, c1, TOTAL, MAX_TOTAL or TOTAL, ACC)


# ---------------------------------------------------------------------------------------------
# (a'') statistics and scan in one walk over the chunks (the two stages above fused)
# ---------------------------------------------------------------------------------------------


@triton.jit(noinline=True)
def _advance_visible(src, dst, fresh, k_base, v_base, w_base, start, end, seg_begin, R, P, stride_kt, stride_kd,
                     stride_vt, stride_vd, stride_wt, HAS_MASK: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr,
                     BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The visible statistics of the chunk after tokens start <= t < end into the flat row dst: those of that chunk
    (the row src; may be dst) plus its own statistics (`_chunk_stats_columns`, BN columns at a time; the sum in
    the walk's order), or zeros where `fresh` (the next chunk begins a sequence). Ends with a barrier: the
    row is read back by other threads."""
    for n0 in tl.range(0, BR, BN):
        cols = n0 + tl.arange(0, BN)
        if fresh:
            gram = tl.zeros([BR, BN], dtype=ACC)
            lag = tl.zeros([BR, BN], dtype=ACC)
            cross = tl.zeros([BP, BN], dtype=ACC)
        else:
            chunk_gram, chunk_lag, chunk_cross, _ = _chunk_stats_columns(
                k_base, v_base, w_base, start, end, seg_begin, cols, R, P, stride_kt, stride_kd, stride_vt,
                stride_vd, stride_wt, HAS_MASK, 0, BS, BR, BP, BN, ACC, DOT_PRECISION)
            gram = _load_columns(src, R, R, cols, BR, False).to(ACC) + chunk_gram
            lag = _load_columns(src + R * R, R, R, cols, BR, False).to(ACC) + chunk_lag
            cross = _load_columns(src + 2 * R * R, P, R, cols, BP, False).to(ACC) + chunk_cross
        _store_row_columns(dst, gram, lag, cross, cols, R, P, BR, BP)
    tl.debug_barrier()


@triton.jit
def _walk_program(K, V, WMASK, H, stride_kb, stride_kh, stride_vb, stride_vh, stride_wb):
    """(batch·head bh in int64, b, h, and the bases of its keys, values and mask) of a walk program (grid
    (B·H, column tile))."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    return bh, b, h, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, WMASK + b * stride_wb


@triton.jit
def visible_stats_fwd_kernel(
    K, V, WMASK, OUT, CMAX, SMAX, CHUNK_START, CHUNK_END, SEG_BEGIN, SEG_CHUNKS,
    H, NSEG, NC, NOUT, EVERY, R, P,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_wb, stride_wt,
    HAS_MASK: tl.constexpr, NORM_KEYS: tl.constexpr, TOTAL: tl.constexpr, MAX_TOTAL: tl.constexpr,
    BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """chunk_stats_fwd_kernel, then segment_scan_kernel's forward, in one pass: each program walks the chunks of
    every sequence in order, computes their statistics' columns n (`_chunk_stats_columns`) and keeps the running
    sums on chip, so that chunk rows never reach memory. Writes OUT [B·H, NOUT, D] and SMAX [B·H, NOUT] exactly
    as segment_scan_kernel (the same sums in the same order), and the chunk max key norms CMAX [B·H, NC] (for
    the backward); slots = chunks (not TOTAL), OUT holds only every EVERY-th chunk's row [B·H, ⌈NOUT / EVERY⌉, D]
    (chunk c at row c / EVERY: the block starts from which the dense kernels recompute the others,
    `_advance_visible`).
    Grid (B·H, ⌈r / BN⌉): the sequential part is parallel over batch, head and column tile.
    """
    bh, _, _, k_base, v_base, w_base = _walk_program(K, V, WMASK, H, stride_kb, stride_kh, stride_vb, stride_vh,
                                                     stride_wb)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    keeps_maxima = tl.program_id(1) == 0
    width = 2 * R * R + P * R
    out_base = OUT + bh * tl.cdiv(NOUT, EVERY) * width
    for s in range(NSEG):
        c0 = tl.load(SEG_CHUNKS + s).to(tl.int64)
        c1 = tl.load(SEG_CHUNKS + s + 1).to(tl.int64)
        gram = tl.zeros([BR, BN], dtype=ACC)
        lag = tl.zeros([BR, BN], dtype=ACC)
        cross = tl.zeros([BP, BN], dtype=ACC)
        top = tl.zeros([], dtype=ACC)
        for c in range(c0, c1):
            if not TOTAL:
                if c % EVERY == 0:
                    _store_row_columns(out_base + (c // EVERY) * width, gram, lag, cross, cols, R, P, BR, BP)
            chunk_gram, chunk_lag, chunk_cross, chunk_max = _chunk_stats_columns(
                k_base, v_base, w_base, tl.load(CHUNK_START + c).to(tl.int64), tl.load(CHUNK_END + c).to(tl.int64),
                tl.load(SEG_BEGIN + c), cols, R, P, stride_kt, stride_kd, stride_vt, stride_vd, stride_wt, HAS_MASK,
                NORM_KEYS, BS, BR, BP, BN, ACC, DOT_PRECISION)
            gram += chunk_gram
            lag += chunk_lag
            cross += chunk_cross
            if keeps_maxima:
                tl.store(CMAX + bh * NC + c, chunk_max)
                top = _running_max_step(SMAX + bh * NOUT, c, chunk_max, top, MAX_TOTAL or TOTAL)
        if TOTAL:
            _store_row_columns(out_base + s * width, gram, lag, cross, cols, R, P, BR, BP)
        if keeps_maxima:
            _segment_max_finish(SMAX + bh * NOUT, s, c0, c1, top, TOTAL, MAX_TOTAL or TOTAL)


@triton.jit
def _add_grad_tiles(ws, row, cols, R, P, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr):
    """A program's scratch of the five `_grad_tile`s (ws) += those of the flat gradient row at `row` (or := 0 if
    row is None), between barriers: the scratch is read and written by every thread of the program."""
    tl.debug_barrier()
    for which in tl.static_range(5):
        offsets = _scratch_tile(which, BR, BP, BN)
        if row is None:
            tile = tl.zeros(offsets.shape, dtype=ACC)
        else:
            tile = tl.load(ws + offsets) + _grad_tile(row, which, cols, R, P, True, BR, BP, BN)
        tl.store(ws + offsets, tile)
    tl.debug_barrier()


@triton.jit
def visible_stats_bwd_kernel(
    K, V, WMASK, DOUT, CMAX, DSMAX, WS, DK, DV, CHUNK_START, CHUNK_END, SEG_BEGIN, SEG_CHUNKS,
    H, NSEG, NC, NOUT, R, P,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_wb, stride_wt,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    HAS_MASK: tl.constexpr, NORM_KEYS: tl.constexpr, TOTAL: tl.constexpr, MAX_TOTAL: tl.constexpr,
    BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HALF_TOKENS: tl.constexpr, TILES: tl.constexpr,
):
    """visible_stats_fwd_kernel's backward, segment_scan_kernel's reverse and chunk_stats_bwd_kernel in one pass:
    from DOUT = dOUT [B·H, NOUT, D] and DSMAX = dSMAX [B·H, NOUT], columns n of dk and dv. Each program walks the
    chunks of every sequence last to first and keeps what its columns need of the gradient of each chunk's
    statistics — the suffix sum of dOUT after the chunk (`_grad_tile`s of it), or with TOTAL the sequence's dOUT
    — in its scratch WS [(4·BR + BP)·BN + NC] (L2: written and read by the program alone; held in registers
    across the token loops, the tiles spill), so that chunk rows of gradients never reach memory. The scratch's
    last NC entries hold the chunk max gradients (`_segment_max_bwd`, from CMAX as the forward wrote it).
    Grid (B·H, ⌈max(r, P) / BN⌉).
    """
    bh, b, h, k_base, v_base, w_base = _walk_program(K, V, WMASK, H, stride_kb, stride_kh, stride_vb, stride_vh,
                                                     stride_wb)
    col0 = tl.program_id(1) * BN
    cols = col0 + tl.arange(0, BN)
    width = 2 * R * R + P * R
    d_out = DOUT + bh * NOUT * width
    suffix = WS + (bh * tl.num_programs(1) + tl.program_id(1)) * ((4 * BR + BP) * BN + NC)
    d_chunk_max = suffix + (4 * BR + BP) * BN
    for s in range(NSEG):
        c0 = tl.load(SEG_CHUNKS + s).to(tl.int64)
        c1 = tl.load(SEG_CHUNKS + s + 1).to(tl.int64)
        _segment_max_bwd(CMAX + bh * NC, DSMAX + bh * NOUT, d_chunk_max, s, c0, c1, TOTAL, MAX_TOTAL or TOTAL, ACC)
        _add_grad_tiles(suffix, None, cols, R, P, BR, BP, BN, ACC)  # also a barrier: the chunk max gradients
        if TOTAL:  # every chunk of the sequence receives the gradient of its sum
            _add_grad_tiles(suffix, d_out + s * width, cols, R, P, BR, BP, BN, ACC)
        boundary = tl.zeros([BN], dtype=ACC)
        for i in tl.range(0, c1 - c0, disable_licm=True):
            c = c1 - 1 - i
            start = tl.load(CHUNK_START + c).to(tl.int64)
            # this chunk's first lag pair, for the last token of the one before (0 for the first chunk)
            d_lag = _grad_tile(suffix, 1, cols, R, P, False, BR, BP, BN)
            next_boundary = _boundary(k_base, w_base, start, c > c0, d_lag, R, stride_kt, stride_kd, stride_wt,
                                      HAS_MASK, BR, ACC)
            _chunk_stats_grad(k_base, v_base, w_base, DK + b * stride_dkb + h * stride_dkh,
                              DV + b * stride_dvb + h * stride_dvh, start, tl.load(CHUNK_END + c).to(tl.int64),
                              tl.load(SEG_BEGIN + c), col0, suffix, False, boundary, tl.load(d_chunk_max + c), R, P,
                              stride_kt, stride_kd, stride_vt, stride_vd, stride_wt, stride_dkt, stride_dkd,
                              stride_dvt, stride_dvd, HAS_MASK, NORM_KEYS, BS, TILES, BR, BP, BN, ACC, DOT_PRECISION,
                              HALF_TOKENS)
            boundary = next_boundary
            if not TOTAL:
                _add_grad_tiles(suffix, d_out + c * width, cols, R, P, BR, BP, BN, ACC)


# (b) the per-slot dense algebra lives in dense.py (loaded into this namespace by runtime.py)


# ---------------------------------------------------------------------------------------------
# (c) readout Y_c = η R_c Q_c and its backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _readout_tokens(q_base, y_base, rmat, eta, start, end, R, P, stride_qt, stride_qd, stride_yt, stride_yd,
                    BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, HALF_TOKENS: tl.constexpr):
    """y_t = η R q_t for the tokens start <= t < end, BN output columns at a time; R [P, r] row-major at rmat."""
    for p0 in tl.range(0, BP, BN):
        cols = p0 + tl.arange(0, BN)
        readout_t = _load_columns(rmat, P, R, cols, BR, True).to(ACC)  # Rᵀ[:, cols]
        readout_hi, readout_lo = _split_tf32(readout_t, HALF_TOKENS)
        for t0 in range(start, end, BS):
            t = t0 + tl.arange(0, BS)
            ok = t < end
            query = _load_tokens(q_base, t, ok, stride_qt, R, stride_qd, BR).to(ACC)
            y = _mm_split(query, readout_hi, readout_lo, ACC, DOT_PRECISION, HALF_TOKENS) * eta
            tl.store(y_base + t[:, None] * stride_yt + cols[None, :] * stride_yd, y.to(y_base.dtype.element_ty),
                     mask=ok[:, None] & (cols[None, :] < P))


@triton.jit
def _readout_grad_columns(q_base, dy_base, dq_base, rmat, eta, cols, start, end, R, P,
                          stride_qt, stride_qd, stride_yt, stride_yd, stride_dqt, stride_dqd,
                          BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                          ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, HALF_TOKENS: tl.constexpr):
    """Columns `cols` [BN] of y = η R q's backward over the tokens start <= t < end: stores dq_t = η Rᵀ dy_t
    there and returns (Σ_t dy_t q_tᵀ [BP, BN] without η, R[:, cols] [BP, BN]); R [P, r] row-major at rmat."""
    readout = _load_columns(rmat, P, R, cols, BP, False).to(ACC)
    readout_hi, readout_lo = _split_tf32(readout, HALF_TOKENS)
    outer = tl.zeros([BP, BN], dtype=ACC)
    for t0 in range(start, end, BS):
        t = t0 + tl.arange(0, BS)
        ok = t < end
        query = tl.load(q_base + t[:, None] * stride_qt + cols[None, :] * stride_qd,
                        mask=ok[:, None] & (cols[None, :] < R), other=0.0)
        d_y = _load_tokens(dy_base, t, ok, stride_yt, P, stride_yd, BP)
        d_q = _mm_split(d_y.to(ACC), readout_hi, readout_lo, ACC, DOT_PRECISION, HALF_TOKENS) * eta
        tl.store(dq_base + t[:, None] * stride_dqt + cols[None, :] * stride_dqd, d_q.to(dq_base.dtype.element_ty),
                 mask=ok[:, None] & (cols[None, :] < R))
        if HALF_TOKENS:  # fp16/bf16 operands: exact products, fp32 accumulation
            outer += _mm(tl.trans(d_y.to(query.dtype)), query, ACC, DOT_PRECISION)
        else:
            outer += _mm(tl.trans(d_y.to(ACC)), query.to(ACC), ACC, DOT_PRECISION)
    return outer, readout


@triton.jit
def readout_fwd_kernel(
    Q, RMAT, ETA, Y, CHUNK_START, CHUNK_END, CHUNK_SLOT, H, NSLOT, R, P,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_yb, stride_yt, stride_yh, stride_yd,
    BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HALF_TOKENS: tl.constexpr,
):
    """y_t = η R_{CHUNK_SLOT[c]} q_t for the tokens t of chunk c. Grid (NC, B·H)."""
    c, bh, b, h, start, end = _chunk_program(H, CHUNK_START, CHUNK_END)
    _readout_tokens(Q + b * stride_qb + h * stride_qh, Y + b * stride_yb + h * stride_yh,
                    RMAT + (bh * NSLOT + tl.load(CHUNK_SLOT + c)) * P * R, tl.load(ETA + h).to(ACC), start, end, R, P,
                    stride_qt, stride_qd, stride_yt, stride_yd, BS, BR, BP, BP, ACC, DOT_PRECISION, HALF_TOKENS)


@triton.jit
def readout_bwd_kernel(
    Q, RMAT, ETA, DY, DQ, DRMAT, DETA, CHUNK_START, CHUNK_END, CHUNK_SLOT, H, NC, NSLOT, R, P,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_yb, stride_yt, stride_yh, stride_yd,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HALF_TOKENS: tl.constexpr,
):
    """Columns n of: dq_t = η Rᵀ dy_t, and per chunk c DRMAT[bh, c] = η Σ_t dy_t q_tᵀ; DETA[bh, c, n-block]
    = ⟨R, Σ_t dy_t q_tᵀ⟩ restricted to those columns. Grid (NC, B·H, ⌈r / BN⌉)."""
    c, bh, b, h, start, end = _chunk_program(H, CHUNK_START, CHUNK_END)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    eta = tl.load(ETA + h).to(ACC)
    outer, readout = _readout_grad_columns(
        Q + b * stride_qb + h * stride_qh, DY + b * stride_yb + h * stride_yh, DQ + b * stride_dqb + h * stride_dqh,
        RMAT + (bh * NSLOT + tl.load(CHUNK_SLOT + c)) * P * R, eta, cols, start, end, R, P, stride_qt, stride_qd,
        stride_yt, stride_yd, stride_dqt, stride_dqd, BS, BR, BP, BN, ACC, DOT_PRECISION, HALF_TOKENS)
    pp = tl.arange(0, BP)
    tl.store(DRMAT + (bh * NC + c) * P * R + pp[:, None] * R + cols[None, :], outer * eta,
             mask=(pp[:, None] < P) & (cols[None, :] < R))
    tl.store(DETA + (bh * NC + c) * tl.num_programs(2) + tl.program_id(2), _total(readout * outer))
