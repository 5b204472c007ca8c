"""Triton kernels for the fused Gram-anchoring loss.

For one group g (an image, or the whole batch when img_level=False) with rows x_p (p < P) of S (student) and T
(teacher), x̂ = x / max(|x|, eps), Gs = ŜŜᵀ, Gt = T̂T̂ᵀ, E = clamp(Gs) - clamp(Gt):

    loss      = Σ_g Σ_ab E_ab² / M                       (M = number of Gram entries over all groups)
    dL/dŜ_a   = 4/M Σ_b E_ab [Gs_ab >= 0 or no clamp] Ŝ_b   (E symmetric)
    dL/dT̂_a   = -4/M Σ_b E_ab [Gt_ab >= 0 or no clamp] T̂_b

`_gram_fwd_kernel` runs one program per tile pair (i <= j) of the P×P matrix: it builds the Gs and Gt tiles in
registers, adds its share of the loss to a per-program partial, and scatters the tile's gradient contribution to
rows i (and, off the diagonal, the transposed contribution to rows j) into fp32 accumulators with atomics. No P×P
matrix ever reaches global memory. Normalisation is folded in: the dots run on the raw rows and are rescaled by the
inverse norms, which each program accumulates from the rows it loads anyway. `_gram_norm_bwd_kernel` then turns the
gradient with respect to x̂ into the gradient with respect to x.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_precision, mma


@triton.jit
def _tile_pair(pid):
    # Enumerates the upper triangle column by column: pid = j(j+1)/2 + i, 0 <= i <= j.
    j = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    return pid - j * (j + 1) // 2, j


@triton.jit
def _gram_fwd_kernel(
    S, T, GS, GT, PART,
    P, D,
    stride_sg, stride_sp, stride_sd,
    stride_tg, stride_tp, stride_td,
    scale, eps,
    APPLY_NORM: tl.constexpr, CLAMP_S: tl.constexpr, CLAMP_T: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    num_pairs = tl.num_programs(0)
    i, j = _tile_pair(pid)

    rows_i = (i * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rows_j = (j * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mi = rows_i < P
    mj = rows_j < P
    cols = tl.arange(0, BLOCK_K)
    s_i = S + g * stride_sg + rows_i[:, None] * stride_sp
    s_j = S + g * stride_sg + rows_j[:, None] * stride_sp
    t_i = T + g * stride_tg + rows_i[:, None] * stride_tp
    t_j = T + g * stride_tg + rows_j[:, None] * stride_tp

    acc_s = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    sq_si = tl.zeros((BLOCK,), dtype=tl.float32)
    sq_sj = tl.zeros((BLOCK,), dtype=tl.float32)
    sq_ti = tl.zeros((BLOCK,), dtype=tl.float32)
    sq_tj = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + cols
        mk = k < D
        a_s = tl.load(s_i + k[None, :] * stride_sd, mask=mi[:, None] & mk[None, :], other=0.0)
        b_s = tl.load(s_j + k[None, :] * stride_sd, mask=mj[:, None] & mk[None, :], other=0.0)
        a_t = tl.load(t_i + k[None, :] * stride_td, mask=mi[:, None] & mk[None, :], other=0.0)
        b_t = tl.load(t_j + k[None, :] * stride_td, mask=mj[:, None] & mk[None, :], other=0.0)
        acc_s = mma(a_s, tl.trans(b_s), acc_s, IS_FP32, PRECISION)
        acc_t = mma(a_t, tl.trans(b_t), acc_t, IS_FP32, PRECISION)
        if APPLY_NORM:
            a_s32 = a_s.to(tl.float32)
            b_s32 = b_s.to(tl.float32)
            a_t32 = a_t.to(tl.float32)
            b_t32 = b_t.to(tl.float32)
            sq_si += tl.sum(a_s32 * a_s32, axis=1)
            sq_sj += tl.sum(b_s32 * b_s32, axis=1)
            sq_ti += tl.sum(a_t32 * a_t32, axis=1)
            sq_tj += tl.sum(b_t32 * b_t32, axis=1)

    if APPLY_NORM:
        # F.normalize semantics: x / max(|x|, eps).
        r_si = 1.0 / tl.maximum(tl.sqrt(sq_si), eps)
        r_sj = 1.0 / tl.maximum(tl.sqrt(sq_sj), eps)
        r_ti = 1.0 / tl.maximum(tl.sqrt(sq_ti), eps)
        r_tj = 1.0 / tl.maximum(tl.sqrt(sq_tj), eps)
        gs = acc_s * r_si[:, None] * r_sj[None, :]
        gt = acc_t * r_ti[:, None] * r_tj[None, :]
    else:
        gs = acc_s
        gt = acc_t
    # where(x < 0, 0, x) rather than maximum: NaN must propagate as in the reference.
    gs_c = gs
    gt_c = gt
    if CLAMP_S:
        gs_c = tl.where(gs < 0.0, 0.0, gs)
    if CLAMP_T:
        gt_c = tl.where(gt < 0.0, 0.0, gt)
    valid = mi[:, None] & mj[None, :]
    err = tl.where(valid, gs_c - gt_c, 0.0)
    # Off-diagonal tiles stand for themselves and their transpose.
    weight = tl.where(i == j, 1.0, 2.0)
    tl.store(PART + g * num_pairs + pid, tl.sum(tl.sum(err * err, axis=1), axis=0) * weight)

    dtype = S.dtype.element_ty
    if GRAD_S:
        w = err
        if CLAMP_S:
            w = tl.where(gs < 0.0, 0.0, w)
        if APPLY_NORM:
            w_rows = w * r_sj[None, :]  # multiplies raw S_j rows -> Ŝ_j
            w_cols = w * r_si[:, None]
        else:
            w_rows = w
            w_cols = w
        _scatter_grad(S, GS, g, rows_i, rows_j, mi, mj, i, j, P, D, stride_sg, stride_sp, stride_sd,
                      w_rows.to(dtype), tl.trans(w_cols).to(dtype), scale, IS_FP32, PRECISION, BLOCK, BLOCK_K)
    if GRAD_T:
        w = -err
        if CLAMP_T:
            w = tl.where(gt < 0.0, 0.0, w)
        if APPLY_NORM:
            w_rows = w * r_tj[None, :]
            w_cols = w * r_ti[:, None]
        else:
            w_rows = w
            w_cols = w
        _scatter_grad(T, GT, g, rows_i, rows_j, mi, mj, i, j, P, D, stride_tg, stride_tp, stride_td,
                      w_rows.to(dtype), tl.trans(w_cols).to(dtype), scale, IS_FP32, PRECISION, BLOCK, BLOCK_K)


@triton.jit
def _scatter_grad(X, GX, g, rows_i, rows_j, mi, mj, i, j, P, D, stride_g, stride_p, stride_d,
                  w_ij, w_ji, scale, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    # GX[rows_i] += scale * w_ij @ X[rows_j];  off the diagonal also GX[rows_j] += scale * w_ji @ X[rows_i].
    cols = tl.arange(0, BLOCK_K)
    x_i = X + g * stride_g + rows_i[:, None] * stride_p
    x_j = X + g * stride_g + rows_j[:, None] * stride_p
    gx_i = GX + g * P * D + rows_i[:, None] * D
    gx_j = GX + g * P * D + rows_j[:, None] * D
    for k0 in range(0, D, BLOCK_K):
        k = k0 + cols
        mk = k < D
        xj = tl.load(x_j + k[None, :] * stride_d, mask=mj[:, None] & mk[None, :], other=0.0)
        upd = mma(w_ij, xj, tl.zeros((BLOCK, BLOCK_K), dtype=tl.float32), IS_FP32, PRECISION) * scale
        # relaxed: only a later kernel reads GX; the default acq_rel wraps each one in fences (SASS).
        tl.atomic_add(gx_i + k[None, :], upd, mask=mi[:, None] & mk[None, :], sem="relaxed")
        if i != j:
            xi = tl.load(x_i + k[None, :] * stride_d, mask=mi[:, None] & mk[None, :], other=0.0)
            upd = mma(w_ji, xi, tl.zeros((BLOCK, BLOCK_K), dtype=tl.float32), IS_FP32, PRECISION) * scale
            tl.atomic_add(gx_j + k[None, :], upd, mask=mj[:, None] & mk[None, :], sem="relaxed")


@triton.jit
def _gram_norm_bwd_kernel(
    X, GXH, OUT, R, D,
    stride_r, stride_d,
    eps,
    APPLY_NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # x̂ = x / max(|x|, eps):  dx = (g - x̂ (x̂·g)) / |x|  if |x| > eps,  else g / eps.
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mr = rows < R
    cols = tl.arange(0, BLOCK_D)
    x_ptr = X + rows[:, None] * stride_r
    g_ptr = GXH + rows[:, None] * D
    o_ptr = OUT + rows[:, None] * D
    if APPLY_NORM:
        sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
        xg = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            k = k0 + cols
            m = mr[:, None] & (k < D)[None, :]
            x = tl.load(x_ptr + k[None, :] * stride_d, mask=m, other=0.0).to(tl.float32)
            gh = tl.load(g_ptr + k[None, :], mask=m, other=0.0)
            sq += tl.sum(x * x, axis=1)
            xg += tl.sum(x * gh, axis=1)
        norm = tl.sqrt(sq)
        r = 1.0 / tl.maximum(norm, eps)
        # Below eps the clamp is active and the norm carries no gradient.
        proj = tl.where(norm > eps, xg * r * r * r, 0.0)
    for k0 in range(0, D, BLOCK_D):
        k = k0 + cols
        m = mr[:, None] & (k < D)[None, :]
        gh = tl.load(g_ptr + k[None, :], mask=m, other=0.0)
        if APPLY_NORM:
            x = tl.load(x_ptr + k[None, :] * stride_d, mask=m, other=0.0).to(tl.float32)
            gx = gh * r[:, None] - x * proj[:, None]
        else:
            gx = gh
        tl.store(o_ptr + k[None, :], gx.to(OUT.dtype.element_ty), mask=m)


def _sm(t):
    """Compute capability x10 of a CUDA tensor's device (0 on CPU)."""
    if not t.is_cuda:
        return 0
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _block_sizes(P, D, on_cpu, is_fp32=False, precision="ieee", sm=90):
    """(BLOCK, BLOCK_K, num_warps, num_stages) of the forward kernel."""
    if on_cpu:
        # The interpreter pays per program and per op, not per element: few, large tiles (tl.dot needs >= 16).
        return max(16, min(128, triton.next_power_of_2(P))), max(16, min(128, triton.next_power_of_2(D))), 4, 1
    # From compiles for sm_90 and sm_80 (tests/kernels/triton_compile.py reports registers and spills): IEEE fp32
    # products run on FMA units with their operands in registers, so 64-wide K slices at 4 warps spilled about 7 KB
    # per thread; 16-wide slices at 8 warps do not. TF32 at 8 warps does not spill either; 16-bit inputs on sm_90 fit
    # at 4 warps. Every choice fits in an A100's 163 KB of shared memory per block.
    if is_fp32 and precision == "ieee":
        k_cap, warps, stages = 16, 8, 2
    elif is_fp32:  # 3 stages need 192 KB with both gradients: more than an A100 block has
        k_cap, warps, stages = (64 if sm >= 90 else 32), 8, 2
    elif sm >= 90:
        k_cap, warps, stages = 64, 4, 3
    else:  # mma.sync layouts (sm_80/86/89): 64-wide slices spilled up to 1.8 KB/thread at 4 warps, 32 at 8 do not
        k_cap, warps, stages = 32, 8, 3
    return max(16, min(64, triton.next_power_of_2(P))), max(16, min(k_cap, triton.next_power_of_2(D))), warps, stages


