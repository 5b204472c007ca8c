"""Triton kernels for RoPE-box attention on the packed qkv of DINOv3 (flash-attention-2 style).

qkv is the (B, N, 3C) output of the qkv linear, C = H·Dh; element (b, n, which, h, d) lives at
b·stride_b + n·stride_n + which·C + h·Dh + d and is read in place. Tokens n >= P (P = num_prefix_tokens: CLS and
registers) are patches and get RoPE on q and k, with sin/cos row n - P:

    rope(x) = x·cos + rotate_half(x)·sin,  rotate_half(x) = (-x₂, x₁)   (x₁, x₂ the two halves of the head dim)

computed in fp32 and cast back to the input dtype (as the official eager path does), then softmax(q kᵀ·scale) v.

Each tile is loaded as its two halves, so the rotation is elementwise and q kᵀ = q₁ k₁ᵀ + q₂ k₂ᵀ is two dots. The
tensor a kernel re-reads tile after tile is rotated once into a (B, H, N, Dh) scratch by a row-wise pass (K in the
forward, Q and K in the backward); the forward's q tile, which its program owns, is rotated as it is loaded. Half
tiles are padded to a power of two >= 16 (the smallest tl.dot), which is what allows any head dim that is a multiple
of 16.

Forward: online softmax in base 2 and the natural-log logsumexp per row, lse = log Σ_j exp(s_ij·scale), saved for
backward as (B, H, N) fp32. Backward (FlashAttention-2): Delta_i = Σ_d dO_id·O_id (in the Q/K rotation pass), then
one program per k tile computing dK and dV and adding its share of dQ into an fp32 accumulator with relaxed atomics,
with dS = P∘(dP - Delta), and a finishing pass for dQ; for TF32 at Dh 128, where that kernel cannot be both wgmma and
spill-free, a dK/dV kernel per k tile and a dQ kernel per q tile instead (_BWD_SPLIT_KV). The gradients of the
rotated q and k go through the transposed rotation

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
def _head_group(H, heads_per_program):
    """(b, first head, end head) of a row-wise pass's program: axis 0 enumerates (batch entry, group of
    heads_per_program consecutive heads), the last group of an entry possibly shorter."""
    groups = tl.cdiv(H, heads_per_program)
    pg = tl.program_id(0)
    b = (pg // groups).to(tl.int64)
    h0 = (pg % groups) * heads_per_program
    return b, h0, tl.minimum(h0 + heads_per_program, H)


@triton.jit
def _kv_tile_scores(q1, q2, krot, v_base, keys, mkey, stride_n, cols_h, mcol_h, cols_d, mcol_d, HALF: tl.constexpr,
                    HEAD_DIM: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of a query-tile sweep (forward, and the dQ kernel of the split backward): its rotated K halves
    from the scratch, its V from the packed qkv, and the scores S = q1 k1ᵀ + q2 k2ᵀ (fp32)."""
    k64 = keys.to(tl.int64)[:, None]
    mk = mkey[:, None] & mcol_h[None, :]
    k1 = tl.load(krot + k64 * HEAD_DIM + cols_h[None, :], mask=mk, other=0.0)
    k2 = tl.load(krot + k64 * HEAD_DIM + HALF + cols_h[None, :], mask=mk, other=0.0)
    v = tl.load(v_base + k64 * stride_n + cols_d[None, :], mask=mkey[:, None] & mcol_d[None, :], other=0.0)
    s = mma(q1, tl.trans(k1), tl.zeros((q1.shape[0], k1.shape[0]), dtype=tl.float32), IS_FP32, PRECISION)
    s = mma(q2, tl.trans(k2), s, IS_FP32, PRECISION)
    return k1, k2, v, s


@triton.jit
def _load_rotated(ptr, mrow, cols, SIN, COS, rows, N, num_prefix, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                  TIED: tl.constexpr):
    """Loads the halves of a (BLOCK, Dh) tile (ptr: (BLOCK, 1) row pointers) and applies RoPE to patch rows.

    The rotation runs in fp32 and is cast back to the input dtype; prefix rows pass through untouched.
    """
    c1, s1, c2, s2, rot = _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF, HEAD_DIM, TIED)
    return _load_rotated_with(ptr, mrow, cols, c1, s1, c2, s2, rot, HALF)


@triton.jit
def _load_rotated_with(ptr, mrow, cols, c1, s1, c2, s2, rot, HALF: tl.constexpr):
    """_load_rotated with the coefficients already loaded (the row-wise passes load them once for several heads)."""
    m = mrow[:, None] & (cols < HALF)[None, :]
    x1 = tl.load(ptr + cols[None, :], mask=m, other=0.0)
    x2 = tl.load(ptr + HALF + cols[None, :], mask=m, other=0.0)
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
    _store_unrotated_with(ptr, g1, g2, mrow, cols, c1, s1, c2, s2, rot, HALF)


@triton.jit
def _store_unrotated_with(ptr, g1, g2, mrow, cols, c1, s1, c2, s2, rot, HALF: tl.constexpr):
    """_store_unrotated with the coefficients already loaded."""
    d1 = tl.where(rot[:, None], g1 * c1 + g2 * s2, g1)
    d2 = tl.where(rot[:, None], g2 * c2 - g1 * s1, g2)
    m = mrow[:, None] & (cols < HALF)[None, :]
    dtype = ptr.dtype.element_ty
    tl.store(ptr + cols[None, :], d1.to(dtype), mask=m)
    tl.store(ptr + HALF + cols[None, :], d2.to(dtype), mask=m)


