"""Triton kernel of one SKA decode step (SPEC §4): the read y = η R q and the write into the partial sums.

Loaded by `runtime.py` after `kernels.py` and `dense.py` (one namespace); do not import it directly.
One program per (batch row, head) walks row blocks of BN rows of R and C (P rows) and of G and M (r rows),
so registers hold at most a few [BN, BR] tiles whatever r is. Per program, in ACC (fp32; fp64 for fp64):

    y = η_h R q;  G_p += k kᵀ;  M_p += k last_keyᵀ;  C_p += v kᵀ;  m_p = max(m_p, ‖k‖);  last_key = k

and, where the token completes its chunk (`fold`), the fold: completed += partial, partial = 0,
m_c = max(m_c, m_p) — the readout matrix R is then recomputed by the dense kernel (`dense.py`).

* State tensors are addressed per (slot, head) `sh = slot·H + h` through a flat stride per tensor
  (G, M, C may be separate contiguous tensors or views into one [.., 2r² + P·r] statistics row); a batch
  row's slot is its index, or ROWS[row] (HAS_ROWS: requests in slots of a larger buffer).
* The position in the chunk is uniform (FOLD, a constexpr, says whether this token completes the chunk)
  or per row (PER_ROW: TOKENS[sh] counts the tokens seen by (slot, head); this program reads and
  advances its own counter, so no other program reads it). With PER_ROW every folding (slot, head)
  appends `sh` to FOLD_LIST (FOLD_COUNT counts them, atomically) for the dense kernel's recompute.
* Reads come from the "in" state, writes go to the "out" state: the same tensors (in place, PER_ROW) or
  fresh ones (a new state, the old one unchanged); each entry is read and then written by one program.
"""

import triton
import triton.language as tl

if False:  # for readers and linters: this comes from dense.py's namespace (see runtime.py)
    from .dense import _sqrt_ieee  # noqa: F401


@triton.jit
def _matrix_rows(ptr, row0, n_rows, n_cols, BN: tl.constexpr, BC: tl.constexpr):
    """Pointers and mask of rows row0 … row0 + BN of a row-major [n_rows, n_cols] matrix padded to BC columns."""
    rows = row0 + tl.arange(0, BN)
    cols = tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return ptr + rows[:, None] * n_cols + cols[None, :], mask


@triton.jit
def _accumulate(P_IN, P_OUT, C_IN, C_OUT, row0, n_rows, n_cols, left, right, fold, BN: tl.constexpr,
                BC: tl.constexpr, ACC: tl.constexpr):
    """Rows row0 … row0 + BN of partial += left rightᵀ (left: those rows' entries [BN], right [BC]); on fold
    completed += partial and partial = 0."""
    p_in, mask = _matrix_rows(P_IN, row0, n_rows, n_cols, BN, BC)
    p_out, _ = _matrix_rows(P_OUT, row0, n_rows, n_cols, BN, BC)
    partial = tl.load(p_in, mask=mask, other=0.0).to(ACC) + left[:, None] * right[None, :]
    if fold:
        c_in, _ = _matrix_rows(C_IN, row0, n_rows, n_cols, BN, BC)
        c_out, _ = _matrix_rows(C_OUT, row0, n_rows, n_cols, BN, BC)
        tl.store(c_out, tl.load(c_in, mask=mask, other=0.0).to(ACC) + partial, mask=mask)
        partial = tl.zeros([BN, BC], dtype=ACC)
    tl.store(p_out, partial, mask=mask)


