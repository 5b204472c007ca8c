"""DINO (class-token) and iBOT (masked-patch) losses fused with the heads' last layer: prototype logits,
Sinkhorn-Knopp (or softmax) centering of the teacher and the soft-target cross-entropy, without the tokens × K logit
matrices.

reference (the spec) -> input checks -> teacher scaling, composed backend, kernels and autograd -> public functions.

The math behind the fused backends. Teacher logits L = z_t W_tᵀ (N, K). Official Sinkhorn-Knopp alternately divides
Q = exp(L/τ)ᵀ by its prototype sums (all-reduced over ranks) and its sample sums, so its result is
exp(L/τ) · a_k · b_n for two scaling vectors, and its last sample normalisation makes each row sum to one:

    P_nk = softmax_k(L_nk/τ + α_k),   α_k = log a_k   (a per-prototype bias; softmax centering has α = -center/τ)

α comes from passes that recompute logit tiles: the first prototype normalisation is α_k = -logsumexp_n(L_nk/τ)
(per-prototype maximum first: exactly invariant, so no exp overflows where the official exp(L/τ) does), and each
further iteration is α_k -= logsumexp_n(log P_nk) with P from the current α (its sample normaliser a row pass).
The total sum, the sample count B and the 1/K, 1/B factors of the official loop scale Q by constants that the next
normalisation removes, so they are not computed. Across ranks each prototype's (max, Σ exp) is combined by an
all-reduce MAX then SUM, over the default process group.

The cross-entropy of student row i against its teacher rows j (DINO: the other crops of the same image; iBOT: the same
token) with weights w_it is  Σ_t w_it (logsumexp_k S_ik - Σ_k P_jk S_ik),  S = z_s W_sᵀ / τ_s, and its gradient
w.r.t. S is  Σ_t w_it (softmax(S_i) - P_j): formed tile by tile and carried back to z_s and W_s by two GEMMs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _backend, _library  # noqa: F401  (_library defines the op schemas)

__all__ = ["dino_head_loss", "ibot_head_loss", "dino_head_loss_reference", "ibot_head_loss_reference",
           "sinkhorn_knopp_reference"]

CENTERINGS = ("sinkhorn_knopp", "softmax")
REDUCTIONS = ("mean", "none")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The composed backend computes logits for this many (row, prototype) entries at a time: 2**25 fp32 = 128 MiB per
# logit-sized buffer (at most three are alive: student logits, the teacher target and one teacher crop's logits).
COMPOSED_CHUNK_ELEMENTS = 1 << 25


# ---- 1. reference ------------------------------------------------------------------------------------------------
def _compute_dtype(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t, op=None):
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t


@torch.no_grad()
def sinkhorn_knopp_reference(teacher_logits, teacher_temp, n_iterations=3):
    """The official ``DINOLoss.sinkhorn_knopp_teacher`` / ``SinkhornKnoppTeacher`` (sums all-reduced over the default
    process group), except that exp is taken after subtracting each prototype's maximum over the (global) batch.

    teacher_logits (N, K) -> (N, K) assignments whose rows sum to 1. Computes in float32 (float64 for float64)."""
    logits = teacher_logits.to(_compute_dtype(teacher_logits.dtype))
    N, K = logits.shape
    if N > 0:
        m = logits.amax(0)
    else:
        m = logits.new_full((K,), float("-inf"))
    _all_reduce(m, dist.ReduceOp.MAX if _distributed() else None)
    q = torch.exp((logits - m) / teacher_temp).t()  # (K, N)
    B = _all_reduce(torch.tensor(float(N), dtype=q.dtype, device=q.device))
    q /= _all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype gets mass 1/K
        q /= K
        q /= q.sum(dim=0, keepdim=True)  # each sample gets mass 1/B
        q /= B
    q *= B
    return q.t()


@torch.no_grad()
def _softmax_center_reference(logits, teacher_temp, center, center_momentum):
    probs = F.softmax((logits - center.reshape(-1).to(logits.dtype)) / teacher_temp, dim=-1)
    total = _all_reduce(logits.sum(0))
    count = _all_reduce(torch.tensor(float(logits.shape[0]), dtype=logits.dtype, device=logits.device))
    mean = (total / count.clamp(min=1)).reshape(center.shape).to(center.dtype)
    return probs, center * center_momentum + mean * (1 - center_momentum)


def _reference_probs_and_log_p(student_z, teacher_z, student_prototypes, teacher_prototypes, student_temp,
                               teacher_temp, centering, sk_iterations, center, center_momentum):
    dtype = _compute_dtype(student_z.dtype, teacher_z.dtype, student_prototypes.dtype, teacher_prototypes.dtype)
    with torch.autocast(student_z.device.type, enabled=False):
        student_logits = student_z.to(dtype) @ student_prototypes.to(dtype).T
        with torch.no_grad():
            teacher_logits = teacher_z.detach().to(dtype) @ teacher_prototypes.detach().to(dtype).T
        if centering == "sinkhorn_knopp":
            probs, new_center = sinkhorn_knopp_reference(teacher_logits, teacher_temp, sk_iterations), None
        else:
            probs, new_center = _softmax_center_reference(teacher_logits, teacher_temp, center, center_momentum)
        return probs, F.log_softmax(student_logits / student_temp, dim=-1), new_center


def _pair_count(S, T, ignore_diagonal):
    return S * T - (min(S, T) if ignore_diagonal else 0)


def _dino_pair_weights(S, T, ignore_diagonal, device, dtype):
    """(S, T) weights of the (student crop, teacher crop) pairs of one image: 1/(pairs), 0 on an ignored diagonal."""
    valid = torch.ones(S, T, device=device, dtype=dtype)
    if ignore_diagonal:
        valid = valid - torch.eye(S, T, device=device, dtype=dtype)
    return valid / float(_pair_count(S, T, ignore_diagonal))


def dino_head_loss_reference(student_z, teacher_z, student_prototypes, teacher_prototypes, *, n_student_crops,
                             n_teacher_crops, student_temp, teacher_temp, ignore_diagonal=True,
                             centering="sinkhorn_knopp", sk_iterations=3, center=None, center_momentum=0.9,
                             reduction="mean"):
    """The official composition, in float32 (float64 for float64 input), autocast off:

        logits = z @ Wᵀ;  probs = sinkhorn_knopp_reference(teacher logits)  (or softmax((logits - center) / τ_t))
        loss = DINOLoss.forward(student_logits.view(S, B, K), probs.view(T, B, K), ignore_diagonal)

    reduction="none" returns the (S, B) per-student-row terms whose sum is the loss. With centering="softmax" the
    result is (loss, updated center)."""
    probs, log_p, new_center = _reference_probs_and_log_p(
        student_z, teacher_z, student_prototypes, teacher_prototypes, student_temp, teacher_temp, centering,
        sk_iterations, center, center_momentum)
    S, T = n_student_crops, n_teacher_crops
    B, K = student_z.shape[0] // S, log_p.shape[-1]
    pair = -torch.einsum("sbk,tbk->stb", log_p.view(S, B, K), probs.view(T, B, K))  # (S, T, B) cross-entropies
    w = _dino_pair_weights(S, T, ignore_diagonal, pair.device, pair.dtype) / B
    rows = (pair * w[:, :, None]).sum(1)  # (S, B)
    out = rows if reduction == "none" else rows.sum()
    return (out, new_center) if centering == "softmax" else out


def ibot_head_loss_reference(student_z, teacher_z, student_prototypes, teacher_prototypes, *, student_temp,
                             teacher_temp, masks_weight, n_images, centering="sinkhorn_knopp", sk_iterations=3,
                             center=None, center_momentum=0.9, reduction="mean"):
    """The official ``iBOTPatchLoss.forward_masked`` on the masked tokens' logits z @ Wᵀ with Sinkhorn-Knopp teacher
    probabilities: -Σ_i masks_weight_i Σ_k P_ik log_softmax(S_i / τ_s)_k / n_images. reduction="none" returns the
    (M,) per-token terms; centering="softmax" returns (loss, updated center)."""
    probs, log_p, new_center = _reference_probs_and_log_p(
        student_z, teacher_z, student_prototypes, teacher_prototypes, student_temp, teacher_temp, centering,
        sk_iterations, center, center_momentum)
    rows = -(probs * log_p).sum(-1) * masks_weight.to(log_p.dtype) / n_images
    out = rows if reduction == "none" else rows.sum()
    return (out, new_center) if centering == "softmax" else out


# ---- 2. input checks (public boundary) ---------------------------------------------------------------------------
def _check_inputs(op, student_z, teacher_z, student_prototypes, teacher_prototypes, student_temp, teacher_temp,
                  centering, sk_iterations, center, center_momentum, reduction):
    named = (("student_z", student_z), ("teacher_z", teacher_z), ("student_prototypes", student_prototypes),
             ("teacher_prototypes", teacher_prototypes))
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D ((rows, d) or (K, d)), got shape {tuple(x.shape)}")
    d = student_z.shape[1]
    if d == 0:
        raise ValueError(f"{op}: empty feature dimension")
    if student_prototypes.shape != teacher_prototypes.shape or student_prototypes.shape[0] == 0:
        raise ValueError(f"{op}: student_prototypes {tuple(student_prototypes.shape)} and teacher_prototypes "
                         f"{tuple(teacher_prototypes.shape)} must both be (K, d) with K > 0")
    for name, x in named:
        if x.shape[1] != d:
            raise ValueError(f"{op}: {name} has {x.shape[1]} features, student_z has {d}")
    devices = {x.device for _, x in named}
    if len(devices) != 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(str(x) for x in devices)}")
    for name, t in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"{op}: {name} must be a positive number, got {t!r}")
    if centering not in CENTERINGS:
        raise ValueError(f"{op}: centering must be one of {CENTERINGS}, got {centering!r}")
    if isinstance(sk_iterations, bool) or not isinstance(sk_iterations, int) or sk_iterations < 1:
        raise ValueError(f"{op}: sk_iterations must be an int >= 1 (0 iterations leaves the rows unnormalised), "
                         f"got {sk_iterations!r}")
    if centering == "softmax":
        K = student_prototypes.shape[0]
        if not isinstance(center, torch.Tensor) or center.numel() != K:
            raise ValueError(f"{op}: centering='softmax' needs center=, a tensor of {K} entries (e.g. (1, K))")
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"{op}: center_momentum must be in [0, 1], got {center_momentum!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _op_check(dtype):
    def check(backend):
        if backend == "cuda":
            return "the head losses have no CUDA C kernels: use backend='triton' (or 'composed')"
        if dtype not in KERNEL_DTYPES:
            return f"dtype {dtype} is not supported by the {backend} backend (float32, float16, bfloat16)"
        return None

    return check


def _choose_backend(requested, tensors, dtype, op):
    """As _backend.choose_backend; "auto" follows the auto table on CUDA tensors (size: student rows), is composed
    (bounded memory) on CPU tensors, and the reference for dtypes the fused paths do not take (float64)."""
    if not isinstance(requested, str):
        raise TypeError(f"{op}: backend must be a string, got {type(requested).__name__}")
    req = requested.lower()
    if req == "auto":
        req = _backend.env_backend()
    check = _op_check(dtype)
    if req == "cuda":  # whatever the device: there is no CUDA C implementation of this op
        raise _backend.BackendUnavailableError(f"{op}: backend 'cuda' cannot run here: {check('cuda')}")
    if req == "composed":
        reason = check("composed")
        if reason is not None:
            raise _backend.BackendUnavailableError(f"{op}: backend 'composed' cannot run here: {reason}")
        return "composed"
    if req != "auto":
        return _backend.choose_backend(req, tensors, check, op)
    if dtype not in KERNEL_DTYPES:
        return "reference"
    rows = tensors[0].shape[:-1].numel() if tensors else None
    return _backend.choose_backend("auto", tensors, check, op, size=rows, dtype=dtype, cpu_auto="composed")


# ---- 3. the composed backend (chunked PyTorch) -------------------------------------------------------------------
def _chunk_rows(K):
    return max(1, COMPOSED_CHUNK_ELEMENTS // max(K, 1))


def _logits(z, W):
    return (z @ W.T).float()  # a GEMM in the inputs' dtype (TF32 for fp32 when torch allows it)


def _col_lse_composed(z, W, col_bias, row_bias, scale):
    K = W.shape[0]
    m = torch.full((K,), float("-inf"), device=z.device)
    s = torch.zeros(K, device=z.device)
    step = _chunk_rows(K)
    for i0 in range(0, z.shape[0], step):
        x = _logits(z[i0:i0 + step], W) * scale
        if col_bias.numel():
            x = x + col_bias
        if row_bias.numel():
            x = x + row_bias[i0:i0 + step, None]
        m_new = torch.maximum(m, x.amax(0))
        ref = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        s = s * torch.exp(m - ref) + torch.exp(x - ref).sum(0)
        m = m_new
    return m, s


def _row_lse_composed(z, W, col_bias, scale):
    step = _chunk_rows(W.shape[0])
    out = [torch.logsumexp(_logits(z[i0:i0 + step], W) * scale + (col_bias if col_bias.numel() else 0.0), dim=1)
           for i0 in range(0, z.shape[0], step)]
    return torch.cat(out) if out else z.new_empty(0, dtype=torch.float32)


def _target_composed(zt, Wt, teacher_bias, teacher_lse, pair_weight, i0, i1, scale_t):
    """Σ_t w_it P_jk for student rows i0..i1-1, j = t·B + i mod B: (i1 - i0, K) fp32."""
    T = pair_weight.shape[1]
    B = zt.shape[0] // T
    img = torch.arange(i0, i1, device=zt.device) % B
    q = None
    for t in range(T):
        j = t * B + img
        p = torch.exp(_logits(zt[j], Wt) * scale_t + teacher_bias - teacher_lse[j, None])
        p = p * pair_weight[i0:i1, t, None]
        q = p if q is None else q + p
    return q


def _ce_composed(zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, scale_s, scale_t):
    step = _chunk_rows(Ws.shape[0])
    rows, lses = [], []
    for i0 in range(0, zs.shape[0], step):
        i1 = min(zs.shape[0], i0 + step)
        s = _logits(zs[i0:i1], Ws) * scale_s
        lse = torch.logsumexp(s, dim=1)
        cross = (_target_composed(zt, Wt, teacher_bias, teacher_lse, pair_weight, i0, i1, scale_t) * s).sum(1)
        rows.append(pair_weight[i0:i1].sum(1) * lse - cross)
        lses.append(lse)
    if not rows:
        e = zs.new_empty(0, dtype=torch.float32)
        return e, e.clone()
    return torch.cat(rows), torch.cat(lses)


def _ce_bwd_composed(grad_rows, zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, student_lse, scale_s,
                     scale_t, grad_z, grad_W):
    step = _chunk_rows(Ws.shape[0])
    g = grad_rows.float() * scale_s
    gw = g * pair_weight.sum(1)
    gz = []
    gW = torch.zeros(Ws.shape, device=Ws.device, dtype=torch.float32) if grad_W else None
    for i0 in range(0, zs.shape[0], step):
        i1 = min(zs.shape[0], i0 + step)
        s = _logits(zs[i0:i1], Ws) * scale_s
        q = _target_composed(zt, Wt, teacher_bias, teacher_lse, pair_weight, i0, i1, scale_t)
        dlogits = (gw[i0:i1, None] * torch.exp(s - student_lse[i0:i1, None]) - g[i0:i1, None] * q).to(zs.dtype)
        del s, q
        if grad_z:
            gz.append(dlogits @ Ws)
        if grad_W:
            gW += (dlogits.T @ zs[i0:i1]).float()
    out_z = (torch.cat(gz) if gz else torch.zeros_like(zs)).contiguous() if grad_z else zs.new_empty(0)
    out_W = gW.to(Ws.dtype) if grad_W else Ws.new_empty(0)
    return out_z, out_W


# ---- 4. kernels and autograd -------------------------------------------------------------------------------------
def _col_lse_impl(z, W, col_bias, row_bias, scale, backend):
    if backend == "triton":
        from ._triton.head_loss import head_col_lse_triton

        return head_col_lse_triton(z, W, col_bias, row_bias, scale)
    if backend == "composed":
        return _col_lse_composed(z, W, col_bias, row_bias, scale)
    raise ValueError(f"head_loss_col_lse: unknown backend {backend!r}")


def _row_lse_impl(z, W, col_bias, scale, backend):
    if backend == "triton":
        from ._triton.head_loss import head_row_lse_triton

        return head_row_lse_triton(z, W, col_bias, scale)
    if backend == "composed":
        return _row_lse_composed(z, W, col_bias, scale)
    raise ValueError(f"head_loss_row_lse: unknown backend {backend!r}")


def _ce_impl(zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, scale_s, scale_t, backend):
    if backend == "triton":
        from ._triton.head_loss import head_ce_fwd_triton

        return head_ce_fwd_triton(zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, scale_s, scale_t)
    if backend == "composed":
        return _ce_composed(zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, scale_s, scale_t)
    raise ValueError(f"head_loss_ce: unknown backend {backend!r}")


def _ce_bwd_impl(grad_rows, zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, student_lse, scale_s, scale_t,
                 grad_z, grad_W, backend):
    args = (grad_rows, zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, student_lse, scale_s, scale_t, grad_z,
            grad_W)
    if backend == "triton":
        from ._triton.head_loss import head_ce_bwd_triton

        return head_ce_bwd_triton(*args)
    if backend == "composed":
        return _ce_bwd_composed(*args)
    raise ValueError(f"head_loss_ce_bwd: unknown backend {backend!r}")


for _name, _impl in (("head_loss_col_lse", _col_lse_impl), ("head_loss_row_lse", _row_lse_impl),
                     ("head_loss_ce", _ce_impl), ("head_loss_ce_bwd", _ce_bwd_impl)):
    torch.library.register_kernel(f"dinov3_kernels::{_name}", ("cpu", "cuda"), _impl)


def _ce_setup_context(ctx, inputs, output):
    zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, scale_s, scale_t, backend = inputs
    _, student_lse = output
    ctx.save_for_backward(zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, student_lse)
    ctx.scales, ctx.backend = (scale_s, scale_t), backend


def _ce_backward(ctx, grad_rows, _grad_lse):
    # The student logsumexp output is saved for backward only: its gradient is not propagated.
    need_z, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_z or need_W):
        return (None,) * 10
    zs, Ws, zt, Wt, teacher_bias, teacher_lse, pair_weight, student_lse = ctx.saved_tensors
    gz, gW = torch.ops.dinov3_kernels.head_loss_ce_bwd(grad_rows, zs, Ws, zt, Wt, teacher_bias, teacher_lse,
                                                      pair_weight, student_lse, *ctx.scales, need_z, need_W,
                                                      ctx.backend)
    return (gz if need_z else None, gW if need_W else None) + (None,) * 8


torch.library.register_autograd("dinov3_kernels::head_loss_ce", _ce_backward, setup_context=_ce_setup_context)


def _all_reduce_lse(m, s):
    """Per-prototype (max, Σ exp(x - max)) of this rank's rows -> the same over every rank's rows."""
    if _distributed():
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX)
        ref = torch.where(m_all == float("-inf"), torch.zeros_like(m_all), m_all)
        s = s * torch.exp(m - ref)
        dist.all_reduce(s)
        m = m_all
    return m, s


def _log_normaliser(m, s):
    """log Σ exp(x) from (max, Σ exp(x - max)); 0 for a prototype no row reached (its bias is then irrelevant)."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m + torch.log(s))