# ---- K (forward) / Q (backward) rotated once into a scratch --------------------------------------------------------
@triton.jit
def _rope_attention_rotate_kernel(
    QKV, SIN, COS, DST, DST_K, OUT, DOUT, DELTA,
    stride_b, stride_n, stride_ob, stride_on, stride_db, stride_dn,
    N, H, C, num_prefix, which, heads_per_program,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    WITH_DELTA: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Rotates q (which = 0) or k (which = 1) of the packed qkv once into a (B, H, N, Dh) scratch that the attention
    # kernel re-reads tile after tile (instead of re-rotating them, with their sin/cos rows, on every pass).
    # WITH_DELTA (backward, which = 0): also k into DST_K, and Delta_i = Σ_d dO_id·O_id = Σ_j P_ij dP_ij, the row
    # term of the softmax backward. Each program takes a group of heads (see _row_pass) and loads its tokens'
    # sin/cos rows once for all of them (and, with Delta, for q and k).
    HALF: tl.constexpr = HEAD_DIM // 2
    b, h0, h1 = _head_group(H, heads_per_program)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64 = rows.to(tl.int64)[:, None]
    mrow = rows < N
    cols = tl.arange(0, BLOCK_H)
    m = mrow[:, None] & (cols < HALF)[None, :]
    c1, s1, c2, s2, rot = _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF, HEAD_DIM, TIED)
    for h in range(h0, h1):
        bh = b * H + h
        x1, x2 = _load_rotated_with(QKV + b * stride_b + r64 * stride_n + which * C + h * HEAD_DIM, mrow, cols,
                                    c1, s1, c2, s2, rot, HALF)
        dst = DST + bh * N * HEAD_DIM + r64 * HEAD_DIM
        tl.store(dst + cols[None, :], x1, mask=m)
        tl.store(dst + HALF + cols[None, :], x2, mask=m)
        if WITH_DELTA:
            k1, k2 = _load_rotated_with(QKV + b * stride_b + r64 * stride_n + C + h * HEAD_DIM, mrow, cols,
                                        c1, s1, c2, s2, rot, HALF)
            dst_k = DST_K + bh * N * HEAD_DIM + r64 * HEAD_DIM
            tl.store(dst_k + cols[None, :], k1, mask=m)
            tl.store(dst_k + HALF + cols[None, :], k2, mask=m)
            cols_d = tl.arange(0, BLOCK_D)
            md = mrow[:, None] & (cols_d < HEAD_DIM)[None, :]
            o = tl.load(OUT + b * stride_ob + r64 * stride_on + h * HEAD_DIM + cols_d[None, :], mask=md, other=0.0)
            do = tl.load(DOUT + b * stride_db + r64 * stride_dn + h * HEAD_DIM + cols_d[None, :], mask=md,
                         other=0.0)
            tl.store(DELTA + bh * N + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=mrow)


