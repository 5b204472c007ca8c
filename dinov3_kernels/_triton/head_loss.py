"""Triton kernels for the fused DINO / iBOT head losses: logits recomputed tile by tile, never stored.

Logits L = scale · z Wᵀ for features z (N, D) and prototypes W (K, D). Every kernel recomputes its (BLOCK_N, BLOCK_K)
tiles of L from z and W with tl.dot (D in BLOCK_D steps) and reduces them at once; nothing of size N·K is written.

  _head_col_lse_kernel   per prototype k over rows n:  max and Σ exp(x - max),  x = L + col_bias_k + row_bias_n
                         (the Sinkhorn-Knopp prototype normalisation); grid (K tiles, row splits)
  _head_row_lse_kernel   per row n over prototypes:    max and Σ exp(x - max),  x = L + col_bias_k
                         (the sample normalisation, and the teacher's softmax normaliser); grid (row tiles, K splits)
  _head_ce_fwd_kernel    per student row i: the online logsumexp of S_i = scale_s · z_s,i W_sᵀ and the cross term
                         Σ_t w_it Σ_k P_jk S_ik with the teacher probabilities P_jk = exp(L^t_jk + bias_k - lse_j) of
                         its teacher rows j = t·B + i mod B; grid (student row tiles, K splits)
  _head_ce_bwd_dz_kernel dS_ik = g_i (wsum_i softmax(S_i)_k - Σ_t w_it P_jk), then dz_s = scale_s · dS W_s;
                         grid (student row tiles, K splits, D chunks)
  _head_ce_bwd_dw_kernel the same dS tiles, then dW_s = scale_s · dSᵀ z_s; grid (K tiles, row splits, D chunks)

Splits write partial results (max/sum pairs, sums, gradient slices) that the launchers combine with a few torch ops
in a fixed order, so results are deterministic. Extra memory is O((N + K) · D · splits), with a handful of splits.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_precision, mma


@triton.jit
def _logits_tile(Z, W, rows, mr, cols, mc, D, szn, szd, swk, swd,
                 IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """z[rows] @ W[cols]ᵀ, (BLOCK_N, BLOCK_K) fp32; rows and cols int64, masked rows/cols give 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        md = dd < D
        a = tl.load(Z + rows[:, None] * szn + dd[None, :] * szd, mask=mr[:, None] & md[None, :], other=0.0)
        b = tl.load(W + cols[:, None] * swk + dd[None, :] * swd, mask=mc[:, None] & md[None, :], other=0.0)
        acc = mma(a, tl.trans(b), acc, IS_FP32, PRECISION)
    return acc


@triton.jit
def _head_col_lse_kernel(
    Z, W, CB, RB, OUT_M, OUT_S,
    N, K, D, rows_per_split,
    szn, szd, swk, swd, scale,
    HAS_CB: tl.constexpr, HAS_RB: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    cols = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mc = cols < K
    cb = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if HAS_CB:
        cb = tl.load(CB + cols, mask=mc, other=0.0)
    n_begin = split * rows_per_split
    n_end = tl.minimum(N, n_begin + rows_per_split)
    # Running (max, Σ exp(x - max)) per column; a column that has seen no row holds (-inf, 0).
    m = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mr = rows < n_end
        x = _logits_tile(Z, W, rows, mr, cols, mc, D, szn, szd, swk, swd, IS_FP32, PRECISION,
                         BLOCK_N, BLOCK_K, BLOCK_D) * scale + cb[None, :]
        if HAS_RB:
            x += tl.load(RB + rows, mask=mr, other=0.0)[:, None]
        x = tl.where(mr[:, None], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps exp(-inf - -inf) out
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[None, :]), axis=0)
        m = m_new
    tl.store(OUT_M + split * K + cols, m, mask=mc)
    tl.store(OUT_S + split * K + cols, s, mask=mc)


