"""Triton kernels for RoPE-box attention on the packed qkv of DINOv3 (flash-attention-2 style).

qkv is the (B, N, 3C) output of the qkv linear, C = H·Dh; element (b, n, which, h, d) lives at
b·stride_b + n·stride_n + which·C + h·Dh + d and is read in place. Tokens n >= P (P = num_prefix_tokens: CLS and
registers) are patches and get RoPE on q and k, with sin/cos row n - P:

    rope(x) = x·cos + rotate_half(x)·sin,  rotate_half(x) = (-x₂, x₁)   (x₁, x₂ the two halves of the head dim)

computed in fp32 and cast back to the input dtype (as the official eager path does), then softmax(q kᵀ·scale) v.

Each tile is loaded as its two halves, so the rotation is elementwise and q kᵀ = q₁ k₁ᵀ + q₂ k₂ᵀ is two dots; a q
tile is rotated once per program and a k tile once per load. Half tiles are padded to a power of two >= 16 (the
smallest tl.dot), which is what allows any head dim that is a multiple of 16.

Forward: online softmax in base 2 and the natural-log logsumexp per row, lse = log Σ_j exp(s_ij·scale), saved for
backward as (B, H, N) fp32. Backward: Delta_i = Σ_d dO_id·O_id, then one pass per k tile (dK, dV) and one per q
tile (dQ), with dS = P∘(dP - Delta). The gradients of the rotated q and k go through the transposed rotation

    d x₁ = g₁·cos₁ + g₂·sin₂,  d x₂ = g₂·cos₂ - g₁·sin₁

and are written straight into the packed (B, N, 3C) gradient.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_precision, mma

LOG2E = 1.4426950408889634


# ---- helpers -----------------------------------------------------------------------------------------------------
@triton.jit
def _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                 TIED: tl.constexpr):
    """cos/sin of both halves for token rows (BLOCK,), as (BLOCK, BLOCK_H) fp32, and the rows that rotate.

    TIED: the table is (H·W, Dh/2), both halves sharing their angles (the DINOv3 layout): half the bytes to load.
    """
    pos = rows - num_prefix
    rot = (pos >= 0) & (rows < N)
    pos = tl.where(rot, pos, 0)
    m = rot[:, None] & (cols < HALF)[None, :]
    if TIED:
        off = pos[:, None] * HALF + cols[None, :]
        c1 = tl.load(COS + off, mask=m, other=1.0)
        s1 = tl.load(SIN + off, mask=m, other=0.0)
        c2 = c1
        s2 = s1
    else:
        off = pos[:, None] * HEAD_DIM + cols[None, :]
        c1 = tl.load(COS + off, mask=m, other=1.0)
        s1 = tl.load(SIN + off, mask=m, other=0.0)
        c2 = tl.load(COS + off + HALF, mask=m, other=1.0)
        s2 = tl.load(SIN + off + HALF, mask=m, other=0.0)
    return c1, s1, c2, s2, rot


@triton.jit
def _load_rotated(ptr, mrow, cols, SIN, COS, rows, N, num_prefix, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                  TIED: tl.constexpr):
    """Loads the halves of a (BLOCK, Dh) tile (ptr: (BLOCK, 1) row pointers) and applies RoPE to patch rows.

    The rotation runs in fp32 and is cast back to the input dtype; prefix rows pass through untouched.
    """
    m = mrow[:, None] & (cols < HALF)[None, :]
    x1 = tl.load(ptr + cols[None, :], mask=m, other=0.0)
    x2 = tl.load(ptr + HALF + cols[None, :], mask=m, other=0.0)
    c1, s1, c2, s2, rot = _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF, HEAD_DIM, TIED)
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    r1 = (a1 * c1 - a2 * s1).to(x1.dtype)
    r2 = (a2 * c2 + a1 * s2).to(x2.dtype)
    r1 = tl.where(rot[:, None], r1, x1)
    r2 = tl.where(rot[:, None], r2, x2)
    return r1, r2


@triton.jit
def _store_unrotated(ptr, g1, g2, mrow, cols, SIN, COS, rows, N, num_prefix, HALF: tl.constexpr,
                     HEAD_DIM: tl.constexpr, TIED: tl.constexpr):
    """Stores the gradient w.r.t. the unrotated tile given fp32 gradients (g1, g2) w.r.t. the rotated halves."""
    c1, s1, c2, s2, rot = _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF, HEAD_DIM, TIED)
    d1 = tl.where(rot[:, None], g1 * c1 + g2 * s2, g1)
    d2 = tl.where(rot[:, None], g2 * c2 - g1 * s1, g2)
    m = mrow[:, None] & (cols < HALF)[None, :]
    dtype = ptr.dtype.element_ty
    tl.store(ptr + cols[None, :], d1.to(dtype), mask=m)
    tl.store(ptr + HALF + cols[None, :], d2.to(dtype), mask=m)


# ---- forward -----------------------------------------------------------------------------------------------------
@triton.jit
def _rope_attention_fwd_kernel(
    QKV, SIN, COS, OUT, LSE,
    stride_b, stride_n, stride_ob, stride_on,
    N, H, C, num_prefix, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)  # grid (tiles, H, B): each axis within CUDA's limits
    b = (bh // H).to(tl.int64)
    h = bh % H
    base = QKV + b * stride_b + h * HEAD_DIM
    cols_h = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    mcol_d = cols_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = rows < N
    q1, q2 = _load_rotated(base + rows.to(tl.int64)[:, None] * stride_n, mrow, cols_h, SIN, COS, rows, N,
                           num_prefix, HALF, HEAD_DIM, TIED)

    # Invariant: m_i = max_j s_ij·scale·log2(e) over the keys seen, l_i = Σ_j 2^(s_ij·scale·log2(e) - m_i),
    # acc = Σ_j 2^(...) v_j.
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        mkey = keys < N
        krow = keys.to(tl.int64)[:, None] * stride_n
        k1, k2 = _load_rotated(base + C + krow, mkey, cols_h, SIN, COS, keys, N, num_prefix, HALF, HEAD_DIM,
                               TIED)
        s = mma(q1, tl.trans(k1), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IS_FP32, PRECISION)
        s = mma(q2, tl.trans(k2), s, IS_FP32, PRECISION)
        s = tl.where(mkey[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(base + 2 * C + krow + cols_d[None, :], mask=mkey[:, None] & mcol_d[None, :], other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], IS_FP32, PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptr = OUT + b * stride_ob + rows.to(tl.int64)[:, None] * stride_on + h * HEAD_DIM + cols_d[None, :]
    tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=mrow[:, None] & mcol_d[None, :])
    tl.store(LSE + bh.to(tl.int64) * N + rows, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=mrow)


# ---- backward ----------------------------------------------------------------------------------------------------
@triton.jit
def _rope_attention_bwd_delta_kernel(
    OUT, DOUT, DELTA,
    stride_ob, stride_on, stride_db, stride_dn,
    N, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Delta_i = Σ_d dO_id·O_id = Σ_j P_ij dP_ij, the row term of the softmax backward.
    pid_m = tl.program_id(0)
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)  # grid (tiles, H, B): each axis within CUDA's limits
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    m = (rows < N)[:, None] & (cols < HEAD_DIM)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    o = tl.load(OUT + b * stride_ob + r64 * stride_on + h * HEAD_DIM + cols[None, :], mask=m, other=0.0)
    do = tl.load(DOUT + b * stride_db + r64 * stride_dn + h * HEAD_DIM + cols[None, :], mask=m, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, delta, mask=rows < N)


@triton.jit
def _rope_attention_bwd_dkdv_kernel(
    QKV, SIN, COS, DOUT, LSE, DELTA, DQKV,
    stride_b, stride_n, stride_db, stride_dn, stride_gb, stride_gn,
    N, H, C, num_prefix, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program owns BLOCK_N keys and sweeps all queries, in the transposed frame (keys on rows):
    # dV = Pᵀ dO,  dSᵀ = Pᵀ∘(V dOᵀ - Delta),  dK_rot = scale·dSᵀ Q_rot.
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_n = tl.program_id(0)
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)  # grid (tiles, H, B): each axis within CUDA's limits
    b = (bh // H).to(tl.int64)
    h = bh % H
    base = QKV + b * stride_b + h * HEAD_DIM
    do_base = DOUT + b * stride_db + h * HEAD_DIM
    lse_base = LSE + bh.to(tl.int64) * N
    delta_base = DELTA + bh.to(tl.int64) * N
    cols_h = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    mcol_d = cols_d < HEAD_DIM

    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mkey = keys < N
    krow = keys.to(tl.int64)[:, None]
    k1, k2 = _load_rotated(base + C + krow * stride_n, mkey, cols_h, SIN, COS, keys, N, num_prefix, HALF,
                           HEAD_DIM, TIED)
    v = tl.load(base + 2 * C + krow * stride_n + cols_d[None, :], mask=mkey[:, None] & mcol_d[None, :], other=0.0)

    dk1 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    dk2 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        mrow = rows < N
        r64 = rows.to(tl.int64)[:, None]
        q1, q2 = _load_rotated(base + r64 * stride_n, mrow, cols_h, SIN, COS, rows, N, num_prefix, HALF,
                               HEAD_DIM, TIED)
        do = tl.load(do_base + r64 * stride_dn + cols_d[None, :], mask=mrow[:, None] & mcol_d[None, :], other=0.0)
        lse = tl.load(lse_base + rows, mask=mrow, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=mrow, other=0.0)
        st = mma(k1, tl.trans(q1), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IS_FP32, PRECISION)
        st = mma(k2, tl.trans(q2), st, IS_FP32, PRECISION)
        # Padding queries would read lse = 0 and contribute 2^s: zero them.
        pt = tl.where(mrow[None, :], tl.math.exp2(st * qk_scale - lse[None, :]), 0.0)
        dv = mma(pt.to(do.dtype), do, dv, IS_FP32, PRECISION)
        dpt = mma(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IS_FP32, PRECISION)
        dst = (pt * (dpt - delta[None, :])).to(q1.dtype)
        dk1 = mma(dst, q1, dk1, IS_FP32, PRECISION)
        dk2 = mma(dst, q2, dk2, IS_FP32, PRECISION)

    g_base = DQKV + b * stride_gb + krow * stride_gn + h * HEAD_DIM
    _store_unrotated(g_base + C, dk1 * sm_scale, dk2 * sm_scale, mkey, cols_h, SIN, COS, keys, N, num_prefix,
                     HALF, HEAD_DIM, TIED)
    tl.store(g_base + 2 * C + cols_d[None, :], dv.to(DQKV.dtype.element_ty), mask=mkey[:, None] & mcol_d[None, :])


@triton.jit
def _rope_attention_bwd_dq_kernel(
    QKV, SIN, COS, DOUT, LSE, DELTA, DQKV,
    stride_b, stride_n, stride_db, stride_dn, stride_gb, stride_gn,
    N, H, C, num_prefix, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program owns BLOCK_M queries and sweeps all keys: dQ_rot = scale·(P∘(dO Vᵀ - Delta)) K_rot.
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)  # grid (tiles, H, B): each axis within CUDA's limits
    b = (bh // H).to(tl.int64)
    h = bh % H
    base = QKV + b * stride_b + h * HEAD_DIM
    cols_h = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    mcol_d = cols_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = rows < N
    r64 = rows.to(tl.int64)[:, None]
    q1, q2 = _load_rotated(base + r64 * stride_n, mrow, cols_h, SIN, COS, rows, N, num_prefix, HALF, HEAD_DIM,
                           TIED)
    do = tl.load(DOUT + b * stride_db + r64 * stride_dn + h * HEAD_DIM + cols_d[None, :],
                 mask=mrow[:, None] & mcol_d[None, :], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=mrow, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=mrow, other=0.0)

    dq1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    dq2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        mkey = keys < N
        krow = keys.to(tl.int64)[:, None] * stride_n
        k1, k2 = _load_rotated(base + C + krow, mkey, cols_h, SIN, COS, keys, N, num_prefix, HALF, HEAD_DIM,
                               TIED)
        v = tl.load(base + 2 * C + krow + cols_d[None, :], mask=mkey[:, None] & mcol_d[None, :], other=0.0)
        s = mma(q1, tl.trans(k1), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IS_FP32, PRECISION)
        s = mma(q2, tl.trans(k2), s, IS_FP32, PRECISION)
        p = tl.where(mkey[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = mma(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IS_FP32, PRECISION)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = mma(ds, k1, dq1, IS_FP32, PRECISION)
        dq2 = mma(ds, k2, dq2, IS_FP32, PRECISION)

    g_base = DQKV + b * stride_gb + r64 * stride_gn + h * HEAD_DIM
    _store_unrotated(g_base, dq1 * sm_scale, dq2 * sm_scale, mrow, cols_h, SIN, COS, rows, N, num_prefix,
                     HALF, HEAD_DIM, TIED)


# ---- apply_rope --------------------------------------------------------------------------------------------------
@triton.jit
def _apply_rope_kernel(
    Q, K, QO, KO, SIN, COS,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
    N, H, num_prefix,
    INVERSE: tl.constexpr, HEAD_DIM: tl.constexpr, TIED: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # q and k of one (b, h) and BLOCK_N tokens share their sin/cos rows: one load of the coefficients for both.
    # INVERSE applies the transposed rotation (the backward of the forward one).
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_n = tl.program_id(0)
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)  # grid (tiles, H, B): each axis within CUDA's limits
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_H)
    c1, s1, c2, s2, rot = _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF, HEAD_DIM, TIED)
    m = (rows < N)[:, None] & (cols < HALF)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    o_off = bh.to(tl.int64) * N * HEAD_DIM + r64 * HEAD_DIM + cols[None, :]
    for which in tl.static_range(2):
        if which == 0:
            src = Q + b * sq_b + h * sq_h + r64 * sq_n
            sd = sq_d
            dst = QO
        else:
            src = K + b * sk_b + h * sk_h + r64 * sk_n
            sd = sk_d
            dst = KO
        x1 = tl.load(src + cols[None, :] * sd, mask=m, other=0.0)
        x2 = tl.load(src + (cols[None, :] + HALF) * sd, mask=m, other=0.0)
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        if INVERSE:
            y1 = a1 * c1 + a2 * s2
            y2 = a2 * c2 - a1 * s1
        else:
            y1 = a1 * c1 - a2 * s1
            y2 = a2 * c2 + a1 * s2
        y1 = tl.where(rot[:, None], y1.to(x1.dtype), x1)
        y2 = tl.where(rot[:, None], y2.to(x2.dtype), x2)
        tl.store(dst + o_off, y1.to(dst.dtype.element_ty), mask=m)
        tl.store(dst + o_off + HALF, y2.to(dst.dtype.element_ty), mask=m)


# ---- the composed backend's passes (qkv -> rotated q, k, v for SDPA, and back) -----------------------------------
@triton.jit
def _rope_qkv_split_kernel(
    QKV, SIN, COS, Q, K, V,
    stride_b, stride_n,
    N, H, C, num_prefix,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Packed qkv (B, N, 3C) -> q, k (rotated, fp32 math cast back as official) and v, each (B, H, N, Dh) contiguous:
    # one read and one write of every element, the sin/cos rows loaded once for q and k.
    HALF: tl.constexpr = HEAD_DIM // 2
    bh = tl.program_id(0).to(tl.int64)  # grid (B·H, tiles): B·H on the axis that takes 2^31 - 1 programs
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64 = rows.to(tl.int64)[:, None]
    mrow = rows < N
    cols = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    m = mrow[:, None] & (cols < HALF)[None, :]
    md = mrow[:, None] & (cols_d < HEAD_DIM)[None, :]
    src = QKV + b * stride_b + r64 * stride_n + h * HEAD_DIM
    dst = bh * N * HEAD_DIM + r64 * HEAD_DIM
    c1, s1, c2, s2, rot = _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF, HEAD_DIM, TIED)
    for which in tl.static_range(2):
        x1 = tl.load(src + which * C + cols[None, :], mask=m, other=0.0)
        x2 = tl.load(src + which * C + HALF + cols[None, :], mask=m, other=0.0)
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        y1 = tl.where(rot[:, None], (a1 * c1 - a2 * s1).to(x1.dtype), x1)
        y2 = tl.where(rot[:, None], (a2 * c2 + a1 * s2).to(x2.dtype), x2)
        if which == 0:
            out = Q
        else:
            out = K
        tl.store(out + dst + cols[None, :], y1, mask=m)
        tl.store(out + dst + HALF + cols[None, :], y2, mask=m)
    v = tl.load(src + 2 * C + cols_d[None, :], mask=md, other=0.0)
    tl.store(V + dst + cols_d[None, :], v, mask=md)


@triton.jit
def _rope_qkv_merge_kernel(
    DQ, DK, DV, SIN, COS, DQKV,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, stride_gb, stride_gn,
    N, H, C, num_prefix,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Backward of the split: dq, dk, dv (B, H, N, Dh) (any strides, last 1) -> the packed (B, N, 3C) gradient, with
    # the transposed rotation on dq and dk (d x1 = g1·cos1 + g2·sin2, d x2 = g2·cos2 - g1·sin1, in fp32).
    HALF: tl.constexpr = HEAD_DIM // 2
    bh = tl.program_id(0).to(tl.int64)  # grid (B·H, tiles)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64 = rows.to(tl.int64)[:, None]
    mrow = rows < N
    cols = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    m = mrow[:, None] & (cols < HALF)[None, :]
    md = mrow[:, None] & (cols_d < HEAD_DIM)[None, :]
    dst = DQKV + b * stride_gb + r64 * stride_gn + h * HEAD_DIM
    c1, s1, c2, s2, rot = _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF, HEAD_DIM, TIED)
    for which in tl.static_range(2):
        if which == 0:
            src = DQ + b * sq_b + h * sq_h + r64 * sq_n
        else:
            src = DK + b * sk_b + h * sk_h + r64 * sk_n
        g1 = tl.load(src + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g2 = tl.load(src + HALF + cols[None, :], mask=m, other=0.0).to(tl.float32)
        d1 = tl.where(rot[:, None], g1 * c1 + g2 * s2, g1)
        d2 = tl.where(rot[:, None], g2 * c2 - g1 * s1, g2)
        tl.store(dst + which * C + cols[None, :], d1.to(DQKV.dtype.element_ty), mask=m)
        tl.store(dst + which * C + HALF + cols[None, :], d2.to(DQKV.dtype.element_ty), mask=m)
    dv = tl.load(DV + b * sv_b + h * sv_h + r64 * sv_n + cols_d[None, :], mask=md, other=0.0)
    tl.store(dst + 2 * C + cols_d[None, :], dv.to(DQKV.dtype.element_ty), mask=md)


# ---- launchers ---------------------------------------------------------------------------------------------------
def _configs(pairs):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs]


# Candidates per width of one q/k/v row in bytes (BLOCK_D x element size), so that every candidate fits in an H100's
# 227 KB of shared memory per block and spills little or nothing: widths above 128 bytes take 8 warps (half the
# registers per thread) and smaller tiles or fewer stages. Each (BLOCK_M, BLOCK_N, num_warps, num_stages) set was
# chosen from a compile for sm_90 with Triton 3.9 (tests/kernels/triton_compile.py reports shared memory, registers
# and spill stack per config); the autotuner times what is left on the device.
_FWD = {
    128: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2), (64, 64, 4, 2)],
    256: [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2)],
    512: [(64, 32, 8, 2), (32, 32, 8, 2), (64, 64, 8, 1), (32, 32, 8, 1)],
    1024: [(32, 32, 8, 1), (16, 32, 8, 1)],
}
_BWD = {
    128: [(64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2), (32, 32, 4, 2)],
    256: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (16, 64, 8, 2), (64, 64, 8, 2)],
    512: [(16, 32, 8, 1), (32, 32, 8, 1), (32, 32, 8, 2)],
    1024: [(16, 32, 8, 1), (32, 32, 8, 1), (16, 16, 4, 1)],
}


def _by_width(table):
    """(all configs, prune function keeping those of the launch's row width)."""
    groups = {width: _configs(pairs) for width, pairs in table.items()}

    def prune(configs, named_args, **kwargs):
        meta = {**named_args, **kwargs}
        width = meta["BLOCK_D"] * (4 if meta["IS_FP32"] else 2)
        return groups[min(w for w in groups if w >= width)]

    return [c for group in groups.values() for c in group], prune


# The key includes N because vision sequence lengths are few and fixed.
_KEY = ["N", "HEAD_DIM", "IS_FP32", "PRECISION"]
_FWD_CONFIGS, _fwd_prune = _by_width(_FWD)
_BWD_CONFIGS, _bwd_prune = _by_width(_BWD)
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _fwd_prune})(
    _rope_attention_fwd_kernel)