def _norm_backward(x, g_hat, apply_norm, eps):
    """(G, P, D) strided x, contiguous fp32 gradient w.r.t. x̂ -> contiguous gradient w.r.t. x in x.dtype."""
    G, P, D = x.shape
    out = torch.empty((G, P, D), device=x.device, dtype=x.dtype)
    x2 = x.reshape(G * P, D)  # a view whenever the group/row strides allow it
    R = G * P
    BLOCK_R, BLOCK_D = 16, max(16, min(128, triton.next_power_of_2(D)))
    _gram_norm_bwd_kernel[(triton.cdiv(R, BLOCK_R),)](
        x2, g_hat, out, R, D, x2.stride(0), x2.stride(1), eps,
        APPLY_NORM=apply_norm, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    return out


def gram_fwd_triton(s, t, *, apply_norm, clamp_s, clamp_t, grad_s, grad_t, eps=1e-12):
    """Loss and gradients of the Gram loss for (G, P, D) student s and teacher t of one dtype.

    Returns (loss fp32 scalar, grad_s or empty, grad_t or empty); gradients are for a loss weight of 1.
    """
    G, P, D = s.shape
    is_fp32, precision = dot_precision(s)
    BLOCK, BLOCK_K, num_warps, num_stages = _block_sizes(P, D, s.device.type == "cpu", is_fp32, precision, _sm(s))
    nb = triton.cdiv(P, BLOCK)
    num_pairs = nb * (nb + 1) // 2
    partial = torch.empty((G, num_pairs), device=s.device, dtype=torch.float32)
    acc_s = torch.zeros((G, P, D), device=s.device, dtype=torch.float32) if grad_s else partial
    acc_t = torch.zeros((G, P, D), device=s.device, dtype=torch.float32) if grad_t else partial
    M = G * P * P
    _gram_fwd_kernel[(num_pairs, G)](
        s, t, acc_s, acc_t, partial,
        P, D,
        s.stride(0), s.stride(1), s.stride(2),
        t.stride(0), t.stride(1), t.stride(2),
        4.0 / M, eps,
        APPLY_NORM=apply_norm, CLAMP_S=clamp_s, CLAMP_T=clamp_t, GRAD_S=grad_s, GRAD_T=grad_t,
        IS_FP32=is_fp32, PRECISION=precision, BLOCK=BLOCK, BLOCK_K=BLOCK_K,
        num_warps=num_warps, num_stages=num_stages,
    )
    # Summing the partials in float64 keeps the loss accurate when M reaches billions of entries.
    loss = (partial.sum(dtype=torch.float64) / M).to(torch.float32)
    gs = _norm_backward(s, acc_s, apply_norm, eps) if grad_s else s.new_empty(0)
    gt = _norm_backward(t, acc_t, apply_norm, eps) if grad_t else t.new_empty(0)
    return loss, gs, gt