@triton.jit
def _head_row_lse_kernel(
    Z, W, CB, OUT_M, OUT_S,
    N, K, D, cols_per_split,
    szn, szd, swk, swd, scale,
    HAS_CB: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mr = rows < N
    k_begin = split * cols_per_split
    k_end = tl.minimum(K, k_begin + cols_per_split)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mc = cols < k_end
        x = _logits_tile(Z, W, rows, mr, cols, mc, D, szn, szd, swk, swd, IS_FP32, PRECISION,
                         BLOCK_N, BLOCK_K, BLOCK_D) * scale
        if HAS_CB:
            x += tl.load(CB + cols, mask=mc, other=0.0)[None, :]
        x = tl.where(mc[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
        m = m_new
    tl.store(OUT_M + split * N + rows, m, mask=mr)
    tl.store(OUT_S + split * N + rows, s, mask=mr)


@triton.jit
def _teacher_target_tile(ZT, WT, TB, TLSE, PW, rows, mr, cols, mc, T, B_img, D,
                         stn, std, stk, stdw, scale_t,
                         IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Σ_t w_it P_jk over the teacher rows j = t·B + i mod B of student rows i, (BLOCK_N, BLOCK_K) fp32; 0 where
    masked. P_jk = exp(scale_t · z_t,j·W_t,k + bias_k - lse_j): the teacher softmax with its per-prototype bias."""
    tb = tl.load(TB + cols, mask=mc, other=float("-inf"))  # masked columns: P = 0
    q = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    img = rows % B_img
    for t in range(T):
        w = tl.load(PW + rows * T + t, mask=mr, other=0.0)
        j = t * B_img + img
        lse = tl.load(TLSE + j, mask=mr, other=float("inf"))  # masked rows: P = 0, no overflow
        x = _logits_tile(ZT, WT, j, mr, cols, mc, D, stn, std, stk, stdw, IS_FP32, PRECISION,
                         BLOCK_N, BLOCK_K, BLOCK_D) * scale_t
        q += w[:, None] * tl.exp(x + tb[None, :] - lse[:, None])
    return tl.where(mr[:, None] & mc[None, :], q, 0.0)


@triton.jit
def _head_ce_fwd_kernel(
    ZS, WS, ZT, WT, TB, TLSE, PW, OUT_M, OUT_S, OUT_X,
    N, K, D, T, B_img, cols_per_split,
    ssn, ssd, ssk, ssdw, stn, std, stk, stdw, scale_s, scale_t,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mr = rows < N
    k_begin = split * cols_per_split
    k_end = tl.minimum(K, k_begin + cols_per_split)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    cross = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mc = cols < k_end
        x = _logits_tile(ZS, WS, rows, mr, cols, mc, D, ssn, ssd, ssk, ssdw, IS_FP32, PRECISION,
                         BLOCK_N, BLOCK_K, BLOCK_D) * scale_s
        q = _teacher_target_tile(ZT, WT, TB, TLSE, PW, rows, mr, cols, mc, T, B_img, D, stn, std, stk, stdw,
                                 scale_t, IS_FP32, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        cross += tl.sum(q * x, axis=1)  # q is 0 on masked columns, where x is finite (0)
        x = tl.where(mc[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
        m = m_new
    tl.store(OUT_M + split * N + rows, m, mask=mr)
    tl.store(OUT_S + split * N + rows, s, mask=mr)
    tl.store(OUT_X + split * N + rows, cross, mask=mr)


@triton.jit
def _grad_logits_tile(ZS, WS, ZT, WT, TB, TLSE, PW, SLSE, GW, rows, mr, cols, mc, D, T, B_img,
                      ssn, ssd, ssk, ssdw, stn, std, stk, stdw, scale_s, scale_t,
                      IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """∂loss/∂(z_s W_sᵀ) on a tile: scale_s · g_i (wsum_i softmax(S_i)_k - Σ_t w_it P_jk), where GW holds
    (g_i · scale_s, g_i · scale_s · wsum_i) per row; 0 where masked."""
    x = _logits_tile(ZS, WS, rows, mr, cols, mc, D, ssn, ssd, ssk, ssdw, IS_FP32, PRECISION,
                     BLOCK_N, BLOCK_K, BLOCK_D) * scale_s
    lse = tl.load(SLSE + rows, mask=mr, other=float("inf"))
    g = tl.load(GW + rows * 2, mask=mr, other=0.0)
    gw = tl.load(GW + rows * 2 + 1, mask=mr, other=0.0)
    q = _teacher_target_tile(ZT, WT, TB, TLSE, PW, rows, mr, cols, mc, T, B_img, D, stn, std, stk, stdw,
                             scale_t, IS_FP32, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
    grad = gw[:, None] * tl.exp(x - lse[:, None]) - g[:, None] * q
    return tl.where(mr[:, None] & mc[None, :], grad, 0.0)


@triton.jit
def _head_ce_bwd_dz_kernel(
    ZS, WS, ZT, WT, TB, TLSE, PW, SLSE, GW, OUT,
    N, K, D, T, B_img, cols_per_split,
    ssn, ssd, ssk, ssdw, stn, std, stk, stdw, scale_s, scale_t,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_d = tl.program_id(2)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mr = rows < N
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mdo = dcols < D
    k_begin = split * cols_per_split
    k_end = tl.minimum(K, k_begin + cols_per_split)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mc = cols < k_end
        grad = _grad_logits_tile(ZS, WS, ZT, WT, TB, TLSE, PW, SLSE, GW, rows, mr, cols, mc, D, T, B_img,
                                 ssn, ssd, ssk, ssdw, stn, std, stk, stdw, scale_s, scale_t,
                                 IS_FP32, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        w = tl.load(WS + cols[:, None] * ssk + dcols[None, :] * ssdw, mask=mc[:, None] & mdo[None, :], other=0.0)
        acc = mma(grad.to(w.dtype), w, acc, IS_FP32, PRECISION)
    out = OUT + split.to(tl.int64) * N * D + rows[:, None] * D + dcols[None, :]
    tl.store(out, acc, mask=mr[:, None] & mdo[None, :])


@triton.jit
def _head_ce_bwd_dw_kernel(
    ZS, WS, ZT, WT, TB, TLSE, PW, SLSE, GW, OUT,
    N, K, D, T, B_img, rows_per_split,
    ssn, ssd, ssk, ssdw, stn, std, stk, stdw, scale_s, scale_t,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    pid_d = tl.program_id(2)
    cols = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mc = cols < K
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mdo = dcols < D
    n_begin = split * rows_per_split
    n_end = tl.minimum(N, n_begin + rows_per_split)
    acc = tl.zeros((BLOCK_K, BLOCK_DO), dtype=tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mr = rows < n_end
        grad = _grad_logits_tile(ZS, WS, ZT, WT, TB, TLSE, PW, SLSE, GW, rows, mr, cols, mc, D, T, B_img,
                                 ssn, ssd, ssk, ssdw, stn, std, stk, stdw, scale_s, scale_t,
                                 IS_FP32, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        z = tl.load(ZS + rows[:, None] * ssn + dcols[None, :] * ssd, mask=mr[:, None] & mdo[None, :], other=0.0)
        acc = mma(tl.trans(grad.to(z.dtype)), z, acc, IS_FP32, PRECISION)
    out = OUT + split.to(tl.int64) * K * D + cols[:, None] * D + dcols[None, :]
    tl.store(out, acc, mask=mc[:, None] & mdo[None, :])


# ---- launchers ---------------------------------------------------------------------------------------------------
def _config(z, D, precision, backward=False):
    """(BLOCK_N, BLOCK_K, BLOCK_D, BLOCK_DO, num_warps, target number of programs)."""
    if z.device.type == "cpu":
        # The interpreter pays per program and per op: the smallest tiles tl.dot takes, and few programs (but more
        # than one, so the split-combining paths run in the tests).
        return 16, 16, 16, 16, 4, 4
    # 64x64 logit tiles, ~2 waves of 132 SMs. The gradient passes hold a (64, BLOCK_DO) fp32 accumulator beside the
    # logit tiles: 256 features fit with 16-bit inputs at 8 warps (wgmma), TF32 takes 128. IEEE fp32 has no tensor
    # cores (FMA dots): 16-wide D steps, and 64x32 tiles with 64 features per slice in the gradient passes. Each
    # choice is the largest without spills on sm_90 (tests/kernels/triton_compile.py).
    p2 = max(16, triton.next_power_of_2(D))
    if z.dtype == torch.float32 and precision != "tf32":
        return (64, 32, 16, min(64, p2), 8, 264) if backward else (64, 64, 16, min(64, p2), 8, 264)
    if z.dtype == torch.float32:
        return 64, 64, 32, min(128, p2), 8, 264
    return 64, 64, 64, min(256, p2), 8, 264


def _splits(n_tiles, total, target):
    """Number of splits of the `total` tiles of the looped dimension so the grid has about `target` programs, and
    the tiles each split covers."""
    splits = max(1, min(total, -(-target // max(n_tiles, 1))))
    per = -(-total // splits)
    return -(-total // per), per


def _strides(z, W):
    return z.stride(0), z.stride(1), W.stride(0), W.stride(1)


def _ptr(t, fallback):
    """An optional (empty = absent) vector argument: a valid pointer either way; HAS_* flags say which."""
    return t if t.numel() > 0 else fallback


def _combine_lse(m, s):
    """(splits, X) partial (max, Σ exp(x - max)) -> per-X (max, Σ exp(x - max)) over all splits."""
    M = m.amax(0)
    ref = torch.where(M == float("-inf"), torch.zeros_like(M), M)
    return M, (s * torch.exp(m - ref)).sum(0)


def head_col_lse_triton(z, W, col_bias, row_bias, scale):
    """Per prototype k: (max_n x_nk, Σ_n exp(x_nk - max)), x = scale · z Wᵀ + col_bias_k + row_bias_n; (K,) fp32."""
    N, D = z.shape
    K = W.shape[0]
    is_fp32, precision = dot_precision(z)
    BN, BK, BD, _, warps, target = _config(z, D, precision)
    k_tiles = triton.cdiv(K, BK)
    splits, per = _splits(k_tiles, triton.cdiv(N, BN), target)
    m = torch.empty((splits, K), device=z.device, dtype=torch.float32)
    s = torch.empty((splits, K), device=z.device, dtype=torch.float32)
    if N == 0:
        return m.fill_(float("-inf"))[0], s.zero_()[0]
    _head_col_lse_kernel[(k_tiles, splits)](
        z, W, _ptr(col_bias, m), _ptr(row_bias, m), m, s, N, K, D, per * BN, *_strides(z, W), scale,
        HAS_CB=col_bias.numel() > 0, HAS_RB=row_bias.numel() > 0, IS_FP32=is_fp32, PRECISION=precision,
        BLOCK_N=BN, BLOCK_K=BK, BLOCK_D=BD, num_warps=warps // 2,
    )
    return _combine_lse(m, s)


def head_row_lse_triton(z, W, col_bias, scale):
    """Per row n: logsumexp_k(scale · z_n·W_k + col_bias_k), (N,) fp32."""
    N, D = z.shape
    K = W.shape[0]
    is_fp32, precision = dot_precision(z)
    BN, BK, BD, _, warps, target = _config(z, D, precision)
    if N == 0:
        return torch.empty(0, device=z.device, dtype=torch.float32)
    n_tiles = triton.cdiv(N, BN)
    splits, per = _splits(n_tiles, triton.cdiv(K, BK), target)
    m = torch.empty((splits, N), device=z.device, dtype=torch.float32)
    s = torch.empty((splits, N), device=z.device, dtype=torch.float32)
    _head_row_lse_kernel[(n_tiles, splits)](
        z, W, _ptr(col_bias, m), m, s, N, K, D, per * BK, *_strides(z, W), scale,
        HAS_CB=col_bias.numel() > 0, IS_FP32=is_fp32, PRECISION=precision,
        BLOCK_N=BN, BLOCK_K=BK, BLOCK_D=BD, num_warps=warps // 2,
    )
    M, S = _combine_lse(m, s)
    return M + torch.log(S)


def head_ce_fwd_triton(zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, scale_s, scale_t):
    """(row loss (N_s,), student logsumexp (N_s,)), fp32: row loss_i = wsum_i lse_i - Σ_t w_it Σ_k P_jk S_ik."""
    N, D = zs.shape
    K = Ws.shape[0]
    T = pair_weight.shape[1]
    B_img = zt.shape[0] // T
    is_fp32, precision = dot_precision(zs)
    BN, BK, BD, _, warps, target = _config(zs, D, precision)
    if N == 0:
        e = torch.empty(0, device=zs.device, dtype=torch.float32)
        return e, e.clone()
    n_tiles = triton.cdiv(N, BN)
    splits, per = _splits(n_tiles, triton.cdiv(K, BK), target)
    m, s, x = (torch.empty((splits, N), device=zs.device, dtype=torch.float32) for _ in range(3))
    _head_ce_fwd_kernel[(n_tiles, splits)](
        zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, m, s, x,
        N, K, D, T, B_img, per * BK, *_strides(zs, Ws), *_strides(zt, Wt), scale_s, scale_t,
        IS_FP32=is_fp32, PRECISION=precision, BLOCK_N=BN, BLOCK_K=BK, BLOCK_D=BD, num_warps=warps,
    )
    M, S = _combine_lse(m, s)
    lse = M + torch.log(S)
    return pair_weight.sum(1) * lse - x.sum(0), lse


def head_ce_bwd_triton(grad_rows, zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, student_lse, scale_s,
                       scale_t, grad_z, grad_W):
    """Gradients of Σ_i grad_rows_i · row loss_i w.r.t. z_s (N_s, D) and W_s (K, D), in their dtypes (empty when not
    asked for): one pass over (row tiles × K splits) for dz, one over (K tiles × row splits) for dW."""
    N, D = zs.shape
    K = Ws.shape[0]
    T = pair_weight.shape[1]
    B_img = zt.shape[0] // T
    is_fp32, precision = dot_precision(zs)
    BN, BK, BD, BDO, warps, target = _config(zs, D, precision, backward=True)
    g = grad_rows.to(torch.float32) * scale_s
    gw = torch.stack([g, g * pair_weight.sum(1)], dim=1).contiguous()  # (N, 2)
    args = (zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, student_lse, gw)
    strides = (*_strides(zs, Ws), *_strides(zt, Wt), scale_s, scale_t)
    meta = dict(IS_FP32=is_fp32, PRECISION=precision, BLOCK_N=BN, BLOCK_K=BK, BLOCK_D=BD, BLOCK_DO=BDO,
                num_warps=warps)
    d_chunks = triton.cdiv(D, BDO)
    gz = zs.new_empty(0)
    gW = Ws.new_empty(0)
    if grad_z:
        if N == 0:
            gz = torch.zeros_like(zs, memory_format=torch.contiguous_format)
        else:
            n_tiles = triton.cdiv(N, BN)
            splits, per = _splits(n_tiles * d_chunks, triton.cdiv(K, BK), target)
            part = torch.empty((splits, N, D), device=zs.device, dtype=torch.float32)
            _head_ce_bwd_dz_kernel[(n_tiles, splits, d_chunks)](*args, part, N, K, D, T, B_img, per * BK, *strides,
                                                                 **meta)
            gz = part.sum(0).to(zs.dtype)
    if grad_W:
        if N == 0:
            gW = torch.zeros_like(Ws, memory_format=torch.contiguous_format)
        else:
            k_tiles = triton.cdiv(K, BK)
            splits, per = _splits(k_tiles * d_chunks, triton.cdiv(N, BN), target)
            part = torch.empty((splits, K, D), device=zs.device, dtype=torch.float32)
            _head_ce_bwd_dw_kernel[(k_tiles, splits, d_chunks)](*args, part, N, K, D, T, B_img, per * BN, *strides,
                                                                 **meta)
            gW = part.sum(0).to(Ws.dtype)
    return gz, gW