# ---- forward -----------------------------------------------------------------------------------------------------
@triton.jit
def _rope_attention_fwd_kernel(
    QKV, KROT, SIN, COS, OUT, LSE,
    stride_b, stride_n, stride_ob, stride_on,
    N, H, C, num_prefix, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    # 1-D grid, q tiles fastest: the programs in flight share the K and V of a few heads (L2 reuse), and
    # tiles·B·H may reach 2^31 - 1 (a grid axis for B would stop at 65535).
    n_tiles = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_tiles
    bh = (pid // n_tiles).to(tl.int64)
    b = bh // H
    h = bh % H
    base = QKV + b * stride_b + h * HEAD_DIM
    krot = KROT + bh * N * HEAD_DIM
    cols_h = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    mcol_h = cols_h < HALF
    mcol_d = cols_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = rows < N
    # q is rotated once per program, as it loads; k comes pre-rotated from the scratch.
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
        k1, k2, v, s = _kv_tile_scores(q1, q2, krot, base + 2 * C, keys, mkey, stride_n, cols_h, mcol_h, cols_d, mcol_d,
                                       HALF, HEAD_DIM, IS_FP32, PRECISION)
        s = tl.where(mkey[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], IS_FP32, PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptr = OUT + b * stride_ob + rows.to(tl.int64)[:, None] * stride_on + h * HEAD_DIM + cols_d[None, :]
    tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=mrow[:, None] & mcol_d[None, :])
    tl.store(LSE + bh * N + rows, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=mrow)


# ---- backward ----------------------------------------------------------------------------------------------------
@triton.jit
def _rope_attention_bwd_kernel(
    QKV, QROT, KROT, SIN, COS, DOUT, LSE, DELTA, DQ_ACC, DQKV,
    stride_b, stride_n, stride_db, stride_dn, stride_gb, stride_gn,
    N, H, C, num_prefix, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr, WITH_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # FlashAttention-2 backward: one program owns BLOCK_N keys and sweeps all queries, in the transposed frame:
    # dV = Pᵀ dO,  dSᵀ = Pᵀ∘(V dOᵀ - Delta),  dK_rot = scale·dSᵀ Q_rot,  and dQ_rot += scale·dS K_rot added into an
    # fp32 (B, H, N, Dh) accumulator with relaxed atomics (the finishing pass rotates it back): 10·N²·Dh FLOPs and one
    # exp per score, where separate dK/dV and dQ passes recompute P twice (14·N²·Dh).
    # K comes pre-rotated from a scratch (rotated with Q): rotating it on load here shared its sin/cos loads with the
    # transposed rotation of dK at the end, which then stayed in registers across the loop (104 B of spill for TF32
    # at Dh 64 on Triton 3.6). WITH_DQ=False: the dK/dV half of the split backward (_rope_attention_bwd_dkdv_kernel).
    HALF: tl.constexpr = HEAD_DIM // 2
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_tiles
    bh = (pid // n_tiles).to(tl.int64)
    b = bh // H
    h = bh % H
    base = QKV + b * stride_b + h * HEAD_DIM
    do_base = DOUT + b * stride_db + h * HEAD_DIM
    qrot = QROT + bh * N * HEAD_DIM
    krot = KROT + bh * N * HEAD_DIM
    dq_acc = DQ_ACC + bh * N * HEAD_DIM
    cols_h = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    mcol_h = cols_h < HALF
    mcol_d = cols_d < HEAD_DIM

    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mkey = keys < N
    krow = keys.to(tl.int64)[:, None]
    mk = mkey[:, None] & mcol_h[None, :]
    k1 = tl.load(krot + krow * HEAD_DIM + cols_h[None, :], mask=mk, other=0.0)
    k2 = tl.load(krot + krow * HEAD_DIM + HALF + cols_h[None, :], mask=mk, other=0.0)
    v = tl.load(base + 2 * C + krow * stride_n + cols_d[None, :], mask=mkey[:, None] & mcol_d[None, :], other=0.0)

    dk1 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    dk2 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        mrow = rows < N
        r64 = rows.to(tl.int64)[:, None]
        mq = mrow[:, None] & mcol_h[None, :]
        q1 = tl.load(qrot + r64 * HEAD_DIM + cols_h[None, :], mask=mq, other=0.0)
        q2 = tl.load(qrot + r64 * HEAD_DIM + HALF + cols_h[None, :], mask=mq, other=0.0)
        do = tl.load(do_base + r64 * stride_dn + cols_d[None, :], mask=mrow[:, None] & mcol_d[None, :], other=0.0)
        lse = tl.load(LSE + bh * N + rows, mask=mrow, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * N + rows, mask=mrow, other=0.0)
        st = mma(k1, tl.trans(q1), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IS_FP32, PRECISION)
        st = mma(k2, tl.trans(q2), st, IS_FP32, PRECISION)
        # Padding queries would read lse = 0 and padding keys score 0: zero both.
        pt = tl.where(mkey[:, None] & mrow[None, :], tl.math.exp2(st * qk_scale - lse[None, :]), 0.0)
        dv = mma(pt.to(do.dtype), do, dv, IS_FP32, PRECISION)
        dpt = mma(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IS_FP32, PRECISION)
        dst = (pt * (dpt - delta[None, :])).to(q1.dtype)
        dk1 = mma(dst, q1, dk1, IS_FP32, PRECISION)
        dk2 = mma(dst, q2, dk2, IS_FP32, PRECISION)
        if WITH_DQ:
            ds = tl.trans(dst)
            dq1 = mma(ds, k1, tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), IS_FP32, PRECISION)
            dq2 = mma(ds, k2, tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), IS_FP32, PRECISION)
            # Relaxed: the finishing pass, a later launch, is the only reader (no fences around the REDs).
            tl.atomic_add(dq_acc + r64 * HEAD_DIM + cols_h[None, :], dq1, mask=mq, sem="relaxed")
            tl.atomic_add(dq_acc + r64 * HEAD_DIM + HALF + cols_h[None, :], dq2, mask=mq, sem="relaxed")

    # dV first: its registers are free before the sin/cos tiles of dK's transposed rotation load.
    g_base = DQKV + b * stride_gb + krow * stride_gn + h * HEAD_DIM
    tl.store(g_base + 2 * C + cols_d[None, :], dv.to(DQKV.dtype.element_ty), mask=mkey[:, None] & mcol_d[None, :])
    _store_unrotated(g_base + C, dk1 * sm_scale, dk2 * sm_scale, mkey, cols_h, SIN, COS, keys, N, num_prefix,
                     HALF, HEAD_DIM, TIED)


@triton.jit
def _rope_attention_bwd_dq_kernel(
    DQ_ACC, SIN, COS, DQKV,
    stride_gb, stride_gn,
    N, H, num_prefix, sm_scale, heads_per_program,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, TIED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Finishing pass: dQ = scale·Rᵀ(dQ_rot accumulated in fp32) into the packed gradient's q third; a group of heads
    # per program, the sin/cos rows loaded once for all of them (see _row_pass).
    HALF: tl.constexpr = HEAD_DIM // 2
    b, h0, h1 = _head_group(H, heads_per_program)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64 = rows.to(tl.int64)[:, None]
    mrow = rows < N
    cols = tl.arange(0, BLOCK_H)
    m = mrow[:, None] & (cols < HALF)[None, :]
    c1, s1, c2, s2, rot = _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF, HEAD_DIM, TIED)
    for h in range(h0, h1):
        acc = DQ_ACC + (b * H + h) * N * HEAD_DIM + r64 * HEAD_DIM
        g1 = tl.load(acc + cols[None, :], mask=m, other=0.0) * sm_scale
        g2 = tl.load(acc + HALF + cols[None, :], mask=m, other=0.0) * sm_scale
        _store_unrotated_with(DQKV + b * stride_gb + r64 * stride_gn + h * HEAD_DIM, g1, g2, mrow, cols,
                              c1, s1, c2, s2, rot, HALF)


@triton.jit
def _rope_attention_bwd_dkdv_kernel(
    QKV, QROT, KROT, SIN, COS, DOUT, LSE, DELTA, DQKV,
    stride_b, stride_n, stride_db, stride_dn, stride_gb, stride_gn,
    N, H, C, num_prefix, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Split backward (see _BWD_SPLIT_KV), dK and dV half: the FA2 kernel's key-tile loop without the dQ products and
    # atomics (DQ_ACC unused).
    _rope_attention_bwd_kernel(QKV, QROT, KROT, SIN, COS, DOUT, LSE, DELTA, QROT, DQKV,
                               stride_b, stride_n, stride_db, stride_dn, stride_gb, stride_gn,
                               N, H, C, num_prefix, sm_scale, qk_scale,
                               HEAD_DIM, BLOCK_H, BLOCK_D, TIED, IS_FP32, PRECISION, False, BLOCK_M, BLOCK_N)


@triton.jit
def _rope_attention_bwd_dq_tile_kernel(
    QKV, QROT, KROT, SIN, COS, DOUT, LSE, DELTA, DQKV,
    stride_b, stride_n, stride_db, stride_dn, stride_gb, stride_gn,
    N, H, C, num_prefix, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Split backward (see _BWD_SPLIT_KV), dQ half: one program owns BLOCK_M queries and sweeps all keys
    # (FlashAttention-2's dQ loop): S = Q_rot K_rotᵀ, dS = P∘(dO Vᵀ - Delta), dQ_rot = scale·dS K_rot accumulated in
    # registers and stored once, rotated back, into the q third of the packed gradient: no atomics, no fp32
    # accumulator in memory, deterministic.
    HALF: tl.constexpr = HEAD_DIM // 2
    n_tiles = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_tiles
    bh = (pid // n_tiles).to(tl.int64)
    b = bh // H
    h = bh % H
    base = QKV + b * stride_b + h * HEAD_DIM
    qrot = QROT + bh * N * HEAD_DIM
    krot = KROT + bh * N * HEAD_DIM
    cols_h = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    mcol_h = cols_h < HALF
    mcol_d = cols_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = rows < N
    r64 = rows.to(tl.int64)[:, None]
    mq = mrow[:, None] & mcol_h[None, :]
    # Q (pre-rotated) and dO are read straight from memory, so they stay wgmma operands in shared memory.
    q1 = tl.load(qrot + r64 * HEAD_DIM + cols_h[None, :], mask=mq, other=0.0)
    q2 = tl.load(qrot + r64 * HEAD_DIM + HALF + cols_h[None, :], mask=mq, other=0.0)
    do = tl.load(DOUT + b * stride_db + r64 * stride_dn + h * HEAD_DIM + cols_d[None, :],
                 mask=mrow[:, None] & mcol_d[None, :], other=0.0)
    lse = tl.load(LSE + bh * N + rows, mask=mrow, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * N + rows, mask=mrow, other=0.0)

    dq1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    dq2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        mkey = keys < N
        k1, k2, v, s = _kv_tile_scores(q1, q2, krot, base + 2 * C, keys, mkey, stride_n, cols_h, mcol_h, cols_d, mcol_d,
                                       HALF, HEAD_DIM, IS_FP32, PRECISION)
        p = tl.where(mrow[:, None] & mkey[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = mma(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IS_FP32, PRECISION)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = mma(ds, k1, dq1, IS_FP32, PRECISION)
        dq2 = mma(ds, k2, dq2, IS_FP32, PRECISION)

    _store_unrotated(DQKV + b * stride_gb + r64 * stride_gn + h * HEAD_DIM, dq1 * sm_scale, dq2 * sm_scale, mrow,
                     cols_h, SIN, COS, rows, N, num_prefix, HALF, HEAD_DIM, TIED)


# ---- apply_rope --------------------------------------------------------------------------------------------------
@triton.jit
def _apply_rope_kernel(
    Q, K, QO, KO, SIN, COS,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
    N, H, num_prefix, heads_per_program,
    INVERSE: tl.constexpr, HEAD_DIM: tl.constexpr, TIED: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # q and k of a group of heads (see _row_pass) and BLOCK_N tokens share their sin/cos rows: one load of the
    # coefficients for all of them. INVERSE applies the transposed rotation (the backward of the forward one).
    HALF: tl.constexpr = HEAD_DIM // 2
    b, h0, h1 = _head_group(H, heads_per_program)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_H)
    c1, s1, c2, s2, rot = _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF, HEAD_DIM, TIED)
    m = (rows < N)[:, None] & (cols < HALF)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    for h in range(h0, h1):
        o_off = (b * H + h) * N * HEAD_DIM + r64 * HEAD_DIM + cols[None, :]
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
    N, H, C, num_prefix, heads_per_program,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Packed qkv (B, N, 3C) -> q, k (rotated, fp32 math cast back as official) and v, each (B, H, N, Dh) contiguous:
    # one read and one write of every element, the sin/cos rows loaded once for q and k of a group of heads.
    HALF: tl.constexpr = HEAD_DIM // 2
    b, h0, h1 = _head_group(H, heads_per_program)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64 = rows.to(tl.int64)[:, None]
    mrow = rows < N
    cols = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    m = mrow[:, None] & (cols < HALF)[None, :]
    md = mrow[:, None] & (cols_d < HEAD_DIM)[None, :]
    c1, s1, c2, s2, rot = _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF, HEAD_DIM, TIED)
    for h in range(h0, h1):
        src = QKV + b * stride_b + r64 * stride_n + h * HEAD_DIM
        dst = (b * H + h) * N * HEAD_DIM + r64 * HEAD_DIM
        for which in tl.static_range(2):
            y1, y2 = _load_rotated_with(src + which * C, mrow, cols, c1, s1, c2, s2, rot, HALF)
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
    N, H, C, num_prefix, heads_per_program,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TIED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Backward of the split: dq, dk, dv (B, H, N, Dh) (any strides, last 1) -> the packed (B, N, 3C) gradient, with
    # the transposed rotation on dq and dk (d x1 = g1·cos1 + g2·sin2, d x2 = g2·cos2 - g1·sin1, in fp32); the sin/cos
    # rows loaded once for a group of heads.
    HALF: tl.constexpr = HEAD_DIM // 2
    b, h0, h1 = _head_group(H, heads_per_program)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64 = rows.to(tl.int64)[:, None]
    mrow = rows < N
    cols = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    m = mrow[:, None] & (cols < HALF)[None, :]
    md = mrow[:, None] & (cols_d < HEAD_DIM)[None, :]
    c1, s1, c2, s2, rot = _rope_coeffs(SIN, COS, rows, N, num_prefix, cols, HALF, HEAD_DIM, TIED)
    for h in range(h0, h1):
        dst = DQKV + b * stride_gb + r64 * stride_gn + h * HEAD_DIM
        for which in tl.static_range(2):
            if which == 0:
                src = DQ + b * sq_b + h * sq_h + r64 * sq_n
            else:
                src = DK + b * sk_b + h * sk_h + r64 * sk_n
            g1 = tl.load(src + cols[None, :], mask=m, other=0.0).to(tl.float32)
            g2 = tl.load(src + HALF + cols[None, :], mask=m, other=0.0).to(tl.float32)
            _store_unrotated_with(dst + which * C, g1, g2, mrow, cols, c1, s1, c2, s2, rot, HALF)
        dv = tl.load(DV + b * sv_b + h * sv_h + r64 * sv_n + cols_d[None, :], mask=md, other=0.0)
        tl.store(dst + 2 * C + cols_d[None, :], dv.to(DQKV.dtype.element_ty), mask=md)


# ---- launchers ---------------------------------------------------------------------------------------------------
def _configs(pairs):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs]


# Candidates per width of one q/k/v row in bytes (BLOCK_D x element size: 128 = bf16 Dh 64, 256 = bf16 Dh 128 or fp32
# Dh 64, 512 = bf16 Dh 256 or fp32 Dh 128, 1024 = fp32 Dh 256), as (BLOCK_M, BLOCK_N, num_warps, num_stages). Kept
# from a compile for sm_90 with Triton 3.9 (tests/kernels/triton_compile.py: shared memory, registers, spill stack,
# wgmma vs mma.sync per config) where a candidate fits the 227 KB of shared memory with no spill and every tl.dot is
# a wgmma: BLOCK_M and BLOCK_N at least 64 per warpgroup (4 warps), and num_stages >= 2 (loads of the next K/V or
# Q/dO tile in flight while the current one's wgmmas run) except where two stages do not fit. Where no candidate is
# both spill-free and wgmma (forward at 1024 bytes; the single backward at 512 and 1024, which TF32 at 512 bytes
# leaves for the split backward below), the spill-free mma.sync one is kept. The autotuner times what is left on the
# device. Rechecked with Triton 3.6 and 3.9 after the backward's K moved to a pre-rotated scratch (default configs:
# every dot a wgmma, stack 0 on both, for bf16 at Dh 64/128 and TF32 at Dh 64).
_FWD = {
    128: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3)],
    256: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3)],
    512: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)],
    1024: [(64, 32, 8, 2), (64, 64, 8, 1)],
}
_BWD = {
    128: [(64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2)],  # (64, 64, 4, 3) spills on Triton 3.6 (stack 32)
    256: [(64, 64, 8, 2)],  # TF32 Dh 64: stack 0 on both Triton versions since K comes pre-rotated (104 B before)
    # bf16 Dh 256 (mma.sync): 64-row tiles spill 150-350 B; the split backward below spills there too (dK/dV at
    # (16, 64, 8, 2|3): 255 regs + 24-32 B of stack, Triton 3.9, 2026-12-01), so it stays TF32-only.
    512: [(32, 32, 8, 2)],
    1024: [(32, 32, 8, 1)],  # TF32 Dh 256 (mma.sync); the split kernels spill here too (80-930 B)
}

