"""Dense per-slot algebra of SKA (SPEC §2) on tensor cores: blocked Cholesky, whitening, filter, backward.

Loaded by `runtime.py` in the namespace of `kernels.py` (it uses that file's helpers `_mm` and `_total`);
do not import it directly. Design:

* **Persistent programs with a workspace.** A program owns a slice of a scratch buffer (WS: SQUARE_SLOTS
  [BR, BR] matrices, two [BP, BR] ones and a statistics row) and walks slots `pid, pid + num_programs, …` — in
  chunk_causal mode (READ_OUT) blocks of EVERY consecutive chunks, whose visible statistics after the first it
  recomputes in the workspace's row from k and v (`_visible_row`), so that the walk need not write them. Every r×r
  matrix lives there or in an output, never whole in registers: the building blocks work on tiles of
  at most [TILE, TILE] (products) or [BR, BLOCK] (Cholesky panels), so r = 128 needs no more registers
  than r = 32 and a few programs share an SM. The scratch is written and read by the same program
  (L1/L2 resident); every building block ends with a barrier so that its writes are visible to the
  next one.
* **Building blocks** (each tested alone against torch, `tests/ops/test_triton_dense.py`):
  `_product` (out = α·A·B [+ D], strided operands so transposes are free, tf32x3 for fp32),
  `_cholesky_block` (unblocked Cholesky and inverse of one [BLOCK, BLOCK] diagonal block),
  `_cholesky_inverse_blocked` (`_cholesky_blocked`: right-looking blocked Cholesky, 16×16 diagonal blocks,
  panels by `tl.dot`; then `_triangular_inverse_blocked`: X = L⁻¹ by block rows), `_spectral_norm` (the power
  iteration: W in registers up to width 64, else `_power_step`s through the workspace), `_transpose_add`,
  `_inner`, `_trace` and `_fill`.
* Matrices are addressed as (pointer, row stride, column stride, rows, columns): rows/columns beyond
  the logical size read as 0 and are never written, so padding costs nothing and needs no identity.
* The kernels do not specialise on their slot counts (`do_not_specialize`): a count of 1 (prefix mode, one
  sequence per row) compiled as a constant made ptxas spill 44 bytes at r = 32.
"""

import triton
import triton.language as tl

if False:  # for readers and linters: these come from kernels.py's namespace (see the module docstring)
    from .kernels import _mm, _readout_grad_columns, _readout_tokens, _total  # noqa: F401


@triton.jit
def _div_ieee(x, y):
    """x / y (y a scalar) rounded to nearest in fp32: Triton's `/` and `tl.sqrt` compile to approximate
    instructions on NVIDIA GPUs, which the Cholesky's r pivots compound. fp64 `/` is already IEEE."""
    if x.dtype == tl.float32:
        return tl.div_rn(x, tl.broadcast_to(y, x.shape))
    else:
        return x / y


@triton.jit
def _sqrt_ieee(x):
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _norm_scale(MSLOT, idx, PARAMS, ACC: tl.constexpr):
    """Jitter scale s = m², m = max(floor, max ‖z‖) over the visible keys (every norm; also the ridge's with a max-norm)."""
    m = tl.maximum(tl.load(MSLOT + idx).to(ACC), tl.load(PARAMS + 2))
    return m * m


@triton.jit
def _tile(ptr, row0, col0, s_row, s_col, n_rows, n_cols, TM: tl.constexpr, TN: tl.constexpr):
    """Tile [TM, TN] at (row0, col0) of a strided matrix with n_rows × n_cols logical entries, 0 outside."""
    rows = row0 + tl.arange(0, TM)
    cols = col0 + tl.arange(0, TN)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask, other=0.0)


@triton.jit
def _put(ptr, x, row0, col0, s_row, s_col, n_rows, n_cols, TM: tl.constexpr, TN: tl.constexpr):
    """Store x [TM, TN] at (row0, col0) of a strided matrix, inside its n_rows × n_cols logical entries."""
    rows = row0 + tl.arange(0, TM)
    cols = col0 + tl.arange(0, TN)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * s_row + cols[None, :] * s_col, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit(noinline=True)