@triton.jit
def decode_step_kernel(
    Q, K, V, ETA, Y, ROWS, TOKENS, FOLD_LIST, FOLD_COUNT,
    RMAT, G_IN, M_IN, C_IN, MAX_IN, LAST_IN, CG_IN, CM_IN, CC_IN, CMAX_IN,
    G_OUT, M_OUT, C_OUT, MAX_OUT, LAST_OUT, CG_OUT, CM_OUT, CC_OUT, CMAX_OUT,
    H, R, P, CHUNK,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_yb, s_yh,
    s_rmat, s_g, s_m, s_c, s_cg, s_cm, s_cc, s_go, s_mo, s_co, s_cgo, s_cmo, s_cco,
    HAS_ROWS: tl.constexpr, PER_ROW: tl.constexpr, FOLD: tl.constexpr,
    BR: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
):
    """One token for every (batch row, head): grid (B·H,). q, k [B, H, r], v [B, H, P] through (batch, head)
    strides; y [B, H, P] (q's dtype); η [H]. State: R, G, M, C [slots·H, ·, r] through a flat stride per
    (slot, head); key-norm maxima [slots·H], last keys [slots·H, r] contiguous. See the module docstring."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    slot = b.to(tl.int64)
    if HAS_ROWS:
        slot = tl.load(ROWS + b).to(tl.int64)
    sh = slot * H + h
    if PER_ROW:
        seen = tl.load(TOKENS + sh)
        fold = seen % CHUNK == CHUNK - 1
        tl.store(TOKENS + sh, seen + 1)
    else:
        fold = FOLD
    r_cols = tl.arange(0, BR)
    p_cols = tl.arange(0, BP)
    q = tl.load(Q + b * s_qb + h * s_qh + r_cols, mask=r_cols < R, other=0.0).to(ACC)
    k = tl.load(K + b * s_kb + h * s_kh + r_cols, mask=r_cols < R, other=0.0).to(ACC)
    last = tl.load(LAST_IN + sh * R + r_cols, mask=r_cols < R, other=0.0).to(ACC)
    eta = tl.load(ETA + h).to(ACC)
    # the value rows: y = η R q (read) and C += v kᵀ (write)
    for row0 in range(0, P, BN):
        rows = row0 + tl.arange(0, BN)
        r_ptr, r_mask = _matrix_rows(RMAT + sh * s_rmat, row0, P, R, BN, BR)
        y = tl.sum(tl.load(r_ptr, mask=r_mask, other=0.0).to(ACC) * q[None, :], axis=1) * eta
        tl.store(Y + b * s_yb + h * s_yh + rows, y.to(Y.dtype.element_ty), mask=rows < P)
        v = tl.load(V + b * s_vb + h * s_vh + rows, mask=rows < P, other=0.0).to(ACC)
        _accumulate(C_IN + sh * s_c, C_OUT + sh * s_co, CC_IN + sh * s_cc, CC_OUT + sh * s_cco, row0, P, R, v, k,
                    fold, BN, BR, ACC)
    # the key rows: G += k kᵀ, M += k last_keyᵀ
    for row0 in range(0, R, BN):
        rows = row0 + tl.arange(0, BN)
        k_rows = tl.load(K + b * s_kb + h * s_kh + rows, mask=rows < R, other=0.0).to(ACC)
        _accumulate(G_IN + sh * s_g, G_OUT + sh * s_go, CG_IN + sh * s_cg, CG_OUT + sh * s_cgo, row0, R, R, k_rows,
                    k, fold, BN, BR, ACC)
        _accumulate(M_IN + sh * s_m, M_OUT + sh * s_mo, CM_IN + sh * s_cm, CM_OUT + sh * s_cmo, row0, R, R, k_rows,
                    last, fold, BN, BR, ACC)
    m = tl.maximum(tl.load(MAX_IN + sh).to(ACC), _sqrt_ieee(tl.sum(k * k, axis=0)))
    if fold:
        tl.store(CMAX_OUT + sh, tl.maximum(tl.load(CMAX_IN + sh).to(ACC), m))
        m = tl.zeros([], dtype=ACC)
        if PER_ROW:
            tl.store(FOLD_LIST + tl.atomic_add(FOLD_COUNT, 1), sh)
    tl.store(MAX_OUT + sh, m)
    tl.store(LAST_OUT + sh * R + r_cols, k, mask=r_cols < R)