_dkdv_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _bwd_prune})(
    _rope_attention_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _bwd_prune})(
    _rope_attention_bwd_dq_kernel)


def _cpu_blocks(N):
    # Under the interpreter autotuning only costs time: one small config; 16-row tiles keep several tiles (and
    # ragged edges) in the small test shapes, 32 rows cut the per-tile overhead at N ~ 200.
    block = 16 if N <= 64 else 32
    return {"BLOCK_M": block, "BLOCK_N": block}


def _row_block(t):
    # Rows per program of the row-wise kernels (Delta, apply_rope): 16 keeps several programs (and ragged edges) in the
    # interpreter's small test shapes.
    return 16 if t.device.type == "cpu" else 64


def _tied(sin, head_dim):
    return sin.shape[1] * 2 == head_dim


def _dims(head_dim):
    half = head_dim // 2
    return max(16, triton.next_power_of_2(half)), max(16, triton.next_power_of_2(head_dim))


def _launch(tuned, raw, tile, N, B, H, on_cpu, *args, **meta):
    """Grid (tiles, heads, batch): one program per `tile`-sized block of the N tokens, per head and batch entry."""
    if on_cpu:
        blocks = _cpu_blocks(N)
        raw[(triton.cdiv(N, blocks[tile]), H, B)](*args, **meta, **blocks)
    else:
        tuned[lambda m: (triton.cdiv(N, m[tile]), H, B)](*args, **meta)