# The split backward, TF32 at 512-byte rows (fp32 Dh 128): every 64-row candidate of the single kernel spills (fp32
# accumulators dK, dV, dQ and the A operands wgmma takes from registers are twice the bytes of bf16: 130-400 B of
# stack at 64x64, 8 warps, on both versions) and 32-row tiles make dQ (M = BLOCK_M) an mma.sync. Split into a dK/dV
# kernel per key tile (the single kernel without dQ; 16 queries per step keep its register tiles small, the three
# products of M = BLOCK_N = 64 stay wgmma) and a dQ kernel per query tile sweeping the keys (dQ = dS K of M =
# BLOCK_M, stored once, no atomics), both wgmma with stack 0 on Triton 3.6 and 3.9 (compile for sm_90). Costs
# 14·N²·Dh FLOPs against the single kernel's 10 (S and dP computed twice), on wgmma instead of mma.sync.
_BWD_SPLIT_KV = {512: [(16, 64, 8, 2), (16, 64, 8, 3)]}
_BWD_SPLIT_Q = {512: [(128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 1), (64, 32, 4, 2)]}


# IEEE fp32 (TF32 off) has no tensor-core dot: its tl.dots are FMA loops that hold more in registers, so it takes
# smaller tiles: the spill-free ones of a sweep at Dh 64 (256-byte rows) and Dh 128 (Triton 3.9, sm_90); Dh 256
# takes the Dh 128 list (not compiled here).
_FWD_IEEE = {
    256: [(64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
    1024: [(32, 32, 4, 2)],
}
_BWD_IEEE = {
    256: [(32, 32, 8, 2)],
    1024: [(16, 32, 8, 1), (16, 16, 4, 2)],
}


def _by_width(table, ieee_table):
    """(all configs, prune function keeping those of the launch's row width and, for fp32, precision)."""
    groups = {width: _configs(pairs) for width, pairs in table.items()}
    ieee = {width: _configs(pairs) for width, pairs in ieee_table.items()}

    def prune(configs, named_args, **kwargs):
        meta = {**named_args, **kwargs}
        width = meta["BLOCK_D"] * (4 if meta["IS_FP32"] else 2)
        pick = ieee if meta["IS_FP32"] and meta.get("PRECISION") == "ieee" else groups
        return pick[min(w for w in pick if w >= width)]

    return [c for g in (groups, ieee) for group in g.values() for c in group], prune


# The key includes N because vision sequence lengths are few and fixed.
_KEY = ["N", "HEAD_DIM", "IS_FP32", "PRECISION"]
_FWD_CONFIGS, _fwd_prune = _by_width(_FWD, _FWD_IEEE)
_BWD_CONFIGS, _bwd_prune = _by_width(_BWD, _BWD_IEEE)
_BWD_KV_CONFIGS, _bwd_kv_prune = _by_width(_BWD_SPLIT_KV, {})
_BWD_Q_CONFIGS, _bwd_q_prune = _by_width(_BWD_SPLIT_Q, {})
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _fwd_prune})(
    _rope_attention_fwd_kernel)
