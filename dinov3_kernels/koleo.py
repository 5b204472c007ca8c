"""KoLeo loss (Sablayrolles et al. 2018; DINOv2/DINOv3): -mean log of each feature's distance to its nearest
neighbours in the batch, which spreads the features over the sphere. Single-GPU and distributed (DKoLeo).

reference (the spec) -> input checks -> kernels and autograd -> the composed backend (cuBLAS search, exact
re-ranking) -> distributed search set -> public function -> modules.

Against the official DINOv3 code, three deliberate differences, all in degenerate cases or in precision: a row is
excluded from its own neighbours outright (upstream writes -1 on the diagonal, so a row whose every other row is
antipodal could pick itself); equal similarities go to the lowest index (upstream's torch.max/topk leave ties
unspecified on GPU); and everything is computed in float32 for half/bfloat16 input (upstream normalises and
multiplies in the input dtype).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _backend, _library  # noqa: F401  (_library defines the op schemas)

__all__ = ["koleo_loss", "koleo_loss_reference", "KoLeoLoss", "KoLeoLossDistributed"]

PDIST_EPS = 1e-8  # torch.nn.PairwiseDistance(2, eps=1e-8) in the official loss, independent of forward's eps
MAX_TOPK = 16  # the kernels keep each row's top-k in registers
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- 1. reference ------------------------------------------------------------------------------------------------
def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _koleo_reference_on_set(search, offset, n, topk, eps):
    """Loss of the query rows search[offset:offset+n] against the whole search set (M, D), plain PyTorch."""
    s = F.normalize(search.to(_compute_dtype(search.dtype)), p=2, dim=-1, eps=eps)
    u = s[offset:offset + n]
    with torch.no_grad():
        dots = u @ s.T  # (n, M)
        rows = torch.arange(n, device=s.device)
        dots[rows, offset + rows] = float("-inf")  # a row is not its own neighbour
        if topk == 1:
            idx = dots.argmax(dim=1, keepdim=True)  # documented: the first maximal index
        else:  # a stable sort keeps equal similarities in index order: ties go to the lowest index
            idx = torch.sort(dots, dim=1, descending=True, stable=True).indices[:, :topk]
    return _loss_from_neighbors(s, offset, n, idx, eps)


def _loss_from_neighbors(s, offset, n, idx, eps):
    """-mean log(|u_i - u_nn + pdist_eps| + eps) over the query rows of the normalised set s and their neighbours
    idx (n, topk); autograd reaches both the row and its neighbour."""
    u = s[offset:offset + n]
    d = F.pairwise_distance(u.unsqueeze(1).expand(-1, idx.shape[1], -1), s[idx], p=2, eps=PDIST_EPS)  # (n, topk)
    return -torch.log(d + eps).mean()


def koleo_loss_reference(x, *, topk=1, eps=1e-8):
    """-mean_{i,k} log(|x̂_i - x̂_nn_k(i) + 1e-8| + eps), x̂ = x / max(|x|, eps), nn_k(i) the k-th most similar other row.

    x: (n, D). Computes in float32 (float64 for float64 input) with autocast off. Neighbour ties go to the lowest
    index. The neighbour search carries no gradient; the distance's gradient reaches x_i and its neighbours.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _koleo_reference_on_set(x, 0, x.shape[0], topk, eps)


# ---- 2. input checks (public boundary) ---------------------------------------------------------------------------
def _check_input(x, topk, loss_group_size, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"koleo_loss: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"koleo_loss: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"koleo_loss: expected (n, d) features, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"koleo_loss: empty input of shape {tuple(x.shape)}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"koleo_loss: topk must be a positive int, got {topk!r}")
    if loss_group_size is not None and (isinstance(loss_group_size, bool) or not isinstance(loss_group_size, int)
                                        or loss_group_size < 1):
        raise ValueError(f"koleo_loss: loss_group_size must be a positive int or None, got {loss_group_size!r}")
    if not eps > 0:
        raise ValueError(f"koleo_loss: eps must be positive, got {eps!r}")


def _op_check(dtype, topk):
    def check(backend):
        if backend == "composed":  # torch ops: any floating dtype, any topk
            return None
        if dtype not in KERNEL_DTYPES:
            return f"dtype {dtype} is not supported by the {backend} kernels (float32, float16, bfloat16)"
        if topk > MAX_TOPK:
            return f"topk={topk} is above the kernels' limit of {MAX_TOPK}"
        return None

    return check