def rope_attention_fwd_triton(qkv, sin, cos, num_heads, num_prefix_tokens, scale):
    """(B, N, 3C) packed qkv (last-dim stride 1), fp32 contiguous sin/cos of (H·W, Dh) or, with tied halves,
    (H·W, Dh/2) ->
    (out (B, N, C) in qkv.dtype, lse (B, num_heads, N) fp32, natural-log logsumexp of the scaled scores)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    Dh = C // num_heads
    out = torch.empty((B, N, C), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, num_heads, N), device=qkv.device, dtype=torch.float32)
    is_fp32, precision = dot_precision(qkv)
    block_h, block_d = _dims(Dh)
    _launch(_fwd_tuned, _rope_attention_fwd_kernel, "BLOCK_M", N, B, num_heads, not qkv.is_cuda,
            qkv, sin, cos, out, lse,
            qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
            N, num_heads, C, num_prefix_tokens, scale * LOG2E,
            HEAD_DIM=Dh, BLOCK_H=block_h, BLOCK_D=block_d, TIED=_tied(sin, Dh), IS_FP32=is_fp32,
            PRECISION=precision)
    return out, lse


def rope_attention_bwd_triton(qkv, sin, cos, out, lse, dout, num_heads, num_prefix_tokens, scale):
    """Gradient w.r.t. the packed qkv, (B, N, 3C) contiguous in qkv.dtype, for output gradient dout (B, N, C)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    Dh = C // num_heads
    dqkv = torch.empty((B, N, C3), device=qkv.device, dtype=qkv.dtype)
    delta = torch.empty((B, num_heads, N), device=qkv.device, dtype=torch.float32)
    is_fp32, precision = dot_precision(qkv)
    block_h, block_d = _dims(Dh)
    block_delta = _row_block(qkv)
    _rope_attention_bwd_delta_kernel[(triton.cdiv(N, block_delta), num_heads, B)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), N, num_heads,
        HEAD_DIM=Dh, BLOCK_D=block_d, BLOCK_M=block_delta,
    )
    args = (qkv, sin, cos, dout, lse, delta, dqkv,
            qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), dqkv.stride(0), dqkv.stride(1),
            N, num_heads, C, num_prefix_tokens, scale, scale * LOG2E)
    meta = dict(HEAD_DIM=Dh, BLOCK_H=block_h, BLOCK_D=block_d, TIED=_tied(sin, Dh), IS_FP32=is_fp32,
                PRECISION=precision)
    on_cpu = not qkv.is_cuda
    _launch(_dkdv_tuned, _rope_attention_bwd_dkdv_kernel, "BLOCK_N", N, B, num_heads, on_cpu, *args, **meta)
    _launch(_dq_tuned, _rope_attention_bwd_dq_kernel, "BLOCK_M", N, B, num_heads, on_cpu, *args, **meta)
    return dqkv