# The backward's autotuning reruns it: the dQ accumulator it adds into is zeroed before each trial.
_bwd_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _bwd_prune},
                             reset_to_zero=["DQ_ACC"])(_rope_attention_bwd_kernel)
_bwd_dkdv_tuned = triton.autotune(_BWD_KV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _bwd_kv_prune})(
    _rope_attention_bwd_dkdv_kernel)
_bwd_dq_tuned = triton.autotune(_BWD_Q_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _bwd_q_prune})(
    _rope_attention_bwd_dq_tile_kernel)


def _cpu_blocks(N):
    # Under the interpreter autotuning only costs time: one small config; 16-row tiles keep several tiles (and
    # ragged edges) in the small test shapes, 32 rows cut the per-tile overhead at N ~ 200.
    block = 16 if N <= 64 else 32
    return {"BLOCK_M": block, "BLOCK_N": block}


def _tied(sin, head_dim):
    return sin.shape[1] * 2 == head_dim


def _dims(head_dim):
    half = head_dim // 2
    return max(16, triton.next_power_of_2(half)), max(16, triton.next_power_of_2(head_dim))


MAX_PROGRAMS = 2**31 - 1  # a CUDA grid's x axis; y and z stop at 65535


def _grid(N, B, H, block):
    """1-D grid of the attention kernels: ceil(N / block) tiles per (batch, head), tiles fastest."""
    programs = triton.cdiv(N, block) * B * H
    if programs > MAX_PROGRAMS:
        raise ValueError(f"rope_attention (triton): {programs} programs (B={B}, heads={H}, N={N}, tiles of {block}) "
                         f"exceed a CUDA grid's {MAX_PROGRAMS}")
    return (programs,)