# ---- 3. kernels and autograd -------------------------------------------------------------------------------------
def _koleo_loss_fwd_impl(search, offset, n, topk, eps, backend):
    if backend == "triton":
        from ._triton.koleo import koleo_fwd_triton

        return koleo_fwd_triton(search, offset, n, topk, eps, PDIST_EPS)
    if backend == "cuda":
        from ._cuda.koleo import koleo_fwd_cuda

        return koleo_fwd_cuda(search, offset, n, topk, eps, PDIST_EPS)
    raise ValueError(f"koleo_loss_fwd: unknown kernel backend {backend!r}")


torch.library.register_kernel("dinov3_kernels::koleo_loss_fwd", ("cpu", "cuda"), _koleo_loss_fwd_impl)


def _koleo_setup_context(ctx, inputs, output):
    search, offset, n, topk, eps, backend = inputs
    _, idx, d, norm = output
    ctx.save_for_backward(search, idx, d, norm)
    ctx.offset, ctx.n, ctx.eps, ctx.backend = offset, n, eps, backend


def _koleo_bwd_torch(grad_loss, search, idx, d, norm, offset, n, eps):
    """O(M·D + n·K·D): gather the neighbours, the distance gradient, scatter it back, then F.normalize's backward.

    With diff = u_i - u_j + pdist_eps and d = |diff|:  ∂loss/∂u_i = c·diff, ∂loss/∂u_j = -c·diff,
    c = -1 / (nK (d + eps) d).  u = s / max(|s|, eps):  ∂s = (∂u - u (u·∂u)) / |s| when |s| > eps, else ∂u / eps.
    """
    dtype = _compute_dtype(search.dtype)
    K = idx.shape[1]
    norm = norm.to(dtype).unsqueeze(1)
    u = search.to(dtype) / norm.clamp_min(eps)
    diff = u[offset:offset + n].unsqueeze(1) - u[idx] + PDIST_EPS  # (n, K, D)
    d = d.to(dtype)
    coef = torch.where(d > 0, -grad_loss.to(dtype) / (n * K) / ((d + eps) * d), torch.zeros_like(d))
    g = coef.unsqueeze(2) * diff
    g_u = torch.zeros_like(u)
    g_u[offset:offset + n] = g.sum(1)
    g_u.index_add_(0, idx.reshape(-1), g.reshape(-1, u.shape[1]), alpha=-1)
    proj = (u * g_u).sum(1, keepdim=True)
    g_s = torch.where(norm > eps, (g_u - u * proj) / norm, g_u / eps)
    return g_s.to(search.dtype).contiguous()


def _koleo_loss_bwd_impl(grad, search, idx, d, norm, offset, n, eps, backend):
    if backend == "triton":  # two kernels and a zero fill
        from ._triton.koleo import koleo_bwd_triton

        return koleo_bwd_triton(grad.to(torch.float32), search, idx, d, norm, offset, n, eps, PDIST_EPS)
    # reference and cuda: torch ops (an (n, topk, D) fp32 intermediate and one index_add_), O(n·topk·D); the cuda
    # backend's fused kernels are the forward's norm pass and neighbour search, where the O(n²·D) work is.
    return _koleo_bwd_torch(grad, search, idx, d, norm, offset, n, eps)


torch.library.register_kernel("dinov3_kernels::koleo_loss_bwd", ("cpu", "cuda"), _koleo_loss_bwd_impl)


def _koleo_backward(ctx, grad_loss, _g_idx, _g_dist, _g_norm):
    search, idx, d, norm = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    g = torch.ops.dinov3_kernels.koleo_loss_bwd(grad_loss, search, idx, d, norm, ctx.offset, ctx.n, ctx.eps,
                                                ctx.backend)
    return g, None, None, None, None, None


torch.library.register_autograd("dinov3_kernels::koleo_loss_fwd", _koleo_backward, setup_context=_koleo_setup_context)


