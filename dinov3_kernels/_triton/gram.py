"""Triton kernels for the fused Gram-anchoring loss.

For one group g (an image, or the whole batch when img_level=False) with rows x_p (p < P) of S (student) and T
(teacher), x̂ = x / max(|x|, eps), Gs = ŜŜᵀ, Gt = T̂T̂ᵀ, E = clamp(Gs) - clamp(Gt):

    loss      = Σ_g Σ_ab E_ab² / M                       (M = number of Gram entries over all groups)
    dL/dŜ_a   = 4/M Σ_b E'_ab Ŝ_b,    E' = E [Gs_ab >= 0 or no clamp]      (E symmetric)
    dL/dT̂_a   = -4/M Σ_b E''_ab T̂_b,  E'' = E [Gt_ab >= 0 or no clamp]

Three kernels and a one-program loss sum, no atomics (the result does not depend on scheduling: deterministic):
1. `_gram_prologue_kernel` writes Y = [Ŝ | T̂] (G, Pp, 2·Dp) once, in the compute dtype (bf16/fp16 for 16-bit input;
   for fp32 input fp16 when the products may run in TF32, fp32 otherwise; fp32 for fp16 without normalisation, whose
   raw products can pass fp16's 65504: see _compute_dtype), zero-padded to whole tiles so the matrix loops need no
   masks, and the row norms (fp32).
2. `_gram_fwd_kernel`, a persistent grid (the programs that fit on the GPU at once) looping over the upper-triangle
   tile pairs of all groups: E_ij = [Ŝ_i | T̂_i]·[Ŝ_j | -T̂_j]ᵀ as one tl.dot chain over the 2·Dp columns (the
   accumulator's sign flips between the halves, so no -T̂ copy is stored) when not clamping, two chains when clamping
   (on a diagonal tile one load of Y_i per K step serves both operands). It adds the tile's share of the loss to a
   per-program partial (`_gram_loss_kernel` sums the partials in fp64, in a fixed order), writes E' (and E'' when it
   differs) in the compute dtype for the upper-triangle tile (i, j) only (E is symmetric), and the per-tile row sums
   of E'∘Gs and E''∘Gt the normalize backward needs (x̂_a·dL/dx̂_a = 4/M Σ_b E'_ab Gs_ab), each into its own slot: no
   cross-program reduction. The forward (gram_triton_forward) returns the loss and what the backward needs.
3. `_gram_bwd_kernel`, in the backward (gram_triton_backward), one program per (group, two row blocks i, column chunk)
   on the wgmma paths (one row block on the FMA and mma.sync ones): the GEMM dL/dx̂_i = ±grad_loss·4/M Σ_j E'_ij x̂_j
   with an fp32 accumulator per row block in registers (each x̂_j tile loaded feeds both), E'_ij read from the stored
   tile (i, j) or, left of the diagonal, tile (j, i) transposed, and x̂_j rebuilt from the input and its norm (or read
   from Y where Y was kept: P > D once padded, where E' outweighs it), then the normalize backward fused:
   dx = (g - x̂ (x̂·g)) / max(|x|, eps) (the projection summed from the row-sum slots in a fixed order), written in the
   input dtype; the incoming gradient is applied there, not by a separate pass.
No fp32 P×D accumulator and no atomics. Memory: during the forward Y and E'; between forward and backward E' (about
P²/2 per group in the compute dtype), the row-sum slots (2·P²/BLOCK fp32 per group) and the norms, plus Y where P > D;
during the backward that and the gradient. The gradient is never held between forward and backward.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_precision, mma

GRID_AXIS0_MAX = 2**31 - 1  # CUDA grid limits: x up to 2^31 - 1, y and z up to 65535
# Persistent forward: as many programs as fit on the GPU at once, each looping over tile pairs. A 128-wide tile at 8
# warps takes ~250 registers per thread (the whole register file of an SM: 1 program per SM); 64-wide ones fit 2.
PROGRAMS_PER_SM = {128: 1, 64: 2}
E_SCALE = 2.0**14  # E' in fp16 is stored times this (see gram_fwd_triton)


@triton.jit
def _tile_pair(pid):
    # Enumerates the upper triangle column by column: pid = j(j+1)/2 + i, 0 <= i <= j.
    j = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    return pid - j * (j + 1) // 2, j


@triton.jit
def _row_block(BLOCK_R: tl.constexpr, P, R):
    """This program's rows of a (G, P) grid flattened to R = G·P rows: (row, group, row in group, in range)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    g = rows // P
    return rows, g, rows - g * P, rows < R