def apply_rope_triton(q, k, sin, cos, num_prefix_tokens, inverse=False):
    """RoPE (or its transpose, inverse=True) on the patch tokens of (B, heads, N, Dh) q and k -> new contiguous
    tensors of the same dtypes. sin/cos: (H·W, Dh) or tied (H·W, Dh/2), fp32 contiguous."""
    B, H, N, Dh = q.shape
    qo = torch.empty((B, H, N, Dh), device=q.device, dtype=q.dtype)
    ko = torch.empty((B, H, N, Dh), device=k.device, dtype=k.dtype)
    block_n = _row_block(q)
    _apply_rope_kernel[(triton.cdiv(N, block_n), H, B)](
        q, k, qo, ko, sin, cos, *q.stride(), *k.stride(), N, H, num_prefix_tokens,
        INVERSE=inverse, HEAD_DIM=Dh, TIED=_tied(sin, Dh), BLOCK_H=max(16, triton.next_power_of_2(Dh // 2)),
        BLOCK_N=block_n, num_warps=4,
    )
    return qo, ko


def _split_grid(B, H, N, block_n):
    """(B·H, token tiles): B·H on axis 0 (up to 2^31 - 1 programs); the tiles on axis 1 (at most 65535)."""
    tiles = triton.cdiv(N, block_n)
    if tiles > 65535:
        raise ValueError(f"rope_attention (composed): {N} tokens need {tiles} tiles of {block_n} rows, more than the "
                         "65535 a CUDA grid's second axis takes")
    return (B * H, tiles)


def rope_qkv_split_triton(qkv, sin, cos, num_heads, num_prefix_tokens):
    """Packed qkv (B, N, 3C), last-dim stride 1 -> (q, k, v), each (B, heads, N, Dh) contiguous in qkv.dtype, q and k
    rotated on their patch tokens (fp32 math). sin/cos: fp32 contiguous (H·W, Dh) or tied (H·W, Dh/2)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    Dh = C // num_heads
    q, k, v = (torch.empty((B, num_heads, N, Dh), device=qkv.device, dtype=qkv.dtype) for _ in range(3))
    block_n = _row_block(qkv)
    block_h, block_d = _dims(Dh)
    _rope_qkv_split_kernel[_split_grid(B, num_heads, N, block_n)](
        qkv, sin, cos, q, k, v, qkv.stride(0), qkv.stride(1), N, num_heads, C, num_prefix_tokens,
        HEAD_DIM=Dh, BLOCK_H=block_h, BLOCK_D=block_d, TIED=_tied(sin, Dh), BLOCK_N=block_n, num_warps=4,
    )
    return q, k, v


def rope_qkv_merge_triton(dq, dk, dv, sin, cos, num_prefix_tokens):
    """dq, dk, dv (B, heads, N, Dh), last-dim stride 1 -> the packed gradient (B, N, 3C) contiguous in dq.dtype."""
    B, H, N, Dh = dq.shape
    C = H * Dh
    dqkv = torch.empty((B, N, 3 * C), device=dq.device, dtype=dq.dtype)
    block_n = _row_block(dq)
    block_h, block_d = _dims(Dh)
    _rope_qkv_merge_kernel[_split_grid(B, H, N, block_n)](
        dq, dk, dv, sin, cos, dqkv, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        dqkv.stride(0), dqkv.stride(1), N, H, C, num_prefix_tokens,
        HEAD_DIM=Dh, BLOCK_H=block_h, BLOCK_D=block_d, TIED=_tied(sin, Dh), BLOCK_N=block_n, num_warps=4,
    )
    return dqkv