# ---- 3b. the composed backend: cuBLAS search, exact re-ranking ----------------------------------------------------
# The neighbour search is one opaque op (dinov3_kernels::nearest_neighbors, no gradient); the loss is then the
# reference's own autograd expression over the gathered neighbours. Search: GEMM blocks of query rows against the set
# in the fastest precision torch allows, a running top-(topk + COMPOSED_EXTRA) per row; then the candidates' exact
# similarities pick the topk. A row whose candidate set cannot be shown to hold its true topk (the exact topk-th
# similarity is not above the search's last candidate by more than the search's error bound: near ties, duplicates)
# is searched again exactly, so the neighbours are the reference's up to rounding-level ties.
COMPOSED_EXTRA = 8  # candidates the GEMM search keeps beyond topk
COMPOSED_BLOCK = 2**26  # score entries per GEMM block (256 MiB fp32): memory O(M·d + block), never n×M
_MM_FP32_OUT = {}  # device type -> whether torch.mm(a, b, out_dtype=torch.float32) runs there


def _search_operand(search, s, eps):
    """(A, col_scale, err, mm) for the GEMM search: products A_i·A_j (times col_scale_j, when not None) rank row i's
    neighbours as s_i·s_j does, mm is the GEMM (fp32 or fp64 output), and err bounds |search score - s_i·s_j| (the
    scale by 1/|x_i| applied) for unit rows, twice the worst-case rounding analysis:
      fp32:  s in fp32, TF32 when torch allows it (each operand rounded by up to 2^-10 if the tensor cores truncate;
             bf16 when float32_matmul_precision is "medium"), accumulation (d + 4)·2^-24;
      16-bit: the raw rows, products exact in fp32 (8 or 11 significand bits twice fit in 24; TF32's 11 hold them
             too), fp32 accumulation and output, then 1/|x_j|: (d + 4)·2^-24;
      fp64:  s in fp64, (d + 4)·2^-53.
    """
    D = search.shape[1]
    if s.dtype == torch.float64:
        return s, None, 2 * (D + 4) * 2.0**-53, torch.mm
    acc = (D + 4) * 2.0**-24
    if search.dtype in (torch.float16, torch.bfloat16):
        col_scale = 1.0 / search.float().norm(dim=1).clamp_min_(eps)  # as F.normalize
        dev = search.device.type
        if dev not in _MM_FP32_OUT:  # probed once per device type
            try:
                torch.mm(search[:1], search[:1].T, out_dtype=torch.float32)
                _MM_FP32_OUT[dev] = True
            except (RuntimeError, TypeError, NotImplementedError):  # not on this device or torch: upcast, exactly
                _MM_FP32_OUT[dev] = False
        if _MM_FP32_OUT[dev]:
            return search, col_scale, 2 * acc, lambda a, b: torch.mm(a, b, out_dtype=torch.float32)
        return search.float(), col_scale, 2 * acc, torch.mm
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        rounding = 2 * 2.0**-8 + 2.0**-16
    elif precision == "high" or (s.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        rounding = 2 * 2.0**-10 + 2.0**-20
    else:
        rounding = 0.0
    return s, None, 2 * (rounding + acc), torch.mm


def _gemm_candidates(A, col_scale, mm, offset, n, K, block):
    """(candidates (n, K) int64, each row's K-th best search score (n,) fp32): top-K of the search scores of the query
    rows A[offset:offset + n] against all rows but themselves, in (R, W) score blocks of at most ~`block` entries."""
    M = A.shape[0]
    R = min(n, max(1, block // M))
    W = min(M, max(K, block // R))
    cands, lasts = [], []
    for i0 in range(0, n, R):
        q = A[offset + i0:offset + min(n, i0 + R)]
        best_v = best_i = None
        for j0 in range(0, M, W):
            j1 = min(M, j0 + W)
            sc = mm(q, A[j0:j1].T)  # (r, w) fp32
            sc.diagonal(offset + i0 - j0).fill_(float("-inf"))  # entry (a, a + offset + i0 - j0): row a itself
            if col_scale is not None:
                sc.mul_(col_scale[j0:j1])
            v, i = sc.topk(min(K, j1 - j0), dim=1)
            i += j0
            if best_v is not None:  # merge with the running top-K of the earlier column blocks
                v, o = torch.cat([best_v, v], 1).topk(K, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, o)
            best_v, best_i = v, i
        last = best_v[:, -1]
        if col_scale is not None:  # the row's own 1/|x_i|, which does not change its order
            last = last * col_scale[offset + i0:offset + i0 + q.shape[0]]
        cands.append(best_i)
        lasts.append(last)
    return torch.cat(cands), torch.cat(lasts)


def _order_by_similarity(vals, idx):
    """Each row's (vals, idx) sorted by similarity, highest first, equal similarities in increasing index."""
    idx, o = idx.sort(dim=1)
    vals, o = torch.sort(vals.gather(1, o), dim=1, descending=True, stable=True)
    return vals, idx.gather(1, o)


def _exact_neighbors(s, grows, topk, block):
    """The reference's search, in float64 products of s, for the rows s[grows] only (the rows the re-ranking could
    not settle), in (R, W) blocks with a running top-k."""
    M = s.shape[0]
    R = min(grows.numel(), max(1, block // M))
    W = min(M, max(topk, block // R))
    out = []
    for a in range(0, grows.numel(), R):
        g = grows[a:a + R]
        q = s[g].double()
        best_v = best_i = None
        for j0 in range(0, M, W):
            cols = torch.arange(j0, min(M, j0 + W), device=s.device)
            sc = (q @ s[j0:j0 + W].double().T).masked_fill_(cols[None, :] == g[:, None], float("-inf"))
            i = cols.expand_as(sc)
            if best_v is not None:  # the held indices are all below this block's: stable order keeps ties low
                sc, i = torch.cat([best_v, sc], 1), torch.cat([best_i, i], 1)
            sc, o = torch.sort(sc, dim=1, descending=True, stable=True)
            best_v, best_i = sc[:, :topk], i.gather(1, o[:, :topk])
        out.append(best_i)
    return torch.cat(out)


def _use_triton_dots(s):
    return s.is_cuda and s.dtype == torch.float32 and _backend.TRITON_UNAVAILABLE is None


def _nearest_neighbors_impl(search, offset, n, topk, eps):
    M, D = search.shape
    block = COMPOSED_BLOCK
    with torch.no_grad():
        s = F.normalize(search.to(_compute_dtype(search.dtype)), p=2, dim=-1, eps=eps)
        K = min(topk + COMPOSED_EXTRA, M - 1)
        A, col_scale, err, mm = _search_operand(search, s, eps)
        cand, last = _gemm_candidates(A, col_scale, mm, offset, n, K, block)
        # Exact fp32 similarities of the candidates (error <= (d + 2)·2^-24 for unit rows): on CUDA one Triton pass that
        # reads each candidate row once; elsewhere fp32 products summed in fp64 (torch's gather, product, sum).
        if _use_triton_dots(s):
            from ._triton.koleo import candidate_dots_triton

            vals = candidate_dots_triton(s, offset, n, cand).double()
        else:
            R = max(1, block // (K * D))
            vals = torch.cat([(s[offset + i0:offset + min(n, i0 + R)].unsqueeze(1) * s[cand[i0:i0 + R]]).sum(
                -1, dtype=torch.float64) for i0 in range(0, n, R)])
        vals, cand = _order_by_similarity(vals, cand)
        idx = cand[:, :topk].contiguous()
        if K < M - 1:  # otherwise every other row was a candidate
            # Any row outside the candidates scores at most last + err: the topk are all candidates if the exact
            # topk-th similarity is above that by more than the re-ranking's own error.
            settled = vals[:, topk - 1] - last.double() > err + 2 * (D + 2) * 2.0**-24
            redo = torch.nonzero(~settled).flatten()  # one host sync
            if redo.numel() > 0:
                idx[redo] = _exact_neighbors(s, offset + redo, topk, block)
    return idx


torch.library.register_kernel("dinov3_kernels::nearest_neighbors", ("cpu", "cuda"), _nearest_neighbors_impl)


def _koleo_composed_on_set(search, offset, n, topk, eps):
    idx = torch.ops.dinov3_kernels.nearest_neighbors(search.detach(), offset, n, topk, float(eps))
    s = F.normalize(search.to(_compute_dtype(search.dtype)), p=2, dim=-1, eps=eps)
    return _loss_from_neighbors(s, offset, n, idx, eps)


# ---- 4. the distributed search set -------------------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient of this rank's rows (works on any backend:
    reduce-scatter on NCCL, all-reduce plus a slice elsewhere, e.g. gloo)."""

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), world, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place: never on a tensor autograd may share
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((ctx.n,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def _search_set(x, distributed, loss_group_size):
    """(search set, offset of x's rows in it): the world's features, or the group of adjacent ranks x's rank is in."""
    if distributed and dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        all_x = _GatherRows.apply(x) if world > 1 else x
    else:
        world, rank, all_x = 1, 0, x
    local_b, global_b = x.shape[0], x.shape[0] * world
    group_size = global_b if loss_group_size is None else loss_group_size
    if group_size % local_b != 0:
        raise ValueError(f"koleo_loss: loss group size {group_size} must be a multiple of the local batch size "
                         f"{local_b}")
    if global_b % group_size != 0:
        raise ValueError(f"koleo_loss: global batch size {global_b} must be divisible by the loss group size "
                         f"{group_size}")
    ranks_per_group = group_size // local_b
    group, rank_in_group = rank // ranks_per_group, rank % ranks_per_group
    return all_x[group * group_size:(group + 1) * group_size], rank_in_group * local_b


# ---- 5. public function and modules ------------------------------------------------------------------------------
def koleo_loss(x, *, topk=1, distributed=False, loss_group_size=None, eps=1e-8, backend="auto"):
    """Fused KoLeo loss; same value and gradients as :func:`koleo_loss_reference` (float32 loss, float64 for float64).

    x: (n, d) features (e.g. the class tokens of one global crop). With ``distributed=True`` and torch.distributed
    initialised, each row's neighbours are searched among the features of all ranks (every rank must pass the same
    n), or of the ``loss_group_size`` rows of the adjacent ranks the caller's rank belongs to; gradients reach the rank
    that owns a neighbour. The loss is this rank's mean; its gradient summed over ranks is that of the sum of the
    ranks' losses (so DDP's gradient averaging gives the gradient of their mean). backend: "auto" | "reference" |
    "composed" (cuBLAS search, exact re-ranking, torch autograd) | "triton" | "cuda".
    """
    if not torch.compiler.is_compiling():
        _check_input(x, topk, loss_group_size, eps)
    with torch.autocast(x.device.type, enabled=False):
        search, offset = _search_set(x, distributed, loss_group_size)
        n = x.shape[0]
        if search.shape[0] <= topk:
            raise ValueError(f"koleo_loss: topk={topk} needs at least {topk + 1} rows in the search set, got "
                             f"{search.shape[0]} (each row needs {topk} neighbours other than itself)")
        chosen = _backend.choose_backend(backend, (x,), _op_check(x.dtype, topk), "koleo_loss",
                                        atomics=("triton",), size=search.shape[0])
        if chosen == "reference":
            return _koleo_reference_on_set(search, offset, n, topk, eps)
        if chosen == "composed":
            return _koleo_composed_on_set(search, offset, n, topk, eps)
        loss, _, _, _ = torch.ops.dinov3_kernels.koleo_loss_fwd(search, offset, n, topk, float(eps), chosen)
        return loss


class KoLeoLoss(torch.nn.Module):
    """Drop-in for the official ``dinov3.loss.KoLeoLoss`` (nearest neighbour within the local batch)."""

    def __init__(self, backend="auto"):
        super().__init__()
        self.backend = backend

    def forward(self, student_output, eps=1e-8):
        return koleo_loss(student_output, topk=1, eps=eps, backend=self.backend)

    def extra_repr(self):
        return f"backend={self.backend!r}"


class KoLeoLossDistributed(torch.nn.Module):
    """Drop-in for the official ``dinov3.loss.KoLeoLossDistributed``: top-k neighbours among the features of all
    ranks, or of groups of ``loss_group_size`` rows over adjacent ranks."""

    def __init__(self, topk=1, loss_group_size=None, backend="auto"):
        super().__init__()
        self.topk = topk
        self.loss_group_size = loss_group_size
        self.backend = backend

    def forward(self, student_output, eps=1e-8):
        return koleo_loss(student_output, topk=self.topk, distributed=True, loss_group_size=self.loss_group_size,
                          eps=eps, backend=self.backend)

    def extra_repr(self):
        return f"topk={self.topk}, loss_group_size={self.loss_group_size}, backend={self.backend!r}"