def _launch(tuned, raw, tile, N, B, H, on_cpu, *args, **meta):
    """One program per `tile`-sized block of the N tokens, per head and batch entry (see _grid)."""
    if on_cpu:
        blocks = _cpu_blocks(N)
        raw[_grid(N, B, H, blocks[tile])](*args, **meta, **blocks)
    else:
        tuned[lambda m: _grid(N, B, H, m[tile])](*args, **meta)


def _rotate_once(qkv, sin, cos, num_heads, num_prefix_tokens, which, out=None, dout=None):
    """q (which=0) or k (which=1) of the packed qkv, rotated, as a (B, H, N, Dh) scratch in qkv.dtype; with out and
    dout (backward, which=0) (q rotated, k rotated, Delta (B, H, N) fp32, the backward's row term)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    Dh = C // num_heads
    rot = torch.empty((B, num_heads, N, Dh), device=qkv.device, dtype=qkv.dtype)
    with_delta = out is not None
    rot_k = torch.empty_like(rot) if with_delta else rot
    delta = torch.empty((B, num_heads, N), device=qkv.device, dtype=torch.float32) if with_delta else rot
    out, dout = (out, dout) if with_delta else (rot[0, 0], rot[0, 0])
    grid, block_n, hpg = _row_pass(B, num_heads, N, Dh, not qkv.is_cuda)
    block_h, block_d = _dims(Dh)
    # Backward (q, k, o and dO rows in flight): 4 warps spill at fp32 Dh 128 (254 registers, 8 B), 8 at fp32 Dh 256.
    # Forward, fp32: 4 warps spilled 8 B on Triton 3.6 once the sin/cos tiles were held across the head loop.
    if with_delta:
        warps = 16 if block_d * qkv.element_size() > 512 else 8
    else:
        warps = 8 if qkv.element_size() == 4 else 4
    _rope_attention_rotate_kernel[grid](
        qkv, sin, cos, rot, rot_k, out, dout, delta, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        dout.stride(0), dout.stride(1), N, num_heads, C, num_prefix_tokens, which, hpg,
        HEAD_DIM=Dh, BLOCK_H=block_h, BLOCK_D=block_d, TIED=_tied(sin, Dh), WITH_DELTA=with_delta, BLOCK_N=block_n,
        num_warps=warps,
    )
    return (rot, rot_k, delta) if with_delta else rot


def rope_attention_fwd_triton(qkv, sin, cos, num_heads, num_prefix_tokens, scale):
    """(B, N, 3C) packed qkv (last-dim stride 1), fp32 contiguous sin/cos of (H·W, Dh) or, with tied halves,
    (H·W, Dh/2) ->
    (out (B, N, C) in qkv.dtype, lse (B, num_heads, N) fp32, natural-log logsumexp of the scaled scores).
    K is rotated once into a (B, H, N, Dh) scratch; q is rotated as each program loads it."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    Dh = C // num_heads
    krot = _rotate_once(qkv, sin, cos, num_heads, num_prefix_tokens, 1)
    out = torch.empty((B, N, C), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, num_heads, N), device=qkv.device, dtype=torch.float32)
    is_fp32, precision = dot_precision(qkv)
    block_h, block_d = _dims(Dh)
    _launch(_fwd_tuned, _rope_attention_fwd_kernel, "BLOCK_M", N, B, num_heads, not qkv.is_cuda,
            qkv, krot, sin, cos, out, lse,
            qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
            N, num_heads, C, num_prefix_tokens, scale * LOG2E,
            HEAD_DIM=Dh, BLOCK_H=block_h, BLOCK_D=block_d, TIED=_tied(sin, Dh), IS_FP32=is_fp32,
            PRECISION=precision)
    return out, lse