@triton.jit
def _gram_prologue_kernel(
    S, T, Y, NRM, R, P, Pp, D, Dp,
    stride_sg, stride_sp, stride_sd,
    stride_tg, stride_tp, stride_td,
    eps,
    APPLY_NORM: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Rows (g, p) of the padded (G, Pp) grid, flattened: R = G·Pp. Y is (G, Pp, 2·Dp), NRM (G, 2, Pp).
    # ONE_PASS (BLOCK_D >= Dp): a whole row in registers, x read once; otherwise a norm pass, then a scaling pass.
    rows, g, p, mr = _row_block(BLOCK_R, Pp, R)
    mx = mr & (p < P)
    cols = tl.arange(0, BLOCK_D)
    for side in tl.static_range(2):
        if side == 0:
            x_ptr = S + g[:, None] * stride_sg + p[:, None] * stride_sp
            sd = stride_sd
        else:
            x_ptr = T + g[:, None] * stride_tg + p[:, None] * stride_tp
            sd = stride_td
        y_ptr = Y + rows[:, None] * (2 * Dp) + side * Dp
        r = tl.full((BLOCK_R,), 1.0, tl.float32)
        if ONE_PASS:
            x = tl.load(x_ptr + cols[None, :] * sd, mask=mx[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
            if APPLY_NORM:
                norm = tl.sqrt(tl.sum(x * x, axis=1))
                tl.store(NRM + (g * 2 + side) * Pp + p, norm, mask=mr)
                r = 1.0 / tl.maximum(norm, eps)  # F.normalize: x / max(|x|, eps)
            tl.store(y_ptr + cols[None, :], (x * r[:, None]).to(Y.dtype.element_ty),
                     mask=mr[:, None] & (cols < Dp)[None, :])
        elif APPLY_NORM:
            sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_D):
                k = k0 + cols
                x = tl.load(x_ptr + k[None, :] * sd, mask=mx[:, None] & (k < D)[None, :], other=0.0).to(tl.float32)
                sq += tl.sum(x * x, axis=1)
            norm = tl.sqrt(sq)
            tl.store(NRM + (g * 2 + side) * Pp + p, norm, mask=mr)
            r = 1.0 / tl.maximum(norm, eps)  # F.normalize: x / max(|x|, eps)
        if not ONE_PASS:
            for k0 in range(0, Dp, BLOCK_D):
                k = k0 + cols
                x = tl.load(x_ptr + k[None, :] * sd, mask=mx[:, None] & (k < D)[None, :], other=0.0).to(tl.float32)
                # x̂ = x·r is bounded by 1 in magnitude (by construction): the cast cannot overflow a 16-bit type.
                tl.store(y_ptr + k[None, :], (x * r[:, None]).to(Y.dtype.element_ty),
                         mask=mr[:, None] & (k < Dp)[None, :])


@triton.jit
def _chain(y_i, y_j, k_lo, k_hi, acc, BLOCK_K: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
           DIAG: tl.constexpr):
    # acc + Y_i[:, k_lo:k_hi] Y_j[:, k_lo:k_hi]ᵀ; on a diagonal tile (DIAG: i == j) one load serves both operands.
    for k0 in range(k_lo, k_hi, BLOCK_K):
        a = tl.load(y_i + k0)
        if DIAG:
            acc = mma(a, tl.trans(a), acc, IS_FP32, PRECISION)
        else:
            acc = mma(a, tl.trans(tl.load(y_j + k0)), acc, IS_FP32, PRECISION)
    return acc


@triton.jit
def _tile_products(y_i, y_j, Dp, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, TWO_CHAINS: tl.constexpr,
                   IS_FP32: tl.constexpr, PRECISION: tl.constexpr, DIAG: tl.constexpr):
    # (Gs_ij, Gt_ij) with TWO_CHAINS (the clamps need them apart), else (Gs_ij, Gs_ij - Gt_ij) from one chain over
    # the 2·Dp columns whose accumulator's sign flips between the halves: -(-Gs + T̂_i T̂_jᵀ) = Gs - Gt.
    gs = _chain(y_i, y_j, 0, Dp, tl.zeros((BLOCK, BLOCK), dtype=tl.float32), BLOCK_K, IS_FP32, PRECISION, DIAG)
    if TWO_CHAINS:
        second = _chain(y_i, y_j, Dp, 2 * Dp, tl.zeros((BLOCK, BLOCK), dtype=tl.float32), BLOCK_K, IS_FP32,
                        PRECISION, DIAG)
    else:
        second = -_chain(y_i, y_j, Dp, 2 * Dp, -gs, BLOCK_K, IS_FP32, PRECISION, DIAG)
    return gs, second


@triton.jit
def _gram_fwd_kernel(
    Y, E, RS, PART,
    n_items, pairs, nb, Pp, Dp, e_scale,
    CLAMP_S: tl.constexpr, CLAMP_T: tl.constexpr,
    STORE_S: tl.constexpr, STORE_T: tl.constexpr, T_SLOT: tl.constexpr, NUM_E: tl.constexpr,
    ROWSUMS: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Y (G, Pp, 2·Dp); E (G, NUM_E, pairs, BLOCK, BLOCK) in Y's dtype: the upper-triangle tiles only, tile (i, j),
    # i <= j, at pair index j(j+1)/2 + i; RS (G, 2, nb, Pp) fp32; PART (programs,) fp32.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_K)
    ldy = 2 * Dp
    part = tl.zeros((BLOCK,), dtype=tl.float32)
    # Persistent: program pid takes work items pid, pid + nprog, ... (item = group x upper-triangle tile pair).
    for w in range(pid, n_items, nprog):
        g = w // pairs
        q = w - g * pairs
        i, j = _tile_pair(q)
        g = g.to(tl.int64)
        rows_i = (i * BLOCK + offs).to(tl.int64)
        rows_j = (j * BLOCK + offs).to(tl.int64)
        y_i = Y + g * Pp * ldy + rows_i[:, None] * ldy + cols[None, :]
        y_j = Y + g * Pp * ldy + rows_j[:, None] * ldy + cols[None, :]
        if IS_FP32 and PRECISION == "ieee":  # the FMA path: a second copy of the loops spilled 16 B there (3.9)
            gs, second = _tile_products(y_i, y_j, Dp, BLOCK, BLOCK_K, CLAMP_S or CLAMP_T, IS_FP32, PRECISION, False)
        elif i == j:  # a diagonal tile: Y_i once per K step (both operands), 2 tiles loaded per step elsewhere
            gs, second = _tile_products(y_i, y_i, Dp, BLOCK, BLOCK_K, CLAMP_S or CLAMP_T, IS_FP32, PRECISION, True)
        else:
            gs, second = _tile_products(y_i, y_j, Dp, BLOCK, BLOCK_K, CLAMP_S or CLAMP_T, IS_FP32, PRECISION, False)
        if CLAMP_S or CLAMP_T:
            gt = second
            # where(x < 0, 0, x) rather than maximum: NaN must propagate as in the reference.
            gs_c = tl.where(gs < 0.0, 0.0, gs) if CLAMP_S else gs
            gt_c = tl.where(gt < 0.0, 0.0, gt) if CLAMP_T else gt
            err = gs_c - gt_c
        else:
            err = second
        # Padding rows and columns are zero in Y, so err is 0 there. Off-diagonal tiles stand for their transpose.
        sq = err * err
        part += tl.sum(sq, axis=1) * tl.where(i == j, 1.0, 2.0)
        if ROWSUMS:
            # x̂_a·(dL/dx̂_a) ∝ Σ_b E'_ab Gs_ab (student), Σ_b E''_ab Gt_ab (teacher): row sums for rows i go to slot
            # j, column sums for rows j to slot i. Done before the stores so that Gs (and Gt) die early.
            if CLAMP_S or CLAMP_T:
                ps = (tl.where(gs < 0.0, 0.0, err) if CLAMP_S else err) * gs
                pt = (tl.where(gt < 0.0, 0.0, err) if CLAMP_T else err) * gt
            else:
                ps = err * gs
                pt = ps - sq  # E·Gt = E·(Gs - E)
            rs = RS + g * 2 * nb * Pp
            tl.store(rs + j * Pp + rows_i, tl.sum(ps, axis=1))
            tl.store(rs + (nb + j) * Pp + rows_i, tl.sum(pt, axis=1))
            if i != j:
                tl.store(rs + i * Pp + rows_j, tl.sum(ps, axis=0))
                tl.store(rs + (nb + i) * Pp + rows_j, tl.sum(pt, axis=0))
        # E is symmetric: only tile (i, j) is stored; the gradient reads it transposed for (j, i).
        tile = (g * NUM_E * pairs + q) * (BLOCK * BLOCK) + offs[:, None] * BLOCK + offs[None, :]
        if STORE_S:
            e_s = ((tl.where(gs < 0.0, 0.0, err) if CLAMP_S else err) * e_scale).to(E.dtype.element_ty)
            tl.store(E + tile, e_s)
        if STORE_T:
            e_t = ((tl.where(gt < 0.0, 0.0, err) if CLAMP_T else err) * e_scale).to(E.dtype.element_ty)
            tl.store(E + T_SLOT * pairs * (BLOCK * BLOCK) + tile, e_t)
    tl.store(PART + pid, tl.sum(part, axis=0))


@triton.jit
def _x_hat_rows(X, NRM, g, k, dcols, P, Pp, D, side, stride_xg, stride_xp, stride_xd, eps,
                APPLY_NORM: tl.constexpr, CDTYPE: tl.constexpr):
    # Rows k of x̂ = x / max(|x|, eps) over columns dcols, from the input and the norms the prologue stored, rounded
    # to the compute dtype exactly as the prologue rounds Ŝ and T̂ for the forward (zero outside P x D).
    x = tl.load(X + g * stride_xg + k[:, None] * stride_xp + dcols[None, :] * stride_xd,
                mask=(k < P)[:, None] & (dcols < D)[None, :], other=0.0).to(tl.float32)
    if APPLY_NORM:
        r = 1.0 / tl.maximum(tl.load(NRM + (g * 2 + side) * Pp + k), eps)
        x = x * r[:, None]
    return x.to(CDTYPE)


@triton.jit
def _x_hat_tile(X, Y, NRM, g, k, dcols, P, Pp, D, Dp, side, stride_xg, stride_xp, stride_xd, eps,
                APPLY_NORM: tl.constexpr, FROM_Y: tl.constexpr, CDTYPE: tl.constexpr):
    if FROM_Y:  # the forward's Y = [Ŝ | T̂], kept (padded: no masks)
        return tl.load(Y + g * Pp * 2 * Dp + k[:, None] * (2 * Dp) + side * Dp + dcols[None, :])
    else:
        return _x_hat_rows(X, NRM, g, k, dcols, P, Pp, D, side, stride_xg, stride_xp, stride_xd, eps, APPLY_NORM,
                           CDTYPE)


@triton.jit
def _e_tile(e_g, i, kk, loc, ks, BLOCK_M: tl.constexpr, TRANS: tl.constexpr):
    # The (BLOCK_M, BLOCK_N) slice of E' at row block i and columns kk + ks: from the stored upper-triangle tile (i, jt)
    # (pair index jt(jt+1)/2 + i) on and right of the diagonal, or, left of it (TRANS), tile (jt, i) transposed (pair
    # index i(i+1)/2 + jt).
    jt = kk // BLOCK_M
    k0 = kk - jt * BLOCK_M
    if TRANS:
        tile = e_g + (i * (i + 1) // 2 + jt).to(tl.int64) * (BLOCK_M * BLOCK_M)
        return tl.trans(tl.load(tile + (k0 + ks)[:, None] * BLOCK_M + loc[None, :]))
    else:
        tile = e_g + (jt * (jt + 1) // 2 + i).to(tl.int64) * (BLOCK_M * BLOCK_M)
        return tl.load(tile + loc[:, None] * BLOCK_M + (k0 + ks)[None, :])


@triton.jit
def _gram_bwd_store(gh, i, g, RS, NRM, X, OUT, P, Pp, D, nb, side, stride_xg, stride_xp, stride_xd, scale, eps,
                    dcols, APPLY_NORM: tl.constexpr, BLOCK_M: tl.constexpr):
    # The epilogue of row block i: the normalize backward dx = (gh - x̂ (x̂·gh)) / max(|x|, eps) of gh = dL/dx̂ (fp32),
    # with x̂·gh = scale · Σ_slots RS (a fixed order: the same bits on every run).
    rows = (i * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mr = rows < P
    m = mr[:, None] & (dcols < D)[None, :]
    if APPLY_NORM:
        proj = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rs = RS + (g * 2 + side) * nb * Pp + rows
        for s in range(0, nb):
            proj += tl.load(rs + s * Pp)
        norm = tl.load(NRM + (g * 2 + side) * Pp + rows)
        r = 1.0 / tl.maximum(norm, eps)
        # Below eps the clamp is active and the norm carries no gradient.
        proj = tl.where(norm > eps, proj * scale, 0.0)
        x = tl.load(X + g * stride_xg + rows[:, None] * stride_xp + dcols[None, :] * stride_xd, mask=m, other=0.0)
        gx = (gh - (x.to(tl.float32) * r[:, None]) * proj[:, None]) * r[:, None]
    else:
        gx = gh
    tl.store(OUT + g * P * D + rows[:, None] * D + dcols[None, :], gx.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _gram_bwd_kernel(
    E, RS, NRM, X, Y, OUT, GL,
    P, Pp, D, Dp, nb, pairs, n_chunks, side, e_slot, NUM_E,
    stride_xg, stride_xp, stride_xd,
    scale, e_scale, eps,
    APPLY_NORM: tl.constexpr, FROM_Y: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ROW_BLOCKS: tl.constexpr, STAGE_SECOND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (group, ROW_BLOCKS consecutive row blocks, column chunk), flattened on grid axis 0 (the chunk
    # fastest, so programs that share row blocks of E' run together). For each of its row blocks i,
    # g = grad_loss · scale · E'_i: · x̂[:, chunk], with E' read from the stored upper-triangle tiles (tile (j, i)
    # transposed left of the diagonal) and x̂ rebuilt from x and its norm, or read from the forward's Y where it was
    # kept (FROM_Y: see _layout); then the normalize backward (_gram_bwd_store). OUT is (G, P, D) contiguous. E' is
    # stored times e_scale. With two row blocks each x̂ tile loaded serves two products (two accumulators): half the
    # x̂ traffic of one block per program. An odd last block pairs with itself (computed twice, stored once).
    # STAGE_SECOND (fp32 OUT): the second block's dL/dx̂ is parked in OUT (fp32, exact) before the first block's
    # epilogue and read back for its own, so that only one accumulator and one fp32 x tile are live at a time (both
    # accumulators and the fp32 x tile spilled 136 B at 128-row blocks).
    pid = tl.program_id(0)
    rb = pid // n_chunks
    c = pid - rb * n_chunks
    per_group = tl.cdiv(nb, ROW_BLOCKS)
    g = (rb // per_group).to(tl.int64)
    i0 = (rb - (rb // per_group) * per_group) * ROW_BLOCKS
    i1 = tl.minimum(i0 + ROW_BLOCKS - 1, nb - 1)  # == i0 for one block per program, and at an odd end
    loc = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_N)
    dcols = c * BLOCK_D + tl.arange(0, BLOCK_D)
    cdtype = E.dtype.element_ty
    e_g = E + (g * NUM_E + e_slot) * pairs * (BLOCK_M * BLOCK_M)
    acc0 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Columns left of block i0's diagonal block: both blocks read transposed tiles.
    for kk in range(0, i0 * BLOCK_M, BLOCK_N):
        xb = _x_hat_tile(X, Y, NRM, g, (kk + ks).to(tl.int64), dcols, P, Pp, D, Dp, side, stride_xg, stride_xp,
                         stride_xd, eps, APPLY_NORM, FROM_Y, cdtype)
        acc0 = mma(_e_tile(e_g, i0, kk, loc, ks, BLOCK_M, True), xb, acc0, IS_FP32, PRECISION)
        if ROW_BLOCKS == 2:
            acc1 = mma(_e_tile(e_g, i1, kk, loc, ks, BLOCK_M, True), xb, acc1, IS_FP32, PRECISION)
    # From i0's diagonal block to i1's: i0 reads stored tiles, i1 transposed ones (empty when i1 == i0).
    if ROW_BLOCKS == 2:
        for kk in range(i0 * BLOCK_M, i1 * BLOCK_M, BLOCK_N):
            xb = _x_hat_tile(X, Y, NRM, g, (kk + ks).to(tl.int64), dcols, P, Pp, D, Dp, side, stride_xg, stride_xp,
                             stride_xd, eps, APPLY_NORM, FROM_Y, cdtype)
            acc0 = mma(_e_tile(e_g, i0, kk, loc, ks, BLOCK_M, False), xb, acc0, IS_FP32, PRECISION)
            acc1 = mma(_e_tile(e_g, i1, kk, loc, ks, BLOCK_M, True), xb, acc1, IS_FP32, PRECISION)
    # From i1's diagonal block on: both read stored tiles.
    for kk in range(i1 * BLOCK_M, Pp, BLOCK_N):
        xb = _x_hat_tile(X, Y, NRM, g, (kk + ks).to(tl.int64), dcols, P, Pp, D, Dp, side, stride_xg, stride_xp,
                         stride_xd, eps, APPLY_NORM, FROM_Y, cdtype)
        acc0 = mma(_e_tile(e_g, i0, kk, loc, ks, BLOCK_M, False), xb, acc0, IS_FP32, PRECISION)
        if ROW_BLOCKS == 2:
            acc1 = mma(_e_tile(e_g, i1, kk, loc, ks, BLOCK_M, False), xb, acc1, IS_FP32, PRECISION)
    scale = tl.load(GL) * scale  # the incoming gradient, read on the device (no host sync)
    rows1 = (i1 * BLOCK_M + loc).to(tl.int64)
    park = OUT + g * P * D + rows1[:, None] * D + dcols[None, :]
    m1 = (rows1 < P)[:, None] & (dcols < D)[None, :]
    if ROW_BLOCKS == 2:
        if STAGE_SECOND:
            if i1 > i0:
                tl.store(park, acc1 * (scale / e_scale), mask=m1)
    _gram_bwd_store(acc0 * (scale / e_scale), i0, g, RS, NRM, X, OUT, P, Pp, D, nb, side, stride_xg, stride_xp,
                    stride_xd, scale, eps, dcols, APPLY_NORM, BLOCK_M)
    if ROW_BLOCKS == 2:
        if i1 > i0:
            if STAGE_SECOND:
                # Other threads of the program stored these elements (the accumulator's layout is not the load's):
                # a CTA barrier makes their stores visible.
                tl.debug_barrier()
                gh1 = tl.load(park, mask=m1, other=0.0)
            else:
                gh1 = acc1 * (scale / e_scale)
            _gram_bwd_store(gh1, i1, g, RS, NRM, X, OUT, P, Pp, D, nb, side, stride_xg, stride_xp, stride_xd, scale,
                            eps, dcols, APPLY_NORM, BLOCK_M)


@triton.jit
def _gram_loss_kernel(PART, LOSS, n, M, BLOCK: tl.constexpr):
    # loss = Σ partials / M, summed in float64 in a fixed order (accurate when M reaches billions of entries, the same
    # bits on every run), stored as fp32: one launch where torch took three (sum, divide, cast).
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for s in range(0, n, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        acc += tl.load(PART + offs, mask=offs < n, other=0.0).to(tl.float64)
    tl.store(LOSS, (tl.sum(acc, axis=0) / M).to(tl.float32))


def _sm(t):
    """Compute capability x10 of a CUDA tensor's device (0 on CPU)."""
    if not t.is_cuda:
        return 0
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _num_sms(t):
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 4


def _block_sizes(P, D, on_cpu, is_fp32=False, precision="ieee", sm=90, clamp=False):
    """Tiles: dict(BLOCK (fwd tile and bwd rows), BLOCK_K (fwd K step), BLOCK_N (bwd K step over P), BLOCK_D (bwd
    output columns), ROW_BLOCKS (row blocks per bwd program), and num_warps / num_stages of each kernel)."""
    if on_cpu:
        # The interpreter pays per program and per op, not per element: few, large tiles (tl.dot needs >= 16).
        b = max(16, min(128, triton.next_power_of_2(P)))
        k = max(16, min(128, triton.next_power_of_2(D)))
        return dict(BLOCK=b, BLOCK_K=k, BLOCK_N=b, BLOCK_D=k, ROW_BLOCKS=2, fwd=(4, 1), bwd=(4, 1))
    # From compiles for sm_90 (tests/kernels/triton_compile.py: registers, spills, shared memory, wgmma):
    # 16-bit and TF32 operands take 128-wide wgmma tiles at 8 warps; IEEE fp32 products run on FMA units with their
    # operands in registers, so they keep 64-wide tiles and 16-wide K slices (wider ones spilled); sm_80/86/89
    # (mma.sync) keep 64-wide tiles. Clamping keeps Gs, Gt and E live at once: 128-wide tiles spilled (16 B/thread
    # bf16, 96 B TF32), so it takes 64-wide ones. On the IEEE FMA path 2 stages spilled 8 B (clamping forward on
    # Triton 3.9, gradient on 3.6); 1 stage does not.
    if is_fp32 and precision == "ieee":
        b, k, d, fwd, bwd = 64, 16, 64, (8, 1 if clamp else 2), (8, 1)
    elif sm >= 90:
        k = 32 if is_fp32 else 64
        # 128 unless it pads P by over 10 % more than 64 would (P = 261: 384 rows against 320).
        b = 128 if triton.cdiv(P, 128) * 128 <= 1.1 * triton.cdiv(P, 64) * 64 and not clamp else 64
        d, fwd, bwd = 128, (8 if b == 128 else 4, 3), (8, 3)
    else:
        b, k, d, fwd, bwd = 64, 32, 64, (8, 3), (8, 3)
    b = min(b, max(16, triton.next_power_of_2(P)))
    # The gradient takes two row blocks per program on the wgmma paths (two accumulators share each x̂ tile: half the
    # x̂ bytes); the FMA and mma.sync paths keep one.
    rows = 2 if sm >= 90 and not (is_fp32 and precision == "ieee") else 1
    return dict(BLOCK=b, BLOCK_K=k, BLOCK_N=min(b, k if k >= 32 else 32), BLOCK_D=d, ROW_BLOCKS=rows, fwd=fwd,
                bwd=bwd)


def _compute_dtype(dtype, apply_norm, tf32=False):
    """The dtype Y and E' are stored in: the input's, except
    - fp16 without normalisation: raw Gram entries, and |x| itself, can pass fp16's 65504; fp32 holds them (and
      TF32 products of fp16 values are exact);
    - fp32 with normalisation where the products may run in TF32 (torch's allow_tf32): fp16, which keeps TF32's
      10-bit mantissa, holds |x̂| <= 1 and |E'| <= 2 (stored times E_SCALE), and runs wgmma at twice TF32's rate
      with half the bytes."""
    if dtype == torch.float16 and not apply_norm:
        return torch.float32
    if dtype == torch.float32 and apply_norm and tf32:
        return torch.float16
    return dtype


PROLOGUE_ONE_PASS_MAX = 8192  # widest padded row the prologue holds in registers (64 fp32 per thread at 4 warps)


def _prologue_blocks(Dp):
    """(BLOCK_R, BLOCK_D, ONE_PASS) of the prologue: whole rows, 4096 elements per program, when they fit."""
    width = max(16, triton.next_power_of_2(Dp))
    if width <= PROLOGUE_ONE_PASS_MAX:
        return max(1, min(16, 4096 // width)), width, True
    return 16, 128, False


def _grids(G, P, D, cfg, programs, grad_sides):
    """Padded sizes and the three launch grids; every grid is 1-D on axis 0 (up to 2^31 - 1 programs), so G and the
    tile counts never meet the 65535 limit of axes 1 and 2."""
    BLOCK = cfg["BLOCK"]
    step = max(cfg["BLOCK_K"], cfg["BLOCK_D"])
    Pp = triton.cdiv(P, BLOCK) * BLOCK
    Dp = triton.cdiv(D, step) * step
    nb = Pp // BLOCK
    pairs = nb * (nb + 1) // 2
    n_items = G * pairs
    n_chunks = Dp // cfg["BLOCK_D"]
    prologue = _prologue_blocks(Dp)
    grids = dict(prologue=(triton.cdiv(G * Pp, prologue[0]),), fwd=(max(1, min(n_items, programs)),),
                 bwd=(G * triton.cdiv(nb, cfg["ROW_BLOCKS"]) * n_chunks,) if grad_sides else None)
    for grid in grids.values():
        if grid is not None and grid[0] > GRID_AXIS0_MAX:
            raise ValueError(f"gram_loss: {grid[0]} programs exceed the CUDA grid limit (G={G}, P={P}, D={D})")
    return dict(Pp=Pp, Dp=Dp, nb=nb, pairs=pairs, n_items=n_items, n_chunks=n_chunks, grids=grids, prologue=prologue)


def _layout(s, apply_norm, clamp_s, clamp_t, grad_s, grad_t):
    """Everything the forward and backward launches and the saved tensors' shapes derive from, for (G, P, D) input s
    (a real or a fake tensor): compute dtype and dot precision, tiles, padded sizes, grids, the E' slots."""
    # int(): the tiles depend on the sizes, so under torch.compile's dynamic shapes this specialises on them.
    G, P, D = (int(n) for n in s.shape)
    is_fp32, precision = dot_precision(s)
    cdtype = _compute_dtype(s.dtype, apply_norm, precision == "tf32")
    if cdtype == torch.float16:
        is_fp32, precision = False, "ieee"
    elif cdtype != s.dtype:  # fp16 values in fp32: TF32 keeps them exactly
        is_fp32, precision = True, ("tf32" if _sm(s) >= 80 else "ieee")
    cfg = _block_sizes(P, D, s.device.type == "cpu", is_fp32, precision, _sm(s), clamp_s or clamp_t)
    assert cfg["BLOCK"] % cfg["BLOCK_N"] == 0, cfg  # the gradient's K steps stay inside one stored tile
    lay = dict(cdtype=cdtype, is_fp32=is_fp32, precision=precision, cfg=cfg)
    # E' slots: one matrix serves both gradients unless a clamp makes E' and E'' differ.
    separate = (clamp_s or clamp_t) and grad_s and grad_t
    lay.update(t_slot=1 if separate else 0, num_e=2 if separate else 1, store_t=grad_t and (separate or not grad_s),
               need_e=grad_s or grad_t)
    lay["programs"] = _num_sms(s) * PROGRAMS_PER_SM.get(cfg["BLOCK"], 2)
    lay.update(_grids(G, P, D, cfg, lay["programs"], grad_s or grad_t))
    # The backward's GEMM reads x̂ once per row block. Where E' outweighs x (Pp > Dp) Y is kept for it: the memory
    # is then E''s anyway, and x̂ re-read in the compute dtype costs half the bytes of fp32 x (predicted 1.91x ->
    # 2.34x the official path at G=8, P=4096, D=1024); at Pp <= Dp x̂ is rebuilt from x, so that what autograd holds
    # is E' alone (a quarter of the gradient's bytes at P = D in fp16).
    lay["keep_y"] = lay["need_e"] and lay["Pp"] > lay["Dp"]
    return lay


def saved_shapes(s, apply_norm, clamp_s, clamp_t, grad_s, grad_t):
    """((shape, dtype) of E', of the row-sum slots, of the norms, of the kept Y) that gram_triton_forward returns for
    input s: what the op's fake implementation allocates."""
    return _saved_shapes(_layout(s, apply_norm, clamp_s, clamp_t, grad_s, grad_t), int(s.shape[0]), apply_norm)


def _saved_shapes(lay, G, apply_norm):
    B, nb, Pp = lay["cfg"]["BLOCK"], lay["nb"], lay["Pp"]
    e = (G, lay["num_e"], lay["pairs"], B, B) if lay["need_e"] else (0,)
    rs = (G, 2, nb, Pp) if (apply_norm and lay["need_e"]) else (0,)
    nrm = (G, 2, Pp) if apply_norm else (0,)
    y = (G, Pp, 2 * lay["Dp"]) if lay["keep_y"] else (0,)
    return (e, lay["cdtype"]), (rs, torch.float32), (nrm, torch.float32), (y, lay["cdtype"])


def gram_triton_forward(s, t, *, apply_norm, clamp_s, clamp_t, grad_s, grad_t, eps=1e-12, programs=None):
    """Loss of the Gram loss for (G, P, D) student s and teacher t of one dtype, and what its gradient needs.

    Returns (loss fp32 scalar, E', row sums, norms, Y): E' (G, slots, pairs, BLOCK, BLOCK) the upper-triangle tiles of
    the masked error in the compute dtype (empty when no gradient is asked for), the fp32 row-sum slots of the
    normalize backward, the fp32 row norms (empty without normalisation) and Y = [Ŝ | T̂] where the backward reads it
    (P > D once padded; empty otherwise, when it lives only during this call).
    programs: size of the persistent forward grid (default: what fits on the GPU at once, PROGRAMS_PER_SM).
    """
    G, P, D = s.shape
    dev = s.device
    lay = _layout(s, apply_norm, clamp_s, clamp_t, grad_s, grad_t)
    cfg, cdtype, Pp, Dp, nb = lay["cfg"], lay["cdtype"], lay["Pp"], lay["Dp"], lay["nb"]
    # |E'| <= 2 with normalisation: stored times 2^14 in fp16 (at most 32768 < 65504), so that the small entries of a
    # student close to its teacher stay normal numbers (fp16 goes subnormal below 6e-5) and keep 10 mantissa bits.
    e_scale = E_SCALE if cdtype == torch.float16 else 1.0
    if programs is not None:
        lay["grids"]["fwd"] = (max(1, min(lay["n_items"], programs)),)
    (e_shape, _), (rs_shape, _), (nrm_shape, _), _ = _saved_shapes(lay, G, apply_norm)

    Y = torch.empty((G, Pp, 2 * Dp), device=dev, dtype=cdtype)
    nrm = torch.empty(nrm_shape, device=dev, dtype=torch.float32)
    _gram_prologue_kernel[lay["grids"]["prologue"]](
        s, t, Y, nrm if apply_norm else Y, G * Pp, P, Pp, D, Dp,
        s.stride(0), s.stride(1), s.stride(2), t.stride(0), t.stride(1), t.stride(2), eps,
        APPLY_NORM=apply_norm, ONE_PASS=lay["prologue"][2], BLOCK_R=lay["prologue"][0], BLOCK_D=lay["prologue"][1],
    )
    E = torch.empty(e_shape, device=dev, dtype=cdtype)
    RS = torch.empty(rs_shape, device=dev, dtype=torch.float32)
    fwd_grid = lay["grids"]["fwd"]
    part = torch.empty(fwd_grid, device=dev, dtype=torch.float32)
    _gram_fwd_kernel[fwd_grid](
        Y, E, RS, part, lay["n_items"], lay["pairs"], nb, Pp, Dp, e_scale,
        CLAMP_S=clamp_s, CLAMP_T=clamp_t, STORE_S=grad_s, STORE_T=lay["store_t"], T_SLOT=lay["t_slot"],
        NUM_E=lay["num_e"], ROWSUMS=RS.numel() > 0, IS_FP32=lay["is_fp32"], PRECISION=lay["precision"],
        BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["fwd"][0], num_stages=cfg["fwd"][1],
    )
    if not lay["keep_y"]:
        Y = Y.new_empty(0)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    _gram_loss_kernel[(1,)](part, loss, part.numel(), G * P * P, BLOCK=256, num_warps=4)
    return loss, E, RS, nrm, Y


def gram_triton_backward(grad_loss, s, t, E, RS, nrm, Y, *, apply_norm, clamp_s, clamp_t, grad_s, grad_t, eps=1e-12):
    """(d loss/d s · grad_loss or empty, d loss/d t · grad_loss or empty) from gram_triton_forward's saved tensors
    and the inputs themselves (the one that gets no gradient may be passed empty); grad_loss is a scalar tensor
    (read on the device)."""
    ref = s if grad_s else t
    G, P, D = ref.shape
    lay = _layout(ref, apply_norm, clamp_s, clamp_t, grad_s, grad_t)
    if E.dtype != lay["cdtype"]:
        raise RuntimeError(f"gram_loss backward: the saved E' is {E.dtype}, the forward's setting now gives "
                           f"{lay['cdtype']} (torch.backends.cuda.matmul.allow_tf32 changed between forward and "
                           f"backward?)")
    cfg = lay["cfg"]
    e_scale = E_SCALE if lay["cdtype"] == torch.float16 else 1.0
    gl = grad_loss.detach().to(device=ref.device, dtype=torch.float32).reshape(1)
    M = G * P * P

    def grad(x, side, slot, sign):
        out = torch.empty((G, P, D), device=x.device, dtype=x.dtype)
        _gram_bwd_kernel[lay["grids"]["bwd"]](
            E, RS if RS.numel() else gl, nrm if nrm.numel() else gl, x, Y if Y.numel() else E, out, gl,
            P, lay["Pp"], D, lay["Dp"], lay["nb"], lay["pairs"], lay["n_chunks"], side, slot, lay["num_e"],
            x.stride(0), x.stride(1), x.stride(2), sign * 4.0 / M, e_scale, eps,
            APPLY_NORM=apply_norm, FROM_Y=Y.numel() > 0, IS_FP32=lay["is_fp32"], PRECISION=lay["precision"],
            ROW_BLOCKS=cfg["ROW_BLOCKS"], STAGE_SECOND=out.dtype == torch.float32,
            BLOCK_M=cfg["BLOCK"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["bwd"][0], num_stages=cfg["bwd"][1],
        )
        return out

    gs = grad(s, 0, 0, 1.0) if grad_s else s.new_empty(0)
    gt = grad(t, 1, lay["t_slot"], -1.0) if grad_t else t.new_empty(0)
    return gs, gt


def gram_fwd_triton(s, t, *, apply_norm, clamp_s, clamp_t, grad_s, grad_t, eps=1e-12, programs=None):
    """(loss, grad_s or empty, grad_t or empty) for a loss weight of 1: the forward and backward in one call (the
    contract of the other backends' gram_loss_fwd; tests and the compile report use it)."""
    loss, E, RS, nrm, Y = gram_triton_forward(s, t, apply_norm=apply_norm, clamp_s=clamp_s, clamp_t=clamp_t,
                                              grad_s=grad_s, grad_t=grad_t, eps=eps, programs=programs)
    if not (grad_s or grad_t):
        return loss, s.new_empty(0), t.new_empty(0)
    gs, gt = gram_triton_backward(torch.ones((), device=s.device), s, t, E, RS, nrm, Y, apply_norm=apply_norm,
                                  clamp_s=clamp_s, clamp_t=clamp_t, grad_s=grad_s, grad_t=grad_t, eps=eps)
    return loss, gs, gt


# ---- the factored form's passes (dinov3_kernels/gram.py, _gram_fwd_factored) --------------------------------------
# The factored form's matrix products are cuBLAS GEMMs (torch); what is left are three passes, each one read of its
# inputs: over the rows, Z = [Ŝ + T̂ | Ŝ - T̂] with the row norms, and the normalize backward of a gradient; over the
# D x D products, the loss and the gradient GEMMs' operands.
ROW_PASS_ONE_PASS_MAX = 4096  # widest padded row held in registers (two rows of it at once: 64 fp32 per thread)


def _row_pass_blocks(D):
    """(BLOCK_R, BLOCK_D, ONE_PASS) of the row passes: whole rows, 4096 elements of each tensor per program, when they
    fit; 128-column chunks otherwise."""
    width = max(16, triton.next_power_of_2(D))
    if width <= ROW_PASS_ONE_PASS_MAX:
        return max(1, min(16, 4096 // width)), width, True
    return 16, 128, False


@triton.jit
def _gram_sum_diff_kernel(
    S, T, Z, NRM, R, P, D,
    stride_sg, stride_sp, stride_sd,
    stride_tg, stride_tp, stride_td,
    eps,
    APPLY_NORM: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Rows (g, p) flattened, R = G·P. Z is (G, P, 2·D) contiguous, NRM (G, 2, P) fp32.
    rows, g, p, mr = _row_block(BLOCK_R, P, R)
    cols = tl.arange(0, BLOCK_D)
    s_ptr = S + g[:, None] * stride_sg + p[:, None] * stride_sp
    t_ptr = T + g[:, None] * stride_tg + p[:, None] * stride_tp
    z_ptr = Z + rows[:, None] * (2 * D)
    if ONE_PASS:
        m = mr[:, None] & (cols < D)[None, :]
        xs = tl.load(s_ptr + cols[None, :] * stride_sd, mask=m, other=0.0).to(tl.float32)
        xt = tl.load(t_ptr + cols[None, :] * stride_td, mask=m, other=0.0).to(tl.float32)
        if APPLY_NORM:
            ns = tl.sqrt(tl.sum(xs * xs, axis=1))
            nt = tl.sqrt(tl.sum(xt * xt, axis=1))
            tl.store(NRM + (g * 2) * P + p, ns, mask=mr)
            tl.store(NRM + (g * 2 + 1) * P + p, nt, mask=mr)
            xs = xs * (1.0 / tl.maximum(ns, eps))[:, None]  # F.normalize: x / max(|x|, eps)
            xt = xt * (1.0 / tl.maximum(nt, eps))[:, None]
        tl.store(z_ptr + cols[None, :], (xs + xt).to(Z.dtype.element_ty), mask=m)
        tl.store(z_ptr + D + cols[None, :], (xs - xt).to(Z.dtype.element_ty), mask=m)
    else:
        rs = tl.full((BLOCK_R,), 1.0, tl.float32)
        rt = tl.full((BLOCK_R,), 1.0, tl.float32)
        if APPLY_NORM:
            ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
            st = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_D):
                k = k0 + cols
                m = mr[:, None] & (k < D)[None, :]
                xs = tl.load(s_ptr + k[None, :] * stride_sd, mask=m, other=0.0).to(tl.float32)
                xt = tl.load(t_ptr + k[None, :] * stride_td, mask=m, other=0.0).to(tl.float32)
                ss += tl.sum(xs * xs, axis=1)
                st += tl.sum(xt * xt, axis=1)
            ns = tl.sqrt(ss)
            nt = tl.sqrt(st)
            tl.store(NRM + (g * 2) * P + p, ns, mask=mr)
            tl.store(NRM + (g * 2 + 1) * P + p, nt, mask=mr)
            rs = 1.0 / tl.maximum(ns, eps)
            rt = 1.0 / tl.maximum(nt, eps)
        for k0 in range(0, D, BLOCK_D):
            k = k0 + cols
            m = mr[:, None] & (k < D)[None, :]
            xs = tl.load(s_ptr + k[None, :] * stride_sd, mask=m, other=0.0).to(tl.float32) * rs[:, None]
            xt = tl.load(t_ptr + k[None, :] * stride_td, mask=m, other=0.0).to(tl.float32) * rt[:, None]
            tl.store(z_ptr + k[None, :], (xs + xt).to(Z.dtype.element_ty), mask=m)
            tl.store(z_ptr + D + k[None, :], (xs - xt).to(Z.dtype.element_ty), mask=m)


@triton.jit
def _gram_norm_bwd_kernel(
    X, GR, NRM, F, OUT, R, P, D,
    stride_xg, stride_xp, stride_xd, stride_ng,
    eps,
    APPLY_NORM: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # OUT = d loss/dx (G, P, D) contiguous in x's dtype from GR = d loss/dx̂ / f (G, P, D) fp32 contiguous, f = *F (one
    # fp32 on the device: no host sync) and the norms NRM (g, p) at g·stride_ng + p:
    # dx = (ĝ - x̂ (x̂·ĝ)) / max(|x|, eps), ĝ = f·GR, the projection 0 where |x| <= eps (x̂ = x / eps is linear there).
    rows, g, p, mr = _row_block(BLOCK_R, P, R)
    cols = tl.arange(0, BLOCK_D)
    f = tl.load(F)
    x_ptr = X + g[:, None] * stride_xg + p[:, None] * stride_xp
    g_ptr = GR + rows[:, None] * D
    o_ptr = OUT + rows[:, None] * D
    r = tl.full((BLOCK_R,), 1.0, tl.float32)
    live = tl.full((BLOCK_R,), 0.0, tl.float32)
    if APPLY_NORM:
        n = tl.load(NRM + g * stride_ng + p, mask=mr, other=1.0)
        r = 1.0 / tl.maximum(n, eps)
        live = tl.where(n > eps, 1.0, 0.0)
    if ONE_PASS:
        m = mr[:, None] & (cols < D)[None, :]
        gr = tl.load(g_ptr + cols[None, :], mask=m, other=0.0) * f
        if APPLY_NORM:
            xh = tl.load(x_ptr + cols[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32) * r[:, None]
            proj = tl.sum(xh * gr, axis=1) * live
            gr = (gr - xh * proj[:, None]) * r[:, None]
        tl.store(o_ptr + cols[None, :], gr.to(OUT.dtype.element_ty), mask=m)
    else:
        proj = tl.zeros((BLOCK_R,), dtype=tl.float32)
        if APPLY_NORM:
            for k0 in range(0, D, BLOCK_D):
                k = k0 + cols
                m = mr[:, None] & (k < D)[None, :]
                gr = tl.load(g_ptr + k[None, :], mask=m, other=0.0) * f
                xh = tl.load(x_ptr + k[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32) * r[:, None]
                proj += tl.sum(xh * gr, axis=1)
            proj = proj * live
        for k0 in range(0, D, BLOCK_D):
            k = k0 + cols
            m = mr[:, None] & (k < D)[None, :]
            gr = tl.load(g_ptr + k[None, :], mask=m, other=0.0) * f
            if APPLY_NORM:
                xh = tl.load(x_ptr + k[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32) * r[:, None]
                gr = (gr - xh * proj[:, None]) * r[:, None]
            tl.store(o_ptr + k[None, :], gr.to(OUT.dtype.element_ty), mask=m)


def _row_grid(R, BLOCK_R):
    grid = (triton.cdiv(R, BLOCK_R),)
    if grid[0] > GRID_AXIS0_MAX:
        raise ValueError(f"gram_loss: {grid[0]} programs exceed the CUDA grid limit ({R} rows)")
    return grid


def gram_sum_diff_triton(s, t, z, *, apply_norm, eps=1e-12):
    """z (G, P, 2·D) contiguous <- [Ŝ + T̂ | Ŝ - T̂] in z's dtype (normalised in fp32 when apply_norm), one read of s and
    t; returns the fp32 row norms (G, 2, P) (student, teacher), or None without normalisation."""
    G, P, D = s.shape
    assert z.is_contiguous() and z.shape == (G, P, 2 * D)
    nrm = torch.empty((G, 2, P), device=s.device, dtype=torch.float32) if apply_norm else None
    BLOCK_R, BLOCK_D, one_pass = _row_pass_blocks(D)
    _gram_sum_diff_kernel[_row_grid(G * P, BLOCK_R)](
        s, t, z, nrm if apply_norm else z, G * P, P, D,
        s.stride(0), s.stride(1), s.stride(2), t.stride(0), t.stride(1), t.stride(2), eps,
        APPLY_NORM=apply_norm, ONE_PASS=one_pass, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return nrm


def gram_norm_backward_triton(x, g, norms, factor, *, apply_norm, eps=1e-12):
    """d loss/dx in x's dtype, (G, P, D) contiguous, from g = d loss/dx̂ / factor ((G, P, D) fp32 contiguous), the
    factor (a one-element tensor, read on the device) and the row norms (G, P) of x (any strides; None without
    normalisation): one read of x and g."""
    G, P, D = x.shape
    assert g.is_contiguous() and g.dtype == torch.float32 and g.shape == x.shape
    out = torch.empty((G, P, D), device=x.device, dtype=x.dtype)
    f = factor.detach().to(device=x.device, dtype=torch.float32).reshape(1)
    BLOCK_R, BLOCK_D, one_pass = _row_pass_blocks(D)
    _gram_norm_bwd_kernel[_row_grid(G * P, BLOCK_R)](
        x, g, norms if apply_norm else f, f, out, G * P, P, D,
        x.stride(0), x.stride(1), x.stride(2), norms.stride(0) if apply_norm else 0, eps,
        APPLY_NORM=apply_norm, ONE_PASS=one_pass, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return out


@triton.jit
def _gram_factored_dd_kernel(
    K11, K22, K12, SCALE, WS, WT, PART, D, tiles,
    WANT_S: tl.constexpr, WANT_T: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per (group, BLOCK x BLOCK tile (i, j)) of the D x D products K11 = ΣᵀΣ, K22 = ΔᵀΔ, K12 = ΣᵀΔ
    # ((G, D, D) fp32 contiguous; K21 = K12ᵀ read as the transposed tile (j, i)):
    #   PART[pid] = ½ Σ_tile (K11 ⊙ K22 + K12 ⊙ K21)                 (the tile's share of M·loss)
    #   WS (G, 2D, D) = scale · [K21 + K22 ; K11 + K12],  WT = scale · [K21 - K22 ; K11 - K12]   (the GEMM operands)
    pid = tl.program_id(0)
    g = pid // tiles
    r = pid - g * tiles
    nt = tl.cdiv(D, BLOCK)
    ti = r // nt
    tj = r - ti * nt
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    m = (rows < D)[:, None] & (cols < D)[None, :]
    base = g.to(tl.int64) * D * D
    ij = base + rows[:, None] * D + cols[None, :]
    k11 = tl.load(K11 + ij, mask=m, other=0.0)
    k22 = tl.load(K22 + ij, mask=m, other=0.0)
    k12 = tl.load(K12 + ij, mask=m, other=0.0)
    k21 = tl.load(K12 + base + cols[None, :] * D + rows[:, None], mask=m, other=0.0)
    tl.store(PART + pid, 0.5 * tl.sum(tl.sum(k11 * k22 + k12 * k21, axis=1), axis=0))
    scale = tl.load(SCALE)
    w_top = g.to(tl.int64) * 2 * D * D + rows[:, None] * D + cols[None, :]
    w_bot = w_top + D * D
    if WANT_S:
        tl.store(WS + w_top, ((k21 + k22) * scale).to(WS.dtype.element_ty), mask=m)
        tl.store(WS + w_bot, ((k11 + k12) * scale).to(WS.dtype.element_ty), mask=m)
    if WANT_T:
        tl.store(WT + w_top, ((k21 - k22) * scale).to(WT.dtype.element_ty), mask=m)
        tl.store(WT + w_bot, ((k11 - k12) * scale).to(WT.dtype.element_ty), mask=m)


def gram_factored_dd_triton(k11, k22, k12, scale, cdtype, *, want_s, want_t):
    """(M·loss as a 0-d fp64 tensor, WS or None, WT or None) from the factored form's D x D products ((G, D, D) fp32
    contiguous): one read of each product; WS/WT (G, 2D, D) in cdtype, times `scale` (a one-element tensor)."""
    G, D, _ = k11.shape
    BLOCK = 64 if k11.is_cuda else max(16, min(64, triton.next_power_of_2(D)))
    tiles = triton.cdiv(D, BLOCK) ** 2
    grid = (G * tiles,)
    if grid[0] > GRID_AXIS0_MAX:
        raise ValueError(f"gram_loss: {grid[0]} programs exceed the CUDA grid limit (G={G}, D={D})")
    part = torch.empty(grid, device=k11.device, dtype=torch.float32)
    ws = torch.empty((G, 2 * D, D), device=k11.device, dtype=cdtype) if want_s else None
    wt = torch.empty((G, 2 * D, D), device=k11.device, dtype=cdtype) if want_t else None
    sc = scale.detach().to(device=k11.device, dtype=torch.float32).reshape(1)
    _gram_factored_dd_kernel[grid](
        k11, k22, k12, sc, ws if want_s else part, wt if want_t else part, part, D, tiles,
        WANT_S=want_s, WANT_T=want_t, BLOCK=BLOCK, num_warps=4,
    )
    return part.sum(dtype=torch.float64), ws, wt