@torch.no_grad()
def _teacher_scaling(zt, Wt, teacher_temp, centering, sk_iterations, center, center_momentum, backend):
    """(bias (K,), row normaliser (N_t,), updated center or None): P_nk = exp(L_nk/τ + bias_k - lse_n)."""
    ops = torch.ops.dinov3_kernels
    scale = 1.0 / teacher_temp
    none = zt.new_empty(0, dtype=torch.float32)
    if centering == "softmax":
        bias = (center.reshape(-1).float() * -scale).contiguous()
        lse = ops.head_loss_row_lse(zt, Wt, bias, scale, backend)
        # The batch mean of the logits is the mean feature times Wᵀ: no pass over the logits.
        total = _all_reduce(zt.float().sum(0))
        count = _all_reduce(torch.tensor(float(zt.shape[0]), device=zt.device))
        mean = (total / count.clamp(min=1)) @ Wt.float().T
        new_center = center * center_momentum + mean.reshape(center.shape).to(center.dtype) * (1 - center_momentum)
        return bias, lse, new_center
    m, s = _all_reduce_lse(*ops.head_loss_col_lse(zt, Wt, none, none, scale, backend))
    bias = -_log_normaliser(m, s)  # the first prototype normalisation
    for _ in range(sk_iterations - 1):
        lse = ops.head_loss_row_lse(zt, Wt, bias, scale, backend)  # sample normalisation
        m, s = _all_reduce_lse(*ops.head_loss_col_lse(zt, Wt, bias, -lse, scale, backend))
        bias = bias - _log_normaliser(m, s)  # prototype normalisation of P
    return bias.contiguous(), ops.head_loss_row_lse(zt, Wt, bias.contiguous(), scale, backend), None