def _product(a, sa_r, sa_c, b, sb_r, sb_c, out, so_r, so_c, d, sd_r, sd_c, n_rows, n_cols, n_inner, alpha,
             HAS_D: tl.constexpr, LOWER_HALF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             TILE: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out = α · A B (+ D if HAS_D) for A [n_rows, n_inner], B [n_inner, n_cols], D and out [n_rows, n_cols],
    every operand strided (swap a pointer's strides for its transpose); BM, BN, BK pad the sizes (multiples
    of TILE). LOWER_HALF keeps the strict lower triangle and half the diagonal of the result (Φ of the
    Cholesky backward). `out` must not alias A or B. Ends with a barrier."""
    for m0 in tl.range(0, BM, TILE, disable_licm=True):
        for n0 in tl.range(0, BN, TILE, disable_licm=True):
            acc = tl.zeros([TILE, TILE], dtype=ACC)
            for k0 in tl.range(0, BK, TILE, disable_licm=True):
                acc += _mm(_tile(a, m0, k0, sa_r, sa_c, n_rows, n_inner, TILE, TILE).to(ACC),
                           _tile(b, k0, n0, sb_r, sb_c, n_inner, n_cols, TILE, TILE).to(ACC), ACC, DOT_PRECISION)
            acc = acc * alpha
            if HAS_D:
                acc += _tile(d, m0, n0, sd_r, sd_c, n_rows, n_cols, TILE, TILE).to(ACC)
            if LOWER_HALF:
                rows = m0 + tl.arange(0, TILE)
                cols = n0 + tl.arange(0, TILE)
                acc = tl.where(rows[:, None] > cols[None, :], acc, tl.where(rows[:, None] == cols[None, :], 0.5 * acc,
                                                                              0.0))
            _put(out, acc, m0, n0, so_r, so_c, n_rows, n_cols, TILE, TILE)
    tl.debug_barrier()


@triton.jit(noinline=True)
def _transpose_add(src, s_r, out, so_r, n, alpha, beta, BR: tl.constexpr, TILE: tl.constexpr):
    """out = α S + β Sᵀ for S [n, n] (row stride s_r); out must not alias S. Ends with a barrier."""
    for m0 in tl.range(0, BR, TILE, disable_licm=True):
        for n0 in tl.range(0, BR, TILE, disable_licm=True):
            x = alpha * _tile(src, m0, n0, s_r, 1, n, n, TILE, TILE) + beta * _tile(src, m0, n0, 1, s_r, n, n, TILE,
                                                                                    TILE)
            _put(out, x, m0, n0, so_r, 1, n, n, TILE, TILE)
    tl.debug_barrier()


@triton.jit
def _fill(out, so_r, n_rows, n_cols, value, BM: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr):
    """out[:n_rows, :n_cols] = value. Ends with a barrier."""
    for m0 in tl.range(0, BM, TILE, disable_licm=True):
        for n0 in tl.range(0, BN, TILE, disable_licm=True):
            _put(out, tl.full([TILE, TILE], value, dtype=out.dtype.element_ty), m0, n0, so_r, 1, n_rows, n_cols,
                 TILE, TILE)
    tl.debug_barrier()


@triton.jit
def _inner(a, sa_r, b, sb_r, n, BR: tl.constexpr, TILE: tl.constexpr, ACC: tl.constexpr):
    """⟨A, B⟩ = Σ A_ij B_ij over [n, n] (row strides sa_r, sb_r)."""
    acc = tl.zeros([TILE, TILE], dtype=ACC)
    for m0 in tl.range(0, BR, TILE, disable_licm=True):
        for n0 in tl.range(0, BR, TILE, disable_licm=True):
            acc += _tile(a, m0, n0, sa_r, 1, n, n, TILE, TILE).to(ACC) * _tile(b, m0, n0, sb_r, 1, n, n, TILE,
                                                                                   TILE).to(ACC)
    return _total(acc)


@triton.jit
def _trace(a, s_r, n, BR: tl.constexpr, ACC: tl.constexpr):
    """tr(A) of [n, n] (row stride s_r)."""
    i = tl.arange(0, BR)
    return tl.sum(tl.load(a + i * (s_r + 1), mask=i < n, other=0.0).to(ACC), axis=0)


@triton.jit
def _unit(y):
    """(y / ‖y‖ (0 if ‖y‖ = 0), ‖y‖) of a vector y."""
    norm = tl.sqrt(tl.sum(y * y, axis=0))
    return tl.where(norm > 0, y / tl.where(norm > 0, norm, 1.0), 0.0), norm


@triton.jit(noinline=True)
def _power_step(a, s_r, s_c, vec, out, n, BR: tl.constexpr, TILE: tl.constexpr, ACC: tl.constexpr):
    """y = A x for A [n, n] (strided) and x read from `vec` [BR]; writes y / ‖y‖ (0 if ‖y‖ = 0) to `out` [BR]
    and returns ‖y‖. Ends with a barrier."""
    x = tl.load(vec + tl.arange(0, BR))
    for m0 in tl.range(0, BR, TILE, disable_licm=True):
        part = tl.sum(_tile(a, m0, 0, s_r, s_c, n, n, TILE, BR).to(ACC) * x[None, :], axis=1)
        tl.store(out + m0 + tl.arange(0, TILE), part)
    tl.debug_barrier()
    y, norm = _unit(tl.load(out + tl.arange(0, BR)))
    tl.debug_barrier()  # every thread has read y before it is overwritten
    tl.store(out + tl.arange(0, BR), y)
    tl.debug_barrier()
    return norm


REGISTER_POWER_WIDTH = tl.constexpr(64)
"""Widths up to which `_spectral_norm` holds W in registers ([64, 64] fp32: 32 per thread at 4 warps; at 128 the
dense forward spilled 288 bytes)."""


@triton.jit(noinline=True)
def _spectral_norm(a, n, start, vec, ITERS: tl.constexpr, BR: tl.constexpr, TILE: tl.constexpr,
                   ACC: tl.constexpr):
    """σ estimate of A [n, n] (row stride BR) by power iteration (SPEC §2 step 4): v = start·(1, …, 1); ITERS ×
    (u = A v / ‖A v‖, v = Aᵀ u / ‖Aᵀ u‖), a vanishing norm giving a zero vector; σ = ‖A v‖. Up to
    REGISTER_POWER_WIDTH, A is read once and held in registers: each step is two reductions over it, A v along
    rows and Aᵀ u along columns, with no memory round trip. Wider, each step reads A in tiles and passes the
    vector through `vec` [2·BR] (`_power_step`)."""
    rows = tl.arange(0, BR)
    inside = rows < n
    if BR <= REGISTER_POWER_WIDTH:
        a_reg = tl.load(a + rows[:, None] * BR + rows[None, :], mask=inside[:, None] & inside[None, :],
                        other=0.0).to(ACC)
        v = tl.where(inside, start, 0.0).to(ACC)
        for _ in tl.range(ITERS):
            u, _ = _unit(tl.sum(a_reg * v[None, :], axis=1))
            v, _ = _unit(tl.sum(a_reg * u[:, None], axis=0))
        _, sigma = _unit(tl.sum(a_reg * v[None, :], axis=1))
    else:
        vec_u = vec + BR
        tl.store(vec + rows, tl.where(inside, start, 0.0))
        tl.debug_barrier()
        for _ in tl.range(ITERS):
            _power_step(a, BR, 1, vec, vec_u, n, BR, TILE, ACC)  # u = A v / ‖A v‖
            _power_step(a, 1, BR, vec_u, vec, n, BR, TILE, ACC)  # v = Aᵀ u / ‖Aᵀ u‖
        sigma = _power_step(a, BR, 1, vec, vec_u, n, BR, TILE, ACC)
    return sigma


@triton.jit
def _cholesky_block(a, n, BLOCK: tl.constexpr):
    """(L, L⁻¹, number of pivots <= 0 or NaN) of a [BLOCK, BLOCK] symmetric block; entries at or past n are
    taken from the identity. Unblocked right-looking Cholesky with L⁻¹ built in the same loop
    (L = L_1 ⋯ L_n with L_j the identity whose column j is l_j, so L⁻¹ = L_n⁻¹ ⋯ L_1⁻¹)."""
    rows = tl.arange(0, BLOCK)
    eye = rows[:, None] == rows[None, :]
    a = tl.where((rows[:, None] < n) & (rows[None, :] < n), a, tl.where(eye, 1.0, 0.0).to(a.dtype))
    lower = tl.zeros([BLOCK, BLOCK], dtype=a.dtype)
    inverse = tl.where(eye, 1.0, 0.0).to(a.dtype)
    bad = tl.zeros([], dtype=tl.int32)
    for j in tl.static_range(BLOCK):
        col = tl.sum(tl.where(rows[None, :] == j, a, 0.0), axis=1)  # a[:, j]
        pivot2 = tl.sum(tl.where(rows == j, col, 0.0), axis=0)
        bad += tl.where(pivot2 > 0, 0, 1)
        pivot = _sqrt_ieee(tl.where(pivot2 > 0, pivot2, 1.0))
        l_col = tl.where(rows >= j, _div_ieee(col, pivot), 0.0)
        a = a - l_col[:, None] * l_col[None, :]
        lower = tl.where(rows[None, :] == j, l_col[:, None], lower)
        x_row = _div_ieee(tl.sum(tl.where(rows[:, None] == j, inverse, 0.0), axis=0), pivot)  # new L⁻¹[j, :]
        inverse = tl.where(rows[:, None] == j, x_row[None, :], inverse - l_col[:, None] * x_row[None, :])
    return lower, inverse, bad


@triton.jit(noinline=True)
def _factor_diagonal_block(block, lower, n, BR: tl.constexpr, BLOCK: tl.constexpr):
    """`_cholesky_block` of the [BLOCK, BLOCK] block stored at `block` (row stride BLOCK): writes L_jj to
    `lower` (row stride BR) and L_jj⁻¹ over the block; returns the number of failed pivots. Ends with a barrier."""
    a = _tile(block, 0, 0, BLOCK, 1, BLOCK, BLOCK, BLOCK, BLOCK)
    l_jj, x_jj, bad = _cholesky_block(a, n, BLOCK)
    tl.debug_barrier()  # every thread has read the block before it is overwritten
    _put(lower, l_jj, 0, 0, BR, 1, BLOCK, BLOCK, BLOCK, BLOCK)
    _put(block, x_jj, 0, 0, BLOCK, 1, BLOCK, BLOCK, BLOCK, BLOCK)
    tl.debug_barrier()
    return bad


@triton.jit(noinline=True)
def _cholesky_blocked(gram, shift, lower, diag_inv, n, BR: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """L with L Lᵀ = sym(G) + shift·I, G [n, n] row-major at `gram`; returns the number of failed pivots.

    Writes L to `lower` ([BR, BR], row stride BR; identity past n) and the diagonal blocks' inverses to
    `diag_inv` ([BR, BLOCK]). Right-looking by block columns j: panel = G̃[:, j] − L[:, <j] L[j, <j]ᵀ, the
    diagonal block factored by `_factor_diagonal_block`, the rows below it L[>j, j] = panel · L_jj⁻ᵀ
    (`tl.dot`). The sequential part is BLOCK pivots of a [BLOCK, BLOCK] block per block column."""
    rows = tl.arange(0, BR)
    rb = tl.arange(0, BLOCK)
    bad = tl.zeros([], dtype=tl.int32)
    for c0 in tl.range(0, BR, BLOCK, disable_licm=True):
        cols = c0 + rb
        diag = 0.5 * (_tile(gram, c0, c0, n, 1, n, n, BLOCK, BLOCK).to(ACC)
                      + _tile(gram, c0, c0, 1, n, n, n, BLOCK, BLOCK).to(ACC))
        diag += tl.where((rb[:, None] == rb[None, :]) & (cols[:, None] < n), shift, 0.0)
        for k0 in tl.range(0, c0, BLOCK, disable_licm=True):
            l_jk = _tile(lower, c0, k0, BR, 1, BR, BR, BLOCK, BLOCK)
            diag -= _mm(l_jk, tl.trans(l_jk), ACC, DOT_PRECISION)
        _put(diag_inv, diag, c0, 0, BLOCK, 1, BR, BLOCK, BLOCK, BLOCK)
        tl.debug_barrier()
        bad += _factor_diagonal_block(diag_inv + c0 * BLOCK, lower + c0 * BR + c0, n - c0, BR, BLOCK)
        panel = 0.5 * (_tile(gram, 0, c0, n, 1, n, n, BR, BLOCK).to(ACC) + _tile(gram, 0, c0, 1, n, n, n, BR,
                                                                                  BLOCK).to(ACC))
        for k0 in tl.range(0, c0, BLOCK, disable_licm=True):
            panel -= _mm(_tile(lower, 0, k0, BR, 1, BR, BR, BR, BLOCK),
                         tl.trans(_tile(lower, c0, k0, BR, 1, BR, BR, BLOCK, BLOCK)), ACC, DOT_PRECISION)
        x_jj = _tile(diag_inv, c0, 0, BLOCK, 1, BR, BLOCK, BLOCK, BLOCK)
        below = _mm(panel, tl.trans(x_jj), ACC, DOT_PRECISION)
        below = tl.where(rows[:, None] >= c0 + BLOCK, below, 0.0)  # rows above the diagonal block are 0
        keep = (rows < c0) | (rows >= c0 + BLOCK)  # L_jj's rows are written by _factor_diagonal_block
        tl.store(lower + rows[:, None] * BR + cols[None, :], below, mask=keep[:, None])
        tl.debug_barrier()
    return bad


@triton.jit(noinline=True)
def _triangular_inverse_blocked(lower, diag_inv, inverse, n, BR: tl.constexpr, BLOCK: tl.constexpr,
                                ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """X = L⁻¹ by block rows, X_i = L_ii⁻¹ (E_i − Σ_{k<i} L_ik X_k), from `lower` and `diag_inv` as
    `_cholesky_blocked` leaves them; writes X [n, n] (row stride n) to `inverse`. Ends with a barrier."""
    rows = tl.arange(0, BR)
    rb = tl.arange(0, BLOCK)
    for r0 in tl.range(0, BR, BLOCK, disable_licm=True):
        rhs = tl.where((r0 + rb)[:, None] == rows[None, :], 1.0, 0.0).to(ACC)  # E_i
        for k0 in tl.range(0, r0, BLOCK, disable_licm=True):
            rhs -= _mm(_tile(lower, r0, k0, BR, 1, BR, BR, BLOCK, BLOCK),
                       _tile(inverse, k0, 0, n, 1, n, n, BLOCK, BR).to(ACC), ACC, DOT_PRECISION)
        x_rows = _mm(_tile(diag_inv, r0, 0, BLOCK, 1, BR, BLOCK, BLOCK, BLOCK), rhs, ACC, DOT_PRECISION)
        _put(inverse, x_rows, r0, 0, n, 1, n, n, BLOCK, BR)
        tl.debug_barrier()


@triton.jit
def _cholesky_inverse_blocked(gram, shift, lower, inverse, diag_inv, n, BR: tl.constexpr, BLOCK: tl.constexpr,
                              ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """X = L⁻¹ with L Lᵀ = sym(G) + shift·I (`_cholesky_blocked`, then `_triangular_inverse_blocked`): X to
    `inverse` ([n, n], row stride n), L to `lower` ([BR, BR]), the diagonal blocks' inverses to `diag_inv`
    ([BR, BLOCK]); returns the number of failed pivots (X is meaningless when it is not 0)."""
    bad = _cholesky_blocked(gram, shift, lower, diag_inv, n, BR, BLOCK, ACC, DOT_PRECISION)
    _triangular_inverse_blocked(lower, diag_inv, inverse, n, BR, BLOCK, ACC, DOT_PRECISION)
    return bad


@triton.jit
def _workspace(WS, SQUARE_SLOTS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    """This program's workspace: SQUARE_SLOTS [BR, BR] matrices, then two [BP, BR] ones (row stride BR), then a
    statistics row (`_running_row`)."""
    return WS + tl.program_id(0).to(tl.int64) * ((SQUARE_SLOTS + 2) * BR * BR + 3 * BP * BR)


@triton.jit
def _running_row(ws, SQUARE_SLOTS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    """The workspace's flat statistics row (2 r² + P·r of its 2 BR² + BP·BR floats): the visible statistics of
    the chunk in hand when they are recomputed (`_visible_row`)."""
    return ws + SQUARE_SLOTS * BR * BR + 2 * BP * BR


@triton.jit
def _units(NTOTAL, NSLOT, EVERY, READ_OUT: tl.constexpr):
    """(units of work of a dense kernel, blocks per (b, h)): its slots, or with READ_OUT (slots = chunks) the
    blocks of EVERY consecutive chunks of one (b, h), ⌈NSLOT / EVERY⌉ of them."""
    if READ_OUT:
        blocks = tl.cdiv(NSLOT, EVERY)
        units = (NTOTAL // NSLOT) * blocks
    else:
        blocks = NSLOT
        units = NTOTAL
    return units, blocks


@triton.jit
def _walk_range(total, EVERY, READ_OUT: tl.constexpr):
    """(start, stop, stride) of a dense program's one loop over its units of work (units pid, pid + num_programs, …
    of the `_units`): over the units themselves, or with READ_OUT over the EVERY slots of each in turn (one flat
    loop: nested ones made ptxas spill)."""
    if READ_OUT:
        bounds = (0, tl.cdiv(total - tl.program_id(0), tl.num_programs(0)) * EVERY, 1)
    else:
        bounds = (tl.program_id(0), total, tl.num_programs(0))
    return bounds


@triton.jit
def _unit_step(walk_step, blocks, NSLOT, EVERY, READ_OUT: tl.constexpr):
    """(unit, step within it, flat slot, whether the unit has that slot) at `walk_step` of `_walk_range`'s loop."""
    if READ_OUT:
        unit = tl.program_id(0) + (walk_step // EVERY) * tl.num_programs(0) + tl.zeros([], dtype=tl.int64)
        step = walk_step % EVERY
        chunk = (unit % blocks) * EVERY + step
        idx = (unit // blocks) * NSLOT + chunk
        valid = chunk < NSLOT
    else:
        unit = walk_step + tl.zeros([], dtype=tl.int64)  # int64 offsets (an int under the interpreter)
        step = 0
        idx = unit
        valid = True
    return unit, step, idx, valid


@triton.jit(noinline=True)
def _visible_row(STATS, running, unit, step, idx, H, NSLOT, CHUNK_START, CHUNK_END, SEG_BEGIN, K, V, WMASK, R, P,
                 stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd, stride_wb,
                 stride_wt, HAS_MASK: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
                 BN: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The visible statistics (flat row) of chunk slot idx = (b·H + h)·NSLOT + c, the step-th of its block (unit
    `unit`, `_unit_step`): at step 0 the block's row of STATS, as the walk wrote it; after that the workspace's
    running row, advanced from the chunk before (`_advance_visible`: k, v and mask read again, the sum in the
    walk's order), so that the walk writes one row in EVERY."""
    block_start = STATS + unit * (2 * R * R + P * R)
    row = block_start
    if step > 0:
        bh = idx // NSLOT
        b = bh // H
        h = bh % H
        c = idx % NSLOT
        src = running
        if step == 1:
            src = block_start
        fresh = tl.load(CHUNK_START + c) == tl.load(SEG_BEGIN + c)  # the exclusive sum restarts with a sequence
        _advance_visible(src, running, fresh, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                         WMASK + b * stride_wb, tl.load(CHUNK_START + c - 1).to(tl.int64),
                         tl.load(CHUNK_END + c - 1).to(tl.int64), tl.load(SEG_BEGIN + c - 1), R, P, stride_kt,
                         stride_kd, stride_vt, stride_vd, stride_wt, HAS_MASK, BS, BR, BP, BN, ACC, DOT_PRECISION)
        row = running
    return row


@triton.jit
def _square(ws, i: tl.constexpr, SQUARE_SLOTS: tl.constexpr, BR: tl.constexpr):
    """Square workspace matrix i ([BR, BR], row stride BR)."""
    tl.static_assert(i < SQUARE_SLOTS)
    return ws + i * BR * BR


@triton.jit
def _chunk_tokens(idx, H, NSLOT, CHUNK_START, CHUNK_END):
    """(batch row b, head h, first token, one past the last token) of flat slot idx = (b·H + h)·NSLOT + c when
    the slots are chunks (chunk_causal)."""
    c = idx % NSLOT
    return (idx // (H * NSLOT), (idx // NSLOT) % H, tl.load(CHUNK_START + c).to(tl.int64),
            tl.load(CHUNK_END + c).to(tl.int64))


@triton.jit(noinline=True)
def _read_out(Q, Y, RMAT, ETA, CHUNK_START, CHUNK_END, idx, H, NSLOT, R, P,
              stride_qb, stride_qt, stride_qh, stride_qd, stride_yb, stride_yt, stride_yh, stride_yd,
              BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
              DOT_PRECISION: tl.constexpr, HALF_TOKENS: tl.constexpr):
    """`_readout_tokens` (kernels.py) of chunk slot idx from the R this program has just written (L2-resident)."""
    b, h, start, end = _chunk_tokens(idx, H, NSLOT, CHUNK_START, CHUNK_END)
    _readout_tokens(Q + b * stride_qb + h * stride_qh, Y + b * stride_yb + h * stride_yh, RMAT + idx * P * R,
                    tl.load(ETA + h).to(ACC), start, end, R, P, stride_qt, stride_qd, stride_yt, stride_yd,
                    BS, BR, BP, BN, ACC, DOT_PRECISION, HALF_TOKENS)


@triton.jit(noinline=True)
def _read_out_grad(Q, DY, DQ, RMAT, ETA, CHUNK_START, CHUNK_END, d_rmat, idx, H, NSLOT, R, P,
                   stride_qb, stride_qt, stride_qh, stride_qd, stride_yb, stride_yt, stride_yh, stride_yd,
                   stride_dqb, stride_dqt, stride_dqh, stride_dqd, BS: tl.constexpr, BR: tl.constexpr,
                   BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   HALF_TOKENS: tl.constexpr):
    """y = η R q's backward over chunk slot idx (`_readout_grad_columns`, BN columns of r at a time): writes dq
    and dR = η Σ_t dy_t q_tᵀ to `d_rmat` ([P, r], row stride BR); returns ⟨R, Σ_t dy_t q_tᵀ⟩ (dη's share).
    Ends with a barrier."""
    b, h, start, end = _chunk_tokens(idx, H, NSLOT, CHUNK_START, CHUNK_END)
    eta = tl.load(ETA + h).to(ACC)
    d_eta = tl.zeros([], dtype=ACC)
    for n0 in tl.range(0, BR, BN, disable_licm=True):
        outer, readout = _readout_grad_columns(
            Q + b * stride_qb + h * stride_qh, DY + b * stride_yb + h * stride_yh, DQ + b * stride_dqb + h * stride_dqh,
            RMAT + idx * P * R, eta, n0 + tl.arange(0, BN), start, end, R, P, stride_qt, stride_qd, stride_yt,
            stride_yd, stride_dqt, stride_dqd, BS, BR, BP, BN, ACC, DOT_PRECISION, HALF_TOKENS)
        _put(d_rmat, outer * eta, 0, n0, BR, 1, P, R, BP, BN)
        d_eta += _total(readout * outer)
    tl.debug_barrier()
    return d_eta


@triton.jit
def _slot_row(STATS, running, unit, step, idx, H, NSLOT, CHUNK_START, CHUNK_END, SEG_BEGIN, K, V, WMASK, R, P,
              stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd, stride_wb,
              stride_wt, HAS_MASK: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
              BN: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, READ_OUT: tl.constexpr):
    """The visible statistics (flat row) a dense program works on at slot idx: STATS' row idx, or with READ_OUT
    (blocks of chunks) `_visible_row`'s."""
    if READ_OUT:
        row = _visible_row(STATS, running, unit, step, idx, H, NSLOT, CHUNK_START, CHUNK_END, SEG_BEGIN, K, V, WMASK,
                           R, P, stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh,
                           stride_vd, stride_wb, stride_wt, HAS_MASK, BS, BR, BP, BN, ACC, DOT_PRECISION)
    else:
        row = STATS + idx * (2 * R * R + P * R)
    return row


@triton.jit(do_not_specialize=["NSLOT", "NTOTAL", "EVERY"])
def readout_matrix_fwd_kernel(
    STATS, MSLOT, GAMMA, PARAMS, RMAT, LINV, AUX, WS, H, NSLOT, NTOTAL, R, P, SLOT_LIST, SLOT_COUNT,
    Q, ETA, Y, CHUNK_START, CHUNK_END,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_yb, stride_yt, stride_yh, stride_yd,
    K, V, WMASK, SEG_BEGIN, EVERY,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_wb, stride_wt,
    POWER: tl.constexpr, POWER_ITERS: tl.constexpr, NORM_SCALED: tl.constexpr, JITTER_ROUNDS: tl.constexpr,
    SQUARE_SLOTS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, LISTED: tl.constexpr, READ_OUT: tl.constexpr,
    BS: tl.constexpr, BN: tl.constexpr, HALF_TOKENS: tl.constexpr,
    HAS_MASK: tl.constexpr, STATS_BS: tl.constexpr, STATS_BN: tl.constexpr,
):
    """R = C L⁻ᵀ (a W)^K L⁻¹ of each slot (SPEC §2), W = L⁻¹ M L⁻ᵀ, L Lᵀ = G̃ = sym(G) + λI with λ = eps·s
    (NORM_SCALED) or eps (norm="none"), s = m².

    A failed factorisation is retried with G̃ + jitter·s·I in every norm, the jitter starting at PARAMS[1]
    and ×10 per round (as the torch path). Where all JITTER_ROUNDS retries fail — only rounding in hopeless
    conditioning (norm="none" with huge keys) or non-finite input gets there — a last retry adds
    PARAMS[1]·max_i G̃_ii (a constant here: no gradient), so that finite input gives finite R; R is NaN
    (as in the torch path) only if that fails too. σ from POWER_ITERS power-iteration steps (no gradient),
    a = γ̂ / max(1, σ); the filter is applied as (aW)^K, which cannot overflow where W^K would. Writes
    LINV = L⁻¹ and AUX = (max(1, σ), ridge coefficient of s) for the backward. Persistent: program p
    handles slots p, p + num_programs, … of the NTOTAL = B·H·NSLOT. With LISTED only the SLOT_COUNT[0] slots
    listed in SLOT_LIST (flat indices, read on the device: the decode step's chunk completions) are
    computed; their L⁻¹ stays in the workspace and AUX is not written (nobody reads them then).
    With READ_OUT (slots = chunks, chunk_causal) the program also reads its chunk out, y_t = η R q_t for q, y
    [B, T, H, ·] (strided, token ranges CHUNK_START/END; BS tokens and BN outputs at a time), from the R it
    has just written; and its units of work are blocks of EVERY consecutive chunks of one (b, h), STATS holding
    only each block's first visible statistics [B·H, ⌈NSLOT / EVERY⌉, D] (`_visible_row`: the others are
    recomputed from k, v and the mask, strided [B, T, H, ·] and [B, T]).
    """
    ws = _workspace(WS, SQUARE_SLOTS, BR, BP)
    lower = _square(ws, 0, SQUARE_SLOTS, BR)
    diag_inv = _square(ws, 1, SQUARE_SLOTS, BR)
    lag_x = _square(ws, 2, SQUARE_SLOTS, BR)
    whitened = _square(ws, 3, SQUARE_SLOTS, BR)
    vec = _square(ws, 4, SQUARE_SLOTS, BR)  # the power iteration's vectors, where W is wider than a register tile
    filtered = (ws + SQUARE_SLOTS * BR * BR, ws + SQUARE_SLOTS * BR * BR + BP * BR)  # C Xᵀ (aW)^k, ping-pong
    running = _running_row(ws, SQUARE_SLOTS, BR, BP)
    inside = tl.arange(0, BR) < R
    total, blocks = _units(NTOTAL, NSLOT, EVERY, READ_OUT)
    if LISTED:
        total = tl.load(SLOT_COUNT)
    start, stop, stride = _walk_range(total, EVERY, READ_OUT)
    for walk_step in range(start, stop, stride):
        unit, step, idx, valid = _unit_step(walk_step, blocks, NSLOT, EVERY, READ_OUT)
        if valid:
            if LISTED:
                idx = tl.load(SLOT_LIST + unit).to(tl.int64)
                chol_inv = _square(ws, 5, SQUARE_SLOTS, BR)  # L⁻¹ (row stride R) stays in the workspace
            else:
                chol_inv = LINV + idx * R * R
            h = (idx // NSLOT) % H
            row = _slot_row(STATS, running, unit, step, idx, H, NSLOT, CHUNK_START, CHUNK_END, SEG_BEGIN, K, V, WMASK,
                            R, P, stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
                            stride_wb, stride_wt, HAS_MASK, STATS_BS, BR, BP, STATS_BN, ACC, DOT_PRECISION, READ_OUT)
            s = _norm_scale(MSLOT, idx, PARAMS, ACC)
            eps = tl.load(PARAMS).to(ACC)
            if NORM_SCALED:  # coef: the coefficient of s in the diagonal shift (saved for the max-norm gradient)
                coef = eps
                ridge = eps * s
            else:
                coef = tl.zeros([], dtype=ACC)
                ridge = eps
            # attempt 0: G̃; attempts 1…JITTER_ROUNDS: + jitter·s·I, jitter ×10 each; then the last resort
            jitter = tl.load(PARAMS + 1)
            added = tl.zeros([], dtype=ACC)
            shift = ridge
            bad = tl.full([], 1, dtype=tl.int32)
            for attempt in range(JITTER_ROUNDS + 2):
                if bad > 0:
                    if attempt == JITTER_ROUNDS + 1:  # last resort where the torch path raises: relative to max G̃_ii
                        i = tl.arange(0, BR)
                        largest = tl.max(tl.load(row + i * (R + 1), mask=inside, other=0.0).to(ACC), axis=0) + ridge
                        shift = ridge + added * s + tl.load(PARAMS + 1) * largest
                    elif attempt > 0:
                        added = jitter
                        shift = ridge + jitter * s
                        jitter = jitter * 10.0
                    bad = _cholesky_inverse_blocked(row, shift, lower, chol_inv, diag_inv, R, BR, BLOCK, ACC,
                                                    DOT_PRECISION)
            coef += added
            if bad > 0:
                _fill(chol_inv, R, R, R, float("nan"), BR, BR, TILE)
            # W = X M Xᵀ
            _product(chol_inv, R, 1, row + R * R, R, 1, lag_x, BR, 1, lag_x, 0, 0, R, R, R, 1.0,
                     False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
            _product(lag_x, BR, 1, chol_inv, 1, R, whitened, BR, 1, lag_x, 0, 0, R, R, R, 1.0,
                     False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
            # σ_max(W) by power iteration from 1/√r·(1, …, 1), no gradient (SPEC §2 step 4)
            sigma = tl.maximum(_spectral_norm(whitened, R, tl.load(PARAMS + 3), vec, POWER_ITERS, BR, TILE, ACC),
                               1.0)
            a = tl.load(GAMMA + h).to(ACC) / sigma
            _product(row + 2 * R * R, R, 1, chol_inv, 1, R, filtered[0], BR, 1, lag_x, 0, 0, P, R, R, 1.0,
                     False, False, BP, BR, BR, TILE, ACC, DOT_PRECISION)  # C Xᵀ
            for k in tl.static_range(POWER):
                _product(filtered[k % 2], BR, 1, whitened, BR, 1, filtered[1 - k % 2], BR, 1, lag_x, 0, 0, P, R, R, a,
                         False, False, BP, BR, BR, TILE, ACC, DOT_PRECISION)
            _product(filtered[POWER % 2], BR, 1, chol_inv, R, 1, RMAT + idx * P * R, R, 1, lag_x, 0, 0, P, R, R, 1.0,
                     False, False, BP, BR, BR, TILE, ACC, DOT_PRECISION)
            if READ_OUT:
                _read_out(Q, Y, RMAT, ETA, CHUNK_START, CHUNK_END, idx, H, NSLOT, R, P, stride_qb, stride_qt, stride_qh,
                          stride_qd, stride_yb, stride_yt, stride_yh, stride_yd, BS, BR, BP, BN, ACC, DOT_PRECISION,
                          HALF_TOKENS)
            if not LISTED:
                tl.store(AUX + idx * 2, sigma)
                tl.store(AUX + idx * 2 + 1, coef)


@triton.jit(do_not_specialize=["NSLOT", "NTOTAL", "EVERY"])
def readout_matrix_bwd_kernel(
    STATS, MSLOT, GAMMA, PARAMS, LINV, AUX, DRMAT, DSTATS, DMSLOT, DGAMMA, WS, H, NSLOT, NTOTAL, R, P,
    Q, ETA, RMAT, DY, DQ, DETA, CHUNK_START, CHUNK_END,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_yb, stride_yt, stride_yh, stride_yd,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    K, V, WMASK, SEG_BEGIN, EVERY,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_wb, stride_wt,
    POWER: tl.constexpr, SQUARE_SLOTS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, TILE: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, READ_OUT: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
    HALF_TOKENS: tl.constexpr, HAS_MASK: tl.constexpr, STATS_BS: tl.constexpr, STATS_BN: tl.constexpr,
):
    """Gradients of each slot's R = T_K X in the whitened form of the forward: X = L⁻¹, A = a W with
    W = X M Xᵀ, T_0 = C Xᵀ, T_k = T_{k-1} A — every intermediate stays O(1) (σ(W) <= 1).

    With V = Aᵀ, Q = X (Cᵀ dR), E = Q Xᵀ, Horner H_1 = E, P_1 = V, H_{j+1} = V H_j + E P_j, P_{j+1} = P_j V:
      dA = H_K,  dW = a dA,  dγ̂ = ⟨dA, W⟩ / max(1, σ),  dM = Xᵀ dW X,  dC = dR (Xᵀ V^K X),
      dX = V^K Q + dW X Mᵀ + dWᵀ X M + (V^K)ᵀ X (Cᵀ dR)ᵀ,
      dG̃ = -sym(Xᵀ Φ(dX Xᵀ) X)  (Cholesky backward; Φ = lower triangle, halved diagonal),
      dG = dG̃,  d(raw max norm) = tr(dG̃)·coef·2m (0 below the floor)
    (σ is a constant). Writes DSTATS = (dG, dM, dC), DMSLOT and DGAMMA. Persistent, as the forward.
    dR is DRMAT's row, or with READ_OUT (slots = chunks) the program first takes the readout's backward of its
    chunk (`_read_out_grad`: dq into DQ, dR into its workspace, ⟨R, dR⟩/η into DETA) from q, R = RMAT and dy,
    and takes blocks of EVERY chunks from their first visible statistics, as the forward.
    """
    ws = _workspace(WS, SQUARE_SLOTS, BR, BP)
    ct_dr = _square(ws, 0, SQUARE_SLOTS, BR)
    q_mat = _square(ws, 1, SQUARE_SLOTS, BR)
    scratch = _square(ws, 2, SQUARE_SLOTS, BR)
    whitened = _square(ws, 3, SQUARE_SLOTS, BR)
    e_mat = _square(ws, 4, SQUARE_SLOTS, BR)
    v_mat = _square(ws, 5, SQUARE_SLOTS, BR)
    horner = (_square(ws, 6, SQUARE_SLOTS, BR), _square(ws, 7, SQUARE_SLOTS, BR))
    v_pow = (_square(ws, 8, SQUARE_SLOTS, BR), _square(ws, 9, SQUARE_SLOTS, BR))
    e_v_pow = _square(ws, 10, SQUARE_SLOTS, BR)
    d_x = (_square(ws, 11, SQUARE_SLOTS, BR), _square(ws, 12, SQUARE_SLOTS, BR))
    u_mat = _square(ws, 13, SQUARE_SLOTS, BR)
    d_readout = ws + SQUARE_SLOTS * BR * BR  # dR with READ_OUT ([BP, BR])
    running = _running_row(ws, SQUARE_SLOTS, BR, BP)
    total, blocks = _units(NTOTAL, NSLOT, EVERY, READ_OUT)
    start, stop, stride = _walk_range(total, EVERY, READ_OUT)
    for walk_step in range(start, stop, stride):
        unit, step, idx, valid = _unit_step(walk_step, blocks, NSLOT, EVERY, READ_OUT)
        if valid:
            h = (idx // NSLOT) % H
            row = _slot_row(STATS, running, unit, step, idx, H, NSLOT, CHUNK_START, CHUNK_END, SEG_BEGIN, K, V, WMASK,
                            R, P, stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
                            stride_wb, stride_wt, HAS_MASK, STATS_BS, BR, BP, STATS_BN, ACC, DOT_PRECISION, READ_OUT)
            out = DSTATS + idx * (2 * R * R + P * R)
            x = LINV + idx * R * R
            if READ_OUT:
                d_eta = _read_out_grad(Q, DY, DQ, RMAT, ETA, CHUNK_START, CHUNK_END, d_readout, idx, H, NSLOT, R, P,
                                       stride_qb, stride_qt, stride_qh, stride_qd, stride_yb, stride_yt, stride_yh,
                                       stride_yd, stride_dqb, stride_dqt, stride_dqh, stride_dqd, BS, BR, BP, BN, ACC,
                                       DOT_PRECISION, HALF_TOKENS)
                tl.store(DETA + idx, d_eta)
                d_r = d_readout
                dr_stride = BR
            else:
                d_r = DRMAT + idx * P * R
                dr_stride = R
            sigma = tl.load(AUX + idx * 2)
            a = tl.load(GAMMA + h).to(ACC) / sigma
            _product(row + 2 * R * R, 1, R, d_r, dr_stride, 1, ct_dr, BR, 1, x, 0, 0, R, R, P, 1.0,
                     False, False, BR, BR, BP, TILE, ACC, DOT_PRECISION)  # Cᵀ dR
            _product(x, R, 1, ct_dr, BR, 1, q_mat, BR, 1, x, 0, 0, R, R, R, 1.0,
                     False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)  # Q
            if POWER > 0:
                _product(x, R, 1, row + R * R, R, 1, scratch, BR, 1, x, 0, 0, R, R, R, 1.0,
                         False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
                _product(scratch, BR, 1, x, 1, R, whitened, BR, 1, x, 0, 0, R, R, R, 1.0,
                         False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)  # W
                _product(q_mat, BR, 1, x, 1, R, e_mat, BR, 1, x, 0, 0, R, R, R, 1.0,
                         False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)  # E
                _transpose_add(whitened, BR, v_mat, BR, R, 0.0, a, BR, TILE)  # V = a Wᵀ
                h_cur = e_mat
                p_cur = v_mat
                for j in tl.static_range(POWER - 1):
                    _product(e_mat, BR, 1, p_cur, BR, 1, e_v_pow, BR, 1, x, 0, 0, R, R, R, 1.0,
                             False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
                    _product(v_mat, BR, 1, h_cur, BR, 1, horner[j % 2], BR, 1, e_v_pow, BR, 1, R, R, R, 1.0,
                             True, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)  # H ← V H + E P
                    _product(p_cur, BR, 1, v_mat, BR, 1, v_pow[j % 2], BR, 1, x, 0, 0, R, R, R, 1.0,
                             False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)  # P ← P V
                    h_cur = horner[j % 2]
                    p_cur = v_pow[j % 2]
                d_gamma = _inner(h_cur, BR, whitened, BR, R, BR, TILE, ACC) / sigma
                # dM = Xᵀ dW X with dW = a H
                _product(x, 1, R, h_cur, BR, 1, scratch, BR, 1, x, 0, 0, R, R, R, a,
                         False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
                _product(scratch, BR, 1, x, R, 1, out + R * R, R, 1, x, 0, 0, R, R, R, 1.0,
                         False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
                # dX = V^K Q + dW X Mᵀ + dWᵀ X M + (V^K)ᵀ X (Cᵀ dR)ᵀ, accumulated in d_x[0] / d_x[1] in turn
                _product(p_cur, BR, 1, q_mat, BR, 1, d_x[0], BR, 1, x, 0, 0, R, R, R, 1.0,
                         False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
                _product(h_cur, BR, 1, x, R, 1, scratch, BR, 1, x, 0, 0, R, R, R, a,
                         False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
                _product(scratch, BR, 1, row + R * R, 1, R, d_x[1], BR, 1, d_x[0], BR, 1, R, R, R, 1.0,
                         True, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
                _product(h_cur, 1, BR, x, R, 1, scratch, BR, 1, x, 0, 0, R, R, R, a,
                         False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
                _product(scratch, BR, 1, row + R * R, R, 1, d_x[0], BR, 1, d_x[1], BR, 1, R, R, R, 1.0,
                         True, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
                _product(p_cur, 1, BR, x, R, 1, scratch, BR, 1, x, 0, 0, R, R, R, 1.0,
                         False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)  # (V^K)ᵀ X
                _product(scratch, BR, 1, ct_dr, 1, BR, d_x[1], BR, 1, d_x[0], BR, 1, R, R, R, 1.0,
                         True, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
                _product(scratch, 1, BR, x, R, 1, u_mat, BR, 1, x, 0, 0, R, R, R, 1.0,
                         False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)  # U = Xᵀ V^K X
            else:
                d_gamma = tl.zeros([], dtype=ACC)
                _fill(out + R * R, R, R, R, 0.0, BR, BR, TILE)
                _product(x, R, 1, ct_dr, 1, BR, d_x[1], BR, 1, q_mat, BR, 1, R, R, R, 1.0,
                         True, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)  # dX = Q + X (Cᵀ dR)ᵀ
                _product(x, 1, R, x, R, 1, u_mat, BR, 1, x, 0, 0, R, R, R, 1.0,
                         False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)  # U = Xᵀ X
            _product(d_r, dr_stride, 1, u_mat, BR, 1, out + 2 * R * R, R, 1, x, 0, 0, P, R, R, 1.0,
                     False, False, BP, BR, BR, TILE, ACC, DOT_PRECISION)  # dC = dR U
            phi = d_x[0]
            _product(d_x[1], BR, 1, x, 1, R, phi, BR, 1, x, 0, 0, R, R, R, 1.0,
                     False, True, BR, BR, BR, TILE, ACC, DOT_PRECISION)  # Φ(dX Xᵀ)
            _product(x, 1, R, phi, BR, 1, scratch, BR, 1, x, 0, 0, R, R, R, 1.0,
                     False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)
            _product(scratch, BR, 1, x, R, 1, u_mat, BR, 1, x, 0, 0, R, R, R, 1.0,
                     False, False, BR, BR, BR, TILE, ACC, DOT_PRECISION)  # Xᵀ Φ X
            _transpose_add(u_mat, BR, out, R, R, -0.5, -0.5, BR, TILE)  # dG = dG̃ = -sym(Xᵀ Φ X)
            tl.store(DGAMMA + idx, d_gamma)
            trace = -_trace(u_mat, BR, R, BR, ACC)
            m_raw = tl.load(MSLOT + idx).to(ACC)
            coef = tl.load(AUX + idx * 2 + 1)
            tl.store(DMSLOT + idx, tl.where(m_raw >= tl.load(PARAMS + 2), trace * coef * 2.0 * m_raw, 0.0))
