"""Triton kernels of chunked SKA (SPEC §2–3), forward and backward.

Do not import this module directly: `echo_megatron.ops.triton.runtime.kernels_for(device)` loads it
compiled (CUDA tensors) or under the Triton interpreter (CPU tensors). Conventions:

* grids are (chunk or slot, batch·head) — one program per (chunk, B·H) — except the scan, which
  walks the chunks of each sequence in order, one program per (B·H, column tile);
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
    """Columns n of G_j = Σ z̃ z̃ᵀ, M_j = Σ z̃_t z̃_{t-1}ᵀ (the lag pair into the chunk included), C_j = Σ ṽ z̃ᵀ
    and the chunk's max key norm, with z̃ = w·z, ṽ = w·v.

    NORM_KEYS: 0 no norm, 1 max ‖z̃‖ (causal_max), 2 max ‖z‖ over every token (sequence_max).
    Each program owns BN columns (accumulators [BR, BN], [BR, BN], [BP, BN], so r = 128 fits on chip).
    Writes STATS[bh, j, :D] and MNORM[bh, j]. Grid (NC, B·H, ⌈r / BN⌉).
    """
    c, bh, b, h, start, end = _chunk_program(H, CHUNK_START, CHUNK_END)
    seg_begin = tl.load(SEG_BEGIN + c)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    w_base = WMASK + b * stride_wb
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
    row = STATS + (bh * NC + c) * (2 * R * R + P * R)
    rr = tl.arange(0, BR)
    pp = tl.arange(0, BP)
    col_ok = cols[None, :] < R
    tl.store(row + rr[:, None] * R + cols[None, :], gram, mask=(rr[:, None] < R) & col_ok)
    tl.store(row + R * R + rr[:, None] * R + cols[None, :], lag, mask=(rr[:, None] < R) & col_ok)
    tl.store(row + 2 * R * R + pp[:, None] * R + cols[None, :], cross, mask=(pp[:, None] < P) & col_ok)
    if tl.program_id(2) == 0:
        tl.store(MNORM + bh * NC + c, tl.max(max_norm, axis=0))  # 0 with NORM_KEYS=0


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
    """Columns n of dk and dv for the tokens of chunk j, from the gradients of the chunk statistics.

    DSTATS[bh, j] holds (dG_j, dM_j, dC_j); DMNORM[bh, j] the gradient of the chunk's max key norm,
    split evenly over the tokens attaining it (torch's amax rule). The lag pair joining token end-1 to
    the next chunk of the same sequence belongs to that chunk (row j+1). Rows of dL/dz̃:
    z̃ (dG + dGᵀ) + ṽ dC + z̃_{t-1} dMᵀ + z̃_{t+1} dM; dṽ = z̃ dCᵀ. Each program owns BN columns, so the
    gradient matrices it keeps on chip are [·, BN] slices. Grid (NC, B·H, ⌈max(r, P) / BN⌉).
    """
    c, bh, b, h, start, end = _chunk_program(H, CHUNK_START, CHUNK_END)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    seg_begin = tl.load(SEG_BEGIN + c)
    has_next = end < tl.load(SEG_END + c)
    width = 2 * R * R + P * R
    row = DSTATS + (bh * NC + c) * width
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    w_base = WMASK + b * stride_wb
    weighted_norms: tl.constexpr = HAS_MASK and NORM_KEYS == 1
    if tl.program_id(2) * BN < R:
        gram_hi, gram_lo = _split_tf32(_load_columns(row, R, R, cols, BR, False)
                                       + _load_columns(row, R, R, cols, BR, True), HALF_TOKENS)
        lag_hi, lag_lo = _split_tf32(_load_columns(row + R * R, R, R, cols, BR, False), HALF_TOKENS)
        lag_t_hi, lag_t_lo = _split_tf32(_load_columns(row + R * R, R, R, cols, BR, True), HALF_TOKENS)
        cross_hi, cross_lo = _split_tf32(_load_columns(row + 2 * R * R, P, R, cols, BP, False), HALF_TOKENS)
        # first lag pair of the next chunk, (z_end, z_{end-1}): adds z̃_endᵀ dM_next to row end-1
        rr = tl.arange(0, BR)
        d_lag_next = tl.load(row + width + R * R + rr[:, None] * R + cols[None, :],
                             mask=has_next & (rr[:, None] < R) & (cols[None, :] < R), other=0.0)
        z_end = tl.load(k_base + end * stride_kt + rr * stride_kd, mask=has_next & (rr < R), other=0.0).to(ACC)
        if HAS_MASK:
            z_end = z_end * tl.load(w_base + end * stride_wt, mask=has_next, other=0.0).to(ACC)
        boundary = tl.sum(z_end[:, None] * d_lag_next, axis=0)
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
            d_norm = tl.load(DMNORM + bh * NC + c).to(ACC) / tl.maximum(ties, 1.0)
        for t0 in range(start, end, BS):
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
            dz = _mm_split(z * w[:, None], gram_hi, gram_lo, ACC, DOT_PRECISION, HALF_TOKENS)
            dz += _mm_split(v_vis, cross_hi, cross_lo, ACC, DOT_PRECISION, HALF_TOKENS)
            dz += _mm_split(z_prev, lag_t_hi, lag_t_lo, ACC, DOT_PRECISION, HALF_TOKENS)
            dz += _mm_split(z_next, lag_hi, lag_lo, ACC, DOT_PRECISION, HALF_TOKENS)
            dz += tl.where((t == end - 1)[:, None], boundary[None, :], 0.0)
            dk = dz * w[:, None]
            if NORM_KEYS != 0:  # d_norm · z/‖z‖ on the tokens attaining the chunk max (w = 1, ‖z‖ = max there)
                word = tl.sum(tl.where(tiles == (t0 - start) // BS, hits, 0), axis=0)
                hit = (word & _bits(BS)) != 0
                z_cols = tl.load(k_base + t[:, None] * stride_kt + cols[None, :] * stride_kd,
                                 mask=ok[:, None] & (cols[None, :] < R), other=0.0).to(ACC)
                dk += tl.where(hit, d_norm / chunk_max, 0.0)[:, None] * z_cols
            tl.store(DK + b * stride_dkb + h * stride_dkh + t[:, None] * stride_dkt + cols[None, :] * stride_dkd,
                     dk.to(DK.dtype.element_ty), mask=ok[:, None] & (cols[None, :] < R))
    if tl.program_id(2) * BN < P:
        cross_t_hi, cross_t_lo = _split_tf32(_load_columns(row + 2 * R * R, P, R, cols, BR, True), HALF_TOKENS)
        for t0 in range(start, end, BS):
            t = t0 + tl.arange(0, BS)
            ok = t < end
            w = _load_weights(w_base, t, ok, stride_wt, HAS_MASK, ACC)
            z_vis = _load_tokens(k_base, t, ok, stride_kt, R, stride_kd, BR).to(ACC) * w[:, None]
            dv = _mm_split(z_vis, cross_t_hi, cross_t_lo, ACC, DOT_PRECISION, HALF_TOKENS) * w[:, None]
            tl.store(DV + b * stride_dvb + h * stride_dvh + t[:, None] * stride_dvt + cols[None, :] * stride_dvd,
                     dv.to(DV.dtype.element_ty), mask=ok[:, None] & (cols[None, :] < P))


# ---------------------------------------------------------------------------------------------
# (a') segmented scan over chunks: statistics rows and key-norm maxima in one launch
# ---------------------------------------------------------------------------------------------


@triton.jit
def _segment_max_fwd(CMAX, SMAX, s, c0, c1, TOTAL: tl.constexpr, MAX_TOTAL: tl.constexpr, ACC: tl.constexpr):
    """The maxima of one sequence (chunks c0 ≤ c < c1) in the rows CMAX, SMAX of one B·H (segment_scan_kernel)."""
    top = tl.zeros([], dtype=ACC)
    for c in range(c0, c1):
        if not MAX_TOTAL:
            tl.store(SMAX + c, top)
        x = tl.load(CMAX + c).to(ACC)
        top = tl.where(x >= top, x, top)  # a chunk that ties the max takes it over (cummax: the later one)
    if TOTAL:
        tl.store(SMAX + s, top)
    elif MAX_TOTAL:
        for c in range(c0, c1):
            tl.store(SMAX + c, top)


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