def _split_bwd(is_fp32, precision, block_d):
    """Whether the backward runs split (a dK/dV and a dQ kernel, see _BWD_SPLIT_KV) instead of the single FA2 one."""
    return is_fp32 and precision == "tf32" and block_d * 4 in _BWD_SPLIT_KV


def rope_attention_bwd_triton(qkv, sin, cos, out, lse, dout, num_heads, num_prefix_tokens, scale):
    """Gradient w.r.t. the packed qkv, (B, N, 3C) contiguous in qkv.dtype, for output gradient dout (B, N, C).

    Q and K rotated once into scratches (with Delta in the same pass), then either one FA2-style kernel per K tile
    (dK, dV stored, dQ added into an fp32 accumulator with relaxed atomics: run-to-run rounding differs in dQ) and a
    finishing pass for dQ, or, where that kernel cannot be both wgmma and spill-free (_split_bwd), a dK/dV kernel
    per K tile and a dQ kernel per Q tile (no atomics).
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    Dh = C // num_heads
    qrot, krot, delta = _rotate_once(qkv, sin, cos, num_heads, num_prefix_tokens, 0, out, dout)
    dqkv = torch.empty((B, N, C3), device=qkv.device, dtype=qkv.dtype)
    is_fp32, precision = dot_precision(qkv)
    block_h, block_d = _dims(Dh)
    tied = _tied(sin, Dh)
    on_cpu = not qkv.is_cuda
    args = (qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), dqkv.stride(0), dqkv.stride(1),
            N, num_heads, C, num_prefix_tokens, scale, scale * LOG2E)
    meta = dict(HEAD_DIM=Dh, BLOCK_H=block_h, BLOCK_D=block_d, TIED=tied, IS_FP32=is_fp32, PRECISION=precision)
    if _split_bwd(is_fp32, precision, block_d):
        _launch(_bwd_dkdv_tuned, _rope_attention_bwd_dkdv_kernel, "BLOCK_N", N, B, num_heads, on_cpu,
                qkv, qrot, krot, sin, cos, dout, lse, delta, dqkv, *args, **meta)
        _launch(_bwd_dq_tuned, _rope_attention_bwd_dq_tile_kernel, "BLOCK_M", N, B, num_heads, on_cpu,
                qkv, qrot, krot, sin, cos, dout, lse, delta, dqkv, *args, **meta)
        return dqkv
    dq_acc = torch.zeros((B, num_heads, N, Dh), device=qkv.device, dtype=torch.float32)
    _launch(_bwd_tuned, _rope_attention_bwd_kernel, "BLOCK_N", N, B, num_heads, on_cpu,
            qkv, qrot, krot, sin, cos, dout, lse, delta, dq_acc, dqkv, *args, WITH_DQ=True, **meta)
    grid, block_n, hpg = _row_pass(B, num_heads, N, Dh, on_cpu)
    _rope_attention_bwd_dq_kernel[grid](
        dq_acc, sin, cos, dqkv, dqkv.stride(0), dqkv.stride(1), N, num_heads, num_prefix_tokens, scale, hpg,
        HEAD_DIM=Dh, BLOCK_H=block_h, TIED=tied, BLOCK_N=block_n, num_warps=4,
    )
    return dqkv


def apply_rope_triton(q, k, sin, cos, num_prefix_tokens, inverse=False):
    """RoPE (or its transpose, inverse=True) on the patch tokens of (B, heads, N, Dh) q and k -> new contiguous
    tensors of the same dtypes. sin/cos: (H·W, Dh) or tied (H·W, Dh/2), fp32 contiguous."""
    B, H, N, Dh = q.shape
    qo = torch.empty((B, H, N, Dh), device=q.device, dtype=q.dtype)
    ko = torch.empty((B, H, N, Dh), device=k.device, dtype=k.dtype)
    grid, block_n, hpg = _row_pass(B, H, N, Dh, not q.is_cuda)
    _apply_rope_kernel[grid](
        q, k, qo, ko, sin, cos, *q.stride(), *k.stride(), N, H, num_prefix_tokens, hpg,
        INVERSE=inverse, HEAD_DIM=Dh, TIED=_tied(sin, Dh), BLOCK_H=max(16, triton.next_power_of_2(Dh // 2)),
        BLOCK_N=block_n, num_warps=4,
    )
    return qo, ko


# The row-wise passes (K or Q and K rotated into their scratches with Delta, the dQ finishing pass, apply_rope, the
# composed backend's split and merge): a program takes BLOCK_N tokens of a group of consecutive heads of one batch
# entry and loads the tokens' sin/cos rows once for the whole group. One program per (batch entry, head) loaded them
# for every head: 4·Dh bytes per token with the tied fp32 tables, twice the bytes of the 16-bit row they rotate. The
# groups are as large as keeps ROW_PASS_MIN_PROGRAMS programs in the grid (about 8 per SM of an H100/H200): all the
# heads at the training shapes (e.g. B = 502 global + local crops of N = 261: 2510 programs of 16 heads for ViT-L).
ROW_PASS_MIN_PROGRAMS = 1024
# BLOCK_N x the head dim (padded to a power of two) per GPU program: 64 tokens at Dh 64, 32 at 128, 16 at 256, so
# that the sin/cos tiles held across the head loop stay within 64 registers per thread at 4 warps (untied tables).
ROW_PASS_ELEMENTS = 4096


def _heads_per_program(B, H, tiles):
    """The largest group of heads (H, then halving) whose grid keeps ROW_PASS_MIN_PROGRAMS programs, at least 1."""
    hpg = H
    while hpg > 1 and B * triton.cdiv(H, hpg) * tiles < ROW_PASS_MIN_PROGRAMS:
        hpg = triton.cdiv(hpg, 2)
    return hpg


def _row_pass(B, H, N, head_dim, on_cpu):
    """(grid, BLOCK_N, heads per program) of a row-wise pass: grid (B·groups, token tiles), (batch entry, group of
    heads) on axis 0 (up to 2^31 - 1 programs), the tiles on axis 1 (at most 65535). The interpreter takes 16-row
    tiles and groups of 2 heads: several programs, ragged token tiles and (odd H) a short last group in the small
    test shapes."""
    block_n = 16 if on_cpu else max(16, min(64, ROW_PASS_ELEMENTS // triton.next_power_of_2(head_dim)))
    tiles = triton.cdiv(N, block_n)
    if tiles > 65535:
        raise ValueError(f"rope_attention: {N} tokens need {tiles} tiles of {block_n} rows, more than the 65535 a "
                         "CUDA grid's second axis takes")
    hpg = min(H, 2) if on_cpu else _heads_per_program(B, H, tiles)
    programs = B * triton.cdiv(H, hpg)
    if programs > MAX_PROGRAMS:
        raise ValueError(f"rope_attention: {programs} programs (B={B}, heads={H} in groups of {hpg}) exceed a CUDA "
                         f"grid's {MAX_PROGRAMS}")
    return (programs, tiles), block_n, hpg


def rope_qkv_split_triton(qkv, sin, cos, num_heads, num_prefix_tokens):
    """Packed qkv (B, N, 3C), last-dim stride 1 -> (q, k, v), each (B, heads, N, Dh) contiguous in qkv.dtype, q and k
    rotated on their patch tokens (fp32 math). sin/cos: fp32 contiguous (H·W, Dh) or tied (H·W, Dh/2)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    Dh = C // num_heads
    q, k, v = (torch.empty((B, num_heads, N, Dh), device=qkv.device, dtype=qkv.dtype) for _ in range(3))
    grid, block_n, hpg = _row_pass(B, num_heads, N, Dh, not qkv.is_cuda)
    block_h, block_d = _dims(Dh)
    _rope_qkv_split_kernel[grid](
        qkv, sin, cos, q, k, v, qkv.stride(0), qkv.stride(1), N, num_heads, C, num_prefix_tokens, hpg,
        HEAD_DIM=Dh, BLOCK_H=block_h, BLOCK_D=block_d, TIED=_tied(sin, Dh), BLOCK_N=block_n, num_warps=4,
    )
    return q, k, v


def rope_qkv_merge_triton(dq, dk, dv, sin, cos, num_prefix_tokens):
    """dq, dk, dv (B, heads, N, Dh), last-dim stride 1 -> the packed gradient (B, N, 3C) contiguous in dq.dtype."""
    B, H, N, Dh = dq.shape
    C = H * Dh
    dqkv = torch.empty((B, N, 3 * C), device=dq.device, dtype=dq.dtype)
    grid, block_n, hpg = _row_pass(B, H, N, Dh, not dq.is_cuda)
    block_h, block_d = _dims(Dh)
    _rope_qkv_merge_kernel[grid](
        dq, dk, dv, sin, cos, dqkv, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        dqkv.stride(0), dqkv.stride(1), N, H, C, num_prefix_tokens, hpg,
        HEAD_DIM=Dh, BLOCK_H=block_h, BLOCK_D=block_d, TIED=_tied(sin, Dh), BLOCK_N=block_n, num_warps=4,
    )
    return dqkv