def _fused_rows(student_z, teacher_z, student_prototypes, teacher_prototypes, pair_weight, student_temp,
                teacher_temp, centering, sk_iterations, center, center_momentum, backend):
    dtype = torch.promote_types(torch.promote_types(student_z.dtype, teacher_z.dtype),
                                torch.promote_types(student_prototypes.dtype, teacher_prototypes.dtype))
    zs, Ws = student_z.to(dtype), student_prototypes.to(dtype)
    zt, Wt = teacher_z.detach().to(dtype), teacher_prototypes.detach().to(dtype)
    bias, lse, new_center = _teacher_scaling(zt, Wt, teacher_temp, centering, sk_iterations, center,
                                             center_momentum, backend)
    rows, _ = torch.ops.dinov3_kernels.head_loss_ce(zs, Ws, zt, Wt, bias, lse, pair_weight.contiguous(),
                                                    1.0 / student_temp, 1.0 / teacher_temp, backend)
    return rows, new_center


# ---- 5. public functions -----------------------------------------------------------------------------------------
def dino_head_loss(student_z, teacher_z, student_prototypes, teacher_prototypes, *, n_student_crops, n_teacher_crops,
                   student_temp, teacher_temp, ignore_diagonal=True, centering="sinkhorn_knopp", sk_iterations=3,
                   center=None, center_momentum=0.9, reduction="mean", backend="auto"):
    """The DINO loss from the heads' bottleneck outputs and last-layer weights, without the (crops·B) × K logits.

    student_z (n_student_crops·B, d) and teacher_z (n_teacher_crops·B, d), crop-major (row s·B + b is crop s of image
    b), the L2-normalised bottleneck outputs; student_prototypes and teacher_prototypes (K, d), the last layers'
    weights (student and EMA teacher). Value and gradients (w.r.t. student_z and student_prototypes; the teacher
    gets none) equal those of :func:`dino_head_loss_reference`, the official composition. Teacher probabilities by
    Sinkhorn-Knopp (sums reduced over the default process group when one is initialised) or, with
    centering="softmax", softmax((logits - center) / teacher_temp) with ``center`` (K entries) given and
    ``(loss, updated center)`` returned. reduction="none" gives the (n_student_crops, B) per-student-row terms whose
    sum is the loss (e.g. to report global and local crops apart from one call). Float32 loss.

    backend: "auto" (on CUDA tensors: the auto table's order, else "composed"; float64 takes the reference) |
    "triton" | "composed" (token chunks with PyTorch GEMMs, bounded memory) | "reference" (the full logit matrices).
    """
    op = "dino_head_loss"
    if not torch.compiler.is_compiling():
        _check_inputs(op, student_z, teacher_z, student_prototypes, teacher_prototypes, student_temp, teacher_temp,
                      centering, sk_iterations, center, center_momentum, reduction)
        for name, v in (("n_student_crops", n_student_crops), ("n_teacher_crops", n_teacher_crops)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{op}: {name} must be a positive int, got {v!r}")
        if student_z.shape[0] % n_student_crops or student_z.shape[0] == 0:
            raise ValueError(f"{op}: student_z has {student_z.shape[0]} rows, not a positive multiple of "
                             f"n_student_crops={n_student_crops}")
        if teacher_z.shape[0] != n_teacher_crops * (student_z.shape[0] // n_student_crops):
            raise ValueError(f"{op}: teacher_z has {teacher_z.shape[0]} rows, expected n_teacher_crops · B = "
                             f"{n_teacher_crops} · {student_z.shape[0] // n_student_crops}")
    S, T = n_student_crops, n_teacher_crops
    B = student_z.shape[0] // S
    tensors = (student_z, teacher_z, student_prototypes, teacher_prototypes)
    dtype = _compute_dtype(*(t.dtype for t in tensors))
    chosen = _choose_backend(backend, tensors, dtype if dtype == torch.float64 else student_z.dtype, op)
    with torch.autocast(student_z.device.type, enabled=False):
        if chosen == "reference":
            return dino_head_loss_reference(
                student_z, teacher_z, student_prototypes, teacher_prototypes, n_student_crops=S, n_teacher_crops=T,
                student_temp=student_temp, teacher_temp=teacher_temp, ignore_diagonal=ignore_diagonal,
                centering=centering, sk_iterations=sk_iterations, center=center, center_momentum=center_momentum,
                reduction=reduction)
        w = _dino_pair_weights(S, T, ignore_diagonal, student_z.device, torch.float32) / B
        rows, new_center = _fused_rows(student_z, teacher_z, student_prototypes, teacher_prototypes,
                                       w.repeat_interleave(B, dim=0), student_temp, teacher_temp, centering,
                                       sk_iterations, center, center_momentum, chosen)
        out = rows.view(S, B) if reduction == "none" else rows.sum()
        return (out, new_center) if centering == "softmax" else out


def ibot_head_loss(student_z, teacher_z, student_prototypes, teacher_prototypes, *, student_temp, teacher_temp,
                   masks_weight, n_images, centering="sinkhorn_knopp", sk_iterations=3, center=None,
                   center_momentum=0.9, reduction="mean", backend="auto"):
    """The iBOT loss on the M masked tokens from the heads' bottleneck outputs and last-layer weights, without the
    M × K logits: official ``iBOTPatchLoss.forward_masked`` with ``SinkhornKnoppTeacher`` probabilities, i.e.
    -Σ_i masks_weight_i Σ_k P_ik log_softmax(S_i / τ_s)_k / n_images.

    student_z, teacher_z (M, d), the same masked tokens seen by student and teacher; prototypes (K, d); masks_weight
    (M,) (official: 1 / #masked tokens of the token's image); n_images the number of images the masks cover (the
    official divides by ``student_masks_flat.shape[0]``). Sinkhorn-Knopp sums are reduced over the default process
    group (ranks may hold different M). centering, reduction ("none": the (M,) per-token terms) and backend as in
    :func:`dino_head_loss`.
    """
    op = "ibot_head_loss"
    if not torch.compiler.is_compiling():
        _check_inputs(op, student_z, teacher_z, student_prototypes, teacher_prototypes, student_temp, teacher_temp,
                      centering, sk_iterations, center, center_momentum, reduction)
        if student_z.shape[0] != teacher_z.shape[0]:
            raise ValueError(f"{op}: student_z ({student_z.shape[0]} rows) and teacher_z ({teacher_z.shape[0]} "
                             f"rows) must hold the same masked tokens")
        if not isinstance(masks_weight, torch.Tensor) or tuple(masks_weight.shape) != (student_z.shape[0],):
            raise ValueError(f"{op}: masks_weight must be a tensor of shape ({student_z.shape[0]},), got "
                             f"{tuple(masks_weight.shape) if isinstance(masks_weight, torch.Tensor) else masks_weight!r}")
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
            raise ValueError(f"{op}: n_images must be a positive int, got {n_images!r}")
    tensors = (student_z, teacher_z, student_prototypes, teacher_prototypes)
    dtype = _compute_dtype(*(t.dtype for t in tensors))
    chosen = _choose_backend(backend, tensors, dtype if dtype == torch.float64 else student_z.dtype, op)
    with torch.autocast(student_z.device.type, enabled=False):
        if chosen == "reference":
            return ibot_head_loss_reference(
                student_z, teacher_z, student_prototypes, teacher_prototypes, student_temp=student_temp,
                teacher_temp=teacher_temp, masks_weight=masks_weight, n_images=n_images, centering=centering,
                sk_iterations=sk_iterations, center=center, center_momentum=center_momentum, reduction=reduction)
        w = (masks_weight.detach().to(device=student_z.device, dtype=torch.float32) / n_images).reshape(-1, 1)
        rows, new_center = _fused_rows(student_z, teacher_z, student_prototypes, teacher_prototypes, w,
                                       student_temp, teacher_temp, centering, sk_iterations, center,
                                       center_momentum, chosen)
        out = rows if reduction == "none" else rows.sum()
        return (out, new_center) if centering == "softmax" else out
