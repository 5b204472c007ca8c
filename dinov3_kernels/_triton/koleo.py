"""Triton kernels for the fused KoLeo loss.

Search set S (M, D) of raw features, query rows S[offset : offset + n], u = s / max(|s|, eps):

    nn_k(i)  = the k-th largest u_i·u_j over j != offset + i (ties to the lowest j),   k < K
    d_ik     = |u_i - u_nn_k(i) + pdist_eps|                 (torch.nn.PairwiseDistance(2, eps=pdist_eps))
    loss     = -1/(nK) Σ_ik log(d_ik + eps)

Two launches: `_koleo_norm_kernel` writes |s| for every row of S (M floats) and zeroes the arrival counter;
`_koleo_search_kernel` runs one program per BLOCK_M query rows, tiles u_i·u_jᵀ over the whole search set and keeps
each row's K best in registers (no n×M matrix anywhere), then gathers the K neighbours, computes d_ik exactly from
the rows (not from 2 - 2cos, which cancels for close pairs) and its share of the loss. The last program to arrive
sums the per-program partials in a fixed order, so the loss is deterministic.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_precision, mma


@triton.jit
def _koleo_norm_kernel(S, NORM, COUNTER, M, D, stride_m, stride_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mr = rows < M
    cols = tl.arange(0, BLOCK_D)
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        k = k0 + cols
        x = tl.load(S + rows[:, None] * stride_m + k[None, :] * stride_d, mask=mr[:, None] & (k < D)[None, :],
                    other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    tl.store(NORM + rows, tl.sqrt(sq), mask=mr)
    if pid == 0:
        tl.store(COUNTER, 0)


@triton.jit
def _koleo_search_kernel(
    S, NORM, IDX, DIST, PART, COUNTER, LOSS,
    n, M, D, offset,
    stride_m, stride_d,
    eps, pdist_eps, scale,
    TOPK: tl.constexpr, KP: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # query row i; its search index is offset + i
    mr = rows < n
    grows = (offset + rows).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, KP)
    big = 2147483647
    r_i = 1.0 / tl.maximum(tl.load(NORM + grows, mask=mr, other=1.0), eps)
    q_ptr = S + grows[:, None] * stride_m

    # Running top-K per row, unsorted: (value, index). Empty slots hold (-inf, M): any real candidate beats them and
    # an index of M marks "no neighbour". Padding slots (>= TOPK) hold +inf so they are never the worst slot.
    pad = slots[None, :] >= TOPK
    best_v = tl.where(pad, float("inf"), tl.full((BLOCK_M, KP), float("-inf"), tl.float32))
    best_i = tl.where(pad, -1, tl.full((BLOCK_M, KP), M, tl.int32))

    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        mc = cols < M
        c_ptr = S + cols[:, None].to(tl.int64) * stride_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + kk
            mk = k < D
            a = tl.load(q_ptr + k[None, :] * stride_d, mask=mr[:, None] & mk[None, :], other=0.0)
            b = tl.load(c_ptr + k[None, :] * stride_d, mask=mc[:, None] & mk[None, :], other=0.0)
            acc = mma(a, tl.trans(b), acc, IS_FP32, PRECISION)
        r_j = 1.0 / tl.maximum(tl.load(NORM + cols, mask=mc, other=1.0), eps)
        sim = acc * r_i[:, None] * r_j[None, :]
        sim = tl.where(mc[None, :] & (cols[None, :] != grows[:, None]), sim, float("-inf"))

        # Columns arrive in increasing order, so a candidate equal to a held value always loses (ties to the lowest
        # index) and "strictly greater than the worst held value" is the whole test. Most tiles change nothing.
        worst = tl.min(best_v, axis=1)
        if tl.max((tl.max(sim, axis=1) > worst).to(tl.int32), axis=0) > 0:
            for _t in tl.static_range(TOPK):
                v = tl.max(sim, axis=1)
                c = tl.min(tl.where(sim == v[:, None], cols[None, :], big), axis=1)
                wv = tl.min(best_v, axis=1)
                # Among equal worst values the highest index is the worst.
                wi = tl.max(tl.where(best_v == wv[:, None], best_i, -1), axis=1)
                ws = tl.min(tl.where((best_v == wv[:, None]) & (best_i == wi[:, None]), slots[None, :], KP), axis=1)
                put = (v > wv)[:, None] & (slots[None, :] == ws[:, None])
                best_v = tl.where(put, v[:, None], best_v)
                best_i = tl.where(put, c[:, None], best_i)
                sim = tl.where(cols[None, :] == c[:, None], float("-inf"), sim)

    # Emit the K neighbours best first; each extracted slot becomes (-inf, big) so it is never picked again.
    best_v = tl.where(pad, float("-inf"), best_v)
    best_i = tl.where(pad, big, best_i)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in tl.static_range(TOPK):
        v = tl.max(best_v, axis=1)
        c = tl.min(tl.where(best_v == v[:, None], best_i, big), axis=1)
        s = tl.min(tl.where((best_v == v[:, None]) & (best_i == c[:, None]), slots[None, :], KP), axis=1)
        taken = slots[None, :] == s[:, None]
        best_v = tl.where(taken, float("-inf"), best_v)
        best_i = tl.where(taken, big, best_i)
        found = c < M  # false only when the similarities were NaN
        j = tl.where(found, c, 0).to(tl.int64)
        d_i = tl.maximum(tl.load(NORM + grows, mask=mr, other=1.0), eps)
        d_j = tl.maximum(tl.load(NORM + j, mask=mr, other=1.0), eps)
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_P):
            k = k0 + tl.arange(0, BLOCK_P)
            m2 = mr[:, None] & (k < D)[None, :]
            xi = tl.load(q_ptr + k[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
            xj = tl.load(S + j[:, None] * stride_m + k[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
            # Division, as F.normalize does: duplicate rows give exactly u_i - u_j = 0.
            diff = tl.where(m2, xi / d_i[:, None] - xj / d_j[:, None] + pdist_eps, 0.0)
            sq += tl.sum(diff * diff, axis=1)
        dist = tl.where(found, tl.sqrt(sq), float("nan"))
        tl.store(IDX + rows.to(tl.int64) * TOPK + t, j, mask=mr)
        tl.store(DIST + rows.to(tl.int64) * TOPK + t, dist, mask=mr)
        row_sum += tl.where(mr, tl.log(dist + eps), 0.0)

    tl.store(PART + pid, tl.sum(row_sum, axis=0))
    # acq_rel: the partial above is visible before the count; the last arrival reduces all partials in order.
    num = tl.num_programs(0)
    if tl.atomic_add(COUNTER, 1) == num - 1:
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for p0 in range(0, num, BLOCK_M):
            p = p0 + tl.arange(0, BLOCK_M)
            total += tl.load(PART + p, mask=p < num, other=0.0, cache_modifier=".cg")
        tl.store(LOSS, -tl.sum(total, axis=0) * scale)


def _block_sizes(n, D, on_cpu, is_fp32):
    if on_cpu:
        # The interpreter pays per program and per op: small tiles that still satisfy tl.dot (>= 16).
        block_m = max(16, min(64, triton.next_power_of_2(n)))
        return block_m, 64, max(16, min(64, triton.next_power_of_2(D))), max(16, min(128, triton.next_power_of_2(D)))
    block_m = 64 if n >= 64 * 132 else 32  # at least about one program per SM on an H100
    block_k = 32 if is_fp32 else 64
    return block_m, 64, max(16, min(block_k, triton.next_power_of_2(D))), max(16, min(128, triton.next_power_of_2(D)))


def koleo_fwd_triton(search, offset, n, topk, eps, pdist_eps):
    """(loss fp32 scalar, indices (n, topk) int64, distances (n, topk) fp32, norms (M,) fp32); see module doc."""
    M, D = search.shape
    dev = search.device
    on_cpu = dev.type == "cpu"
    is_fp32, precision = dot_precision(search)
    BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_P = _block_sizes(n, D, on_cpu, is_fp32)
    norm = torch.empty(M, device=dev, dtype=torch.float32)
    counter = torch.empty(1, device=dev, dtype=torch.int32)
    BLOCK_R, BLOCK_D = 16, max(16, min(128, triton.next_power_of_2(D)))
    _koleo_norm_kernel[(triton.cdiv(M, BLOCK_R),)](
        search, norm, counter, M, D, search.stride(0), search.stride(1), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    grid = triton.cdiv(n, BLOCK_M)
    idx = torch.empty((n, topk), device=dev, dtype=torch.int64)
    dist = torch.empty((n, topk), device=dev, dtype=torch.float32)
    partial = torch.empty(grid, device=dev, dtype=torch.float32)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    _koleo_search_kernel[(grid,)](
        search, norm, idx, dist, partial, counter, loss,
        n, M, D, offset,
        search.stride(0), search.stride(1),
        eps, pdist_eps, 1.0 / (n * topk),
        TOPK=topk, KP=max(2, triton.next_power_of_2(topk)),
        IS_FP32=is_fp32, PRECISION=precision,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_P=BLOCK_P,
        # 64 query rows keep 64 running top-k lists: at 4 warps fp32 spilled ~370 bytes/thread on sm_90, 8 warps do
        # not (tests/kernels/triton_compile.py).
        num_warps=8 if BLOCK_M >= 64 else 4,
    )
    return loss, idx, dist, norm


@triton.jit
def _koleo_bwd_kernel(
    S, NORM, IDX, DIST, GRAD, GU,
    n, D, offset,
    stride_m, stride_d,
    eps, pdist_eps, scale,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # diff = u_i - u_j + pdist_eps, d = |diff|:  ∂u_i += c·diff, ∂u_j -= c·diff,  c = -g / (nK (d + eps) d)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mr = rows < n
    grows = (offset + rows).to(tl.int64)
    d_i = tl.maximum(tl.load(NORM + grows, mask=mr, other=1.0), eps)
    coef = -tl.load(GRAD).to(tl.float32) * scale
    for k0 in range(0, D, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        m2 = mr[:, None] & (k < D)[None, :]
        xi = tl.load(S + grows[:, None] * stride_m + k[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
        ui = xi / d_i[:, None]
        g_i = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for t in tl.static_range(TOPK):
            j = tl.load(IDX + rows.to(tl.int64) * TOPK + t, mask=mr, other=0)
            dist = tl.load(DIST + rows.to(tl.int64) * TOPK + t, mask=mr, other=1.0)
            c = tl.where(dist > 0, coef / ((dist + eps) * dist), 0.0)
            d_j = tl.maximum(tl.load(NORM + j, mask=mr, other=1.0), eps)
            xj = tl.load(S + j[:, None] * stride_m + k[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
            g = tl.where(m2, c[:, None] * (ui - xj / d_j[:, None] + pdist_eps), 0.0)
            g_i += g
            # relaxed: GU is read by the next kernel only (acq_rel would fence every update).
            tl.atomic_add(GU + j[:, None] * D + k[None, :], -g, mask=m2, sem="relaxed")
        tl.atomic_add(GU + grows[:, None] * D + k[None, :], g_i, mask=m2, sem="relaxed")


@triton.jit
def _koleo_norm_bwd_kernel(S, NORM, GU, OUT, M, D, stride_m, stride_d, eps,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # u = s / max(|s|, eps):  ∂s = (∂u - u (u·∂u)) / |s|  if |s| > eps,  else ∂u / eps (the clamp holds the norm).
    # Written with u as F.normalize's backward is, so that e.g. d = 1 (u = ±1 exactly) gives exactly 0.
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mr = rows < M
    nrm = tl.load(NORM + rows, mask=mr, other=1.0)
    den = tl.maximum(nrm, eps)
    cols = tl.arange(0, BLOCK_D)
    ug = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        k = k0 + cols
        m2 = mr[:, None] & (k < D)[None, :]
        x = tl.load(S + rows[:, None] * stride_m + k[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
        gu = tl.load(GU + rows[:, None] * D + k[None, :], mask=m2, other=0.0)
        ug += tl.sum((x / den[:, None]) * gu, axis=1)
    ug = tl.where(nrm > eps, ug, 0.0)
    for k0 in range(0, D, BLOCK_D):
        k = k0 + cols
        m2 = mr[:, None] & (k < D)[None, :]
        x = tl.load(S + rows[:, None] * stride_m + k[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
        gu = tl.load(GU + rows[:, None] * D + k[None, :], mask=m2, other=0.0)
        gs = (gu - (x / den[:, None]) * ug[:, None]) / den[:, None]
        tl.store(OUT + rows[:, None] * D + k[None, :], gs.to(OUT.dtype.element_ty), mask=m2)


def koleo_bwd_triton(grad_loss, search, idx, dist, norm, offset, n, eps, pdist_eps):
    """Gradient of loss * grad_loss w.r.t. the search set (M, D), in search.dtype: O(n·K·D) work, three launches
    (zero fill, the distance gradient scattered with atomics, F.normalize's backward)."""
    M, D = search.shape
    K = idx.shape[1]
    g_u = torch.zeros((M, D), device=search.device, dtype=torch.float32)
    BLOCK_M = 16
    BLOCK_D = max(16, min(128, triton.next_power_of_2(D)))
    _koleo_bwd_kernel[(triton.cdiv(n, BLOCK_M),)](
        search, norm, idx, dist, grad_loss, g_u, n, D, offset, search.stride(0), search.stride(1),
        eps, pdist_eps, 1.0 / (n * K), TOPK=K, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
    )
    out = torch.empty((M, D), device=search.device, dtype=search.dtype)
    BLOCK_R = 16
    _koleo_norm_bwd_kernel[(triton.cdiv(M, BLOCK_R),)](
        search, norm, g_u, out, M, D, search.stride(0), search.stride(1), eps, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    return out
