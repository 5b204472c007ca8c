"""Gram-anchoring loss (DINOv3, Sec. 4): MSE between the patch Gram matrices of the student and the Gram teacher.

reference (the spec) -> input checks -> kernels and autograd -> public function -> nn.Module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend, _library  # noqa: F401  (_library defines the op schemas)

__all__ = ["gram_loss", "gram_loss_reference", "GramLoss"]

NORM_EPS = 1e-12  # F.normalize's default, as the official loss uses it
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
METHODS = ("auto", "tiled", "factored")


# ---- 1. reference ------------------------------------------------------------------------------------------------
def gram_loss_reference(student, teacher, *, apply_norm=True, img_level=True, remove_neg=False,
                        remove_only_teacher_neg=False):
    """mean((clamp(Ŝ Ŝᵀ) - clamp(T̂ T̂ᵀ))²) in float32 (float64 if an input is float64), as official DINOv3.

    remove_neg clamps the negative entries of both Gram matrices to 0; remove_only_teacher_neg those of the teacher
    (the official code's extra student mask tests the already-clamped teacher and so changes nothing).
    """
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    s, t = student.to(dtype), teacher.to(dtype)
    if apply_norm:
        s, t = F.normalize(s, dim=-1, eps=NORM_EPS), F.normalize(t, dim=-1, eps=NORM_EPS)
    if not img_level and s.dim() == 3:
        s, t = s.flatten(0, 1), t.flatten(0, 1)
    gram_s = s @ s.transpose(-1, -2)
    gram_t = t @ t.transpose(-1, -2)
    if remove_neg:
        gram_s = gram_s.masked_fill(gram_s < 0, 0.0)
        gram_t = gram_t.masked_fill(gram_t < 0, 0.0)
    elif remove_only_teacher_neg:
        gram_t = gram_t.masked_fill(gram_t < 0, 0.0)
    return F.mse_loss(gram_s, gram_t)


# ---- 2. input checks (public boundary) ---------------------------------------------------------------------------
def _check_inputs(student, teacher, img_level, remove_neg, remove_only_teacher_neg, method):
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"gram_loss: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"gram_loss: {name} must be a floating-point tensor, got {x.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(f"gram_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    if student.device != teacher.device:
        raise ValueError(f"gram_loss: student is on {student.device} and teacher on {teacher.device}")
    if img_level and student.dim() != 3:
        raise ValueError(f"gram_loss: img_level=True needs (B, N, D) features, got shape {tuple(student.shape)}")
    if student.dim() not in (2, 3):
        raise ValueError(f"gram_loss: expected (B, N, D) or (B*N, D) features, got shape {tuple(student.shape)}")
    if student.numel() == 0:
        raise ValueError(f"gram_loss: empty input of shape {tuple(student.shape)}")
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("gram_loss: remove_neg and remove_only_teacher_neg are exclusive")
    if method not in METHODS:
        raise ValueError(f"gram_loss: method must be one of {METHODS}, got {method!r}")


def _op_check(dtype):
    def check(backend):
        if backend == "composed" and dtype == torch.float64:
            return None  # plain PyTorch: float64 too (how the CPU tests check it exactly)
        if dtype not in KERNEL_DTYPES:
            return f"dtype {dtype} is not supported by the {backend} kernels (float32, float16, bfloat16)"
        return None

    return check


# ---- 3. kernels and autograd -------------------------------------------------------------------------------------
def _factored_cdtype(x, apply_norm):
    """The dtype of Z = [Ŝ + T̂ | Ŝ - T̂] in the factored form (its products accumulate in fp32, fp64 for fp64).

    Where torch would run fp32 products in TF32 (allow_tf32 on a CUDA tensor) and for 16-bit input: fp16 when the
    rows are normalised (|Ŝ ± T̂| <= 2 per element fits; fp16 keeps TF32's 10-bit mantissa and runs the tensor cores
    at twice TF32's rate on half the bytes); raw features need range first, bf16 (bf16 input) or fp32 (products in
    TF32 where allowed). IEEE fp32 otherwise (the CPU, TF32 off); fp64 for fp64."""
    if x.dtype == torch.float64:
        return torch.float64
    low = x.dtype != torch.float32 or (x.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    if not low:
        return torch.float32
    if apply_norm:
        return torch.float16
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


_OUT_DTYPE = {"cuda": None}  # whether torch.bmm(..., out_dtype=float32) runs on 16-bit CUDA operands (probed once)


def _bmm_acc(a, b, acc):
    """a @ b (batched) with the result in `acc` (fp32 or fp64): 16-bit operands multiply on the tensor cores with fp32
    accumulation and an fp32 result (cuBLAS through torch's out_dtype, torch >= 2.8); on the CPU, or where that is not
    available, they are upcast first (the same products: a 16-bit value is exact in fp32, and in TF32)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda and _OUT_DTYPE["cuda"] is not False:
            try:
                out = torch.bmm(a, b, out_dtype=torch.float32)
            except torch.cuda.OutOfMemoryError:
                raise
            except (RuntimeError, NotImplementedError, TypeError):  # this torch has no fp32-output 16-bit bmm
                _OUT_DTYPE["cuda"] = False
            else:
                _OUT_DTYPE["cuda"] = True
                return out
        a, b = a.to(acc), b.to(acc)
    return torch.bmm(a, b)


def _sum_diff_torch(s, t, z, apply_norm, acc):
    """z <- [Ŝ + T̂ | Ŝ - T̂] in z's dtype, formed in `acc` (normalised when apply_norm; raw 16-bit sums could pass
    their range); returns the row norms (G, 2, P) or None."""
    D = s.shape[-1]
    xs, xt = s.to(acc), t.to(acc)
    norms = None
    if apply_norm:
        norms = torch.stack((torch.linalg.vector_norm(xs, dim=-1), torch.linalg.vector_norm(xt, dim=-1)), dim=1)
        xs = xs / norms[:, 0, :, None].clamp_min(NORM_EPS)
        xt = xt / norms[:, 1, :, None].clamp_min(NORM_EPS)
    torch.add(xs, xt, out=z[..., :D])
    torch.sub(xs, xt, out=z[..., D:])
    return norms


def _gram_fwd_factored(s, t, apply_norm, grad_s, grad_t, backend="composed", cdtype=None):
    """The factored form without a P×P matrix, in the sum and difference of the rows: O(P·D²) instead of O(P²·D).

    With Σ = Ŝ + T̂ and Δ = Ŝ - T̂ (P×D per group), E = ŜŜᵀ - T̂T̂ᵀ = ½(ΣΔᵀ + ΔΣᵀ), so with the D×D products
    K11 = ΣᵀΣ, K22 = ΔᵀΔ, K12 = ΣᵀΔ (K21 = K12ᵀ):
        |E|² = ½⟨K11, K22⟩ + ½ Σ_ab (K12)_ab (K12)_ba
        dL/dŜ =  1/M (Σ (K21 + K22) + Δ (K11 + K12)),   dL/dT̂ = -1/M (Σ (K21 - K22) + Δ (K11 - K12)),
    each gradient one GEMM of Z = [Σ | Δ] with a (2D×D) stack of those sums. The loss's terms are of the order of
    |Δ|², the gradients' of |Δ|, so a student close to its teacher does not make large terms cancel (the
    |ŜᵀŜ|² - 2|ŜᵀT̂|² + |T̂ᵀT̂|² form loses the loss that way), and rounding Σ and Δ to fp16 perturbs the difference of
    the rows only relative to itself: the products run on 16-bit tensor cores (see _factored_cdtype) with fp32
    accumulation. Only valid without clamping. Backend "triton": Triton kernels for the three passes that are not
    GEMMs (Z and the norms, the D×D pass, the normalize backward; one read of their inputs each); otherwise torch ops.
    Returns (loss, grad_s or empty, grad_t or empty) for a loss weight of 1.
    """
    G, P, D = s.shape
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    cdtype = cdtype or _factored_cdtype(s, apply_norm)
    fused = backend == "triton" and cdtype != torch.float64
    z = s.new_empty((G, P, 2 * D), dtype=cdtype)
    if fused:
        from ._triton.gram import gram_sum_diff_triton

        norms = gram_sum_diff_triton(s, t, z, apply_norm=apply_norm, eps=NORM_EPS)
    else:
        norms = _sum_diff_torch(s, t, z, apply_norm, acc)
    sig, dlt = z[..., :D], z[..., D:]
    k11 = _bmm_acc(sig.transpose(1, 2), sig, acc)
    k22 = _bmm_acc(dlt.transpose(1, 2), dlt, acc)
    k12 = _bmm_acc(sig.transpose(1, 2), dlt, acc)
    M = G * P * P
    scale = torch.ones((), dtype=acc, device=s.device)
    if cdtype in (torch.float16, torch.bfloat16):
        # The gradient GEMM's operand in range: K11 and K22 are positive semidefinite, so |K11_ab| <= a, |K22_ab| <= b
        # and |K12_ab| <= sqrt(a·b) with a, b their largest diagonal entries; every operand entry is then below
        # max(a, b) + sqrt(a·b), which a power of two (exact) scales into [2^13, 2^14): fp16 range, small entries
        # clear of its subnormals. Undone in the normalize backward.
        a = k11.diagonal(dim1=1, dim2=2).amax()
        b = k22.diagonal(dim1=1, dim2=2).amax()
        _, e = torch.frexp(torch.maximum(a, b) + torch.sqrt(a * b))
        scale = torch.ldexp(scale, 14 - e)
    if fused:
        from ._triton.gram import gram_factored_dd_triton

        total, ws, wt = gram_factored_dd_triton(k11, k22, k12, scale, cdtype, want_s=grad_s, want_t=grad_t)
    else:
        k21 = k12.transpose(1, 2)
        total = 0.5 * (torch.dot(k11.flatten(), k22.flatten()) + torch.dot(k12.flatten(), k21.flatten()))
        ws, wt = (torch.cat((k21 + sign * k22, k11 + sign * k12), dim=1).mul_(scale).to(cdtype) if want else None
                  for want, sign in ((grad_s, 1.0), (grad_t, -1.0)))
        del k21
    del k11, k22, k12
    loss = (total.clamp_min(0) / M).to(acc)
    out = []
    for w, sign, x, side in ((ws, 1.0, s, 0), (wt, -1.0, t, 1)):
        if w is None:
            out.append(x.new_empty(0))
            continue
        g = _bmm_acc(z, w, acc)  # M · dL/dx̂ · scale, the K dimension over [Σ | Δ]
        factor = sign / (M * scale)
        if fused:
            from ._triton.gram import gram_norm_backward_triton

            n = norms[:, side] if apply_norm else None
            out.append(gram_norm_backward_triton(x, g, n, factor, apply_norm=apply_norm, eps=NORM_EPS))
        else:  # the composed form's normalize backward, x̂ rebuilt from x and its norm
            n = norms[:, side, :, None] if apply_norm else None
            x_hat = x.to(acc) / n.clamp_min(NORM_EPS) if apply_norm else None
            out.append(_grad_through_norm(x, x_hat, n, g, factor, apply_norm, acc))
    return loss, out[0], out[1]


def _normalize_into(x, out, apply_norm, acc):
    """out <- x / max(|x|, eps) computed in `acc` precision and stored in out's dtype; returns the row norms (acc)."""
    if not apply_norm:
        out.copy_(x)
        return None
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
    torch.div(x, norm.clamp_min(NORM_EPS), out=out)
    return norm


def _grad_through_norm(x, x_hat, norm, g, scale, apply_norm, acc):
    """Gradient w.r.t. x given g = ∂L/∂x̂ / scale, reusing the stored x̂ and row norms: (g - x̂ (x̂·g)) / |x| per row
    (g / eps for rows with |x| <= eps, where x̂ = x / eps is linear). Three passes over (G, P, D) in place."""
    g = g.to(acc).mul_(scale) if g.dtype != acc else g.mul_(scale)
    if apply_norm:
        xh = x_hat if x_hat.dtype == acc else x_hat.to(acc)
        proj = torch.linalg.vecdot(xh, g).unsqueeze(-1)
        proj = torch.where(norm > NORM_EPS, proj, torch.zeros_like(proj))
        g.addcmul_(xh, proj, value=-1.0).div_(norm.clamp_min(NORM_EPS))
    return g.to(x.dtype).contiguous()


def _gram_fwd_composed(s, t, apply_norm, clamp_s, clamp_t, grad_s, grad_t):
    """The composed yardstick: batched vendor GEMMs and few elementwise passes, no hand-written kernel.

    Ŝ and T̂ are normalised once (in fp32) and stored in the input dtype side by side, [Ŝ | T̂] (G, P, 2D). Without
    clamping, E = ŜŜᵀ - T̂T̂ᵀ: for 16-bit input ONE batched GEMM over the 2D concatenated columns, [Ŝ | T̂]·[Ŝ | -T̂]ᵀ,
    so the difference is formed in the GEMM's fp32 accumulator and rounded once (two 16-bit Gram matrices subtracted
    afterwards would cancel); for fp32 input (TF32 when torch allows it, as in the official path) ŜŜᵀ then an in-place
    baddbmm subtracting T̂T̂ᵀ in fp32, without the concatenated copy. With clamping the two Gram matrices are needed
    apart. loss = mean(E²) reduced in fp32; gradients (4/M)·(E ⊙ kept)·Ŝ and -(4/M)·(E ⊙ kept)·T̂ as batched GEMMs,
    then the normalize backward from the stored Ŝ and norms. Memory: one (G, P, P) buffer in the compute dtype (two
    when clamping).
    """
    G, P, D = s.shape
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    a = s.new_empty(G, P, 2 * D)
    sh, th = a[..., :D], a[..., D:]
    norm_s = _normalize_into(s, sh, apply_norm, acc)
    norm_t = _normalize_into(t, th, apply_norm, acc)
    keep_s = keep_t = None
    if clamp_s or clamp_t:
        gram_s = torch.bmm(sh, sh.transpose(1, 2))
        gram_t = torch.bmm(th, th.transpose(1, 2))
        if clamp_s:  # masked_fill(< 0, 0): the gradient flows where the entry is kept
            keep_s = gram_s >= 0
            gram_s.clamp_min_(0)
        if clamp_t:
            keep_t = gram_t >= 0
            gram_t.clamp_min_(0)
        e = gram_s.sub_(gram_t)
        del gram_t
    elif s.dtype in (torch.float16, torch.bfloat16):
        b = torch.empty_like(a)
        b[..., :D].copy_(sh)
        torch.neg(th, out=b[..., D:])
        e = torch.bmm(a, b.transpose(1, 2))
        del b
    else:
        e = torch.bmm(sh, sh.transpose(1, 2)).baddbmm_(th, th.transpose(1, 2), alpha=-1.0)
    M = G * P * P
    loss = torch.linalg.vector_norm(e, dtype=acc).square() / M  # fp32 reduction, no fp32 copy of E
    gs = gt = s.new_empty(0)
    if grad_s:
        g = torch.bmm(e if keep_s is None else e * keep_s, sh)
        gs = _grad_through_norm(s, sh, norm_s, g, 4.0 / M, apply_norm, acc)
    if grad_t:
        g = torch.bmm(e if keep_t is None else e * keep_t, th)
        gt = _grad_through_norm(t, th, norm_t, g, -4.0 / M, apply_norm, acc)
    return loss, gs, gt


def _factored_wins(G, P, D, tensor_cores):
    """Whether the factored form (~10·P·D² FLOPs per group, cuBLAS GEMMs and four short passes) is predicted faster
    than the tiled one (~4·P²·D: the forward over the upper triangle, then the gradient GEMM).

    Without tensor cores (the CPU, IEEE fp32) by the FLOPs of the torch formulations, from P = 2·D. On tensor cores
    by the roofline model (benchmarks/roofline.py, H200; benchmarks/NOTES.md): the tiled kernels run near their L2
    roof, the factored GEMMs near peak but with ~18 launches and passes of ~24 bytes per feature, so it needs a
    taller group the narrower the rows, and enough work to amortise its launches. Predicted, not yet measured."""
    if not tensor_cores:
        return P >= 2 * D
    ratio = 2 if D >= 4096 else 3 if D >= 2048 else 4 if D >= 512 else 8
    return P >= ratio * D and 4 * G * P * P * D >= 1e11  # below ~0.1 ms of tiled work its launches weigh


def _choose_method(method, s, clamp):
    if method != "auto":
        return method
    G, P, D = s.shape
    if clamp:  # the factored form cannot clamp
        return "tiled"
    tensor_cores = s.is_cuda and _factored_cdtype(s, True) in (torch.float16, torch.bfloat16)
    return "factored" if _factored_wins(G, P, D, tensor_cores) else "tiled"


def _gram_loss_fwd_impl(student, teacher, apply_norm, clamp_student, clamp_teacher, grad_student, grad_teacher,
                        backend, method):
    method = _choose_method(method, student, clamp_student or clamp_teacher)
    if method == "factored":
        if clamp_student or clamp_teacher:
            raise ValueError("gram_loss: method='factored' cannot clamp negative entries (remove_neg)")
        return _gram_fwd_factored(student, teacher, apply_norm, grad_student, grad_teacher, backend)
    if backend == "composed":
        return _gram_fwd_composed(student, teacher, apply_norm, clamp_student, clamp_teacher, grad_student,
                                  grad_teacher)
    if backend == "triton":
        from ._triton.gram import gram_fwd_triton

        return gram_fwd_triton(student, teacher, apply_norm=apply_norm, clamp_s=clamp_student,
                               clamp_t=clamp_teacher, grad_s=grad_student, grad_t=grad_teacher, eps=NORM_EPS)
    if backend == "cuda":
        from ._cuda.gram import gram_fwd_cuda

        return gram_fwd_cuda(student, teacher, apply_norm=apply_norm, clamp_s=clamp_student, clamp_t=clamp_teacher,
                             grad_s=grad_student, grad_t=grad_teacher, eps=NORM_EPS)
    raise ValueError(f"gram_loss_fwd: unknown kernel backend {backend!r}")


torch.library.register_kernel("dinov3_kernels::gram_loss_fwd", ("cpu", "cuda"), _gram_loss_fwd_impl)


def _gram_setup_context(ctx, inputs, output):
    _, gs, gt = output
    ctx.save_for_backward(gs, gt)
    ctx.grad_student, ctx.grad_teacher = inputs[5], inputs[6]


def _gram_backward(ctx, grad_loss, _grad_gs, _grad_gt):
    gs, gt = ctx.saved_tensors
    ds = (gs * grad_loss).to(gs.dtype) if ctx.grad_student else None
    dt = (gt * grad_loss).to(gt.dtype) if ctx.grad_teacher else None
    return ds, dt, None, None, None, None, None, None, None


torch.library.register_autograd("dinov3_kernels::gram_loss_fwd", _gram_backward, setup_context=_gram_setup_context)


# The Triton tiled form: the gradient is computed in the backward from E' (upper-triangle tiles, compute dtype), the
# row norms and the inputs (or the forward's [Ŝ | T̂] where P > D), so between forward and backward it holds E' (about
# a quarter of the gradient's bytes at P = D with fp16 storage) instead of the gradient, and the incoming gradient is
# applied inside the kernel.
def _gram_tiled_fwd_impl(student, teacher, apply_norm, clamp_student, clamp_teacher, grad_student, grad_teacher):
    from ._triton.gram import gram_triton_forward

    return gram_triton_forward(student, teacher, apply_norm=apply_norm, clamp_s=clamp_student, clamp_t=clamp_teacher,
                               grad_s=grad_student, grad_t=grad_teacher, eps=NORM_EPS)


def _gram_tiled_bwd_impl(grad, student, teacher, e, rowsums, norms, y, apply_norm, clamp_student, clamp_teacher,
                         grad_student, grad_teacher):
    from ._triton.gram import gram_triton_backward

    return gram_triton_backward(grad, student, teacher, e, rowsums, norms, y, apply_norm=apply_norm,
                                clamp_s=clamp_student, clamp_t=clamp_teacher, grad_s=grad_student,
                                grad_t=grad_teacher, eps=NORM_EPS)


torch.library.register_kernel("dinov3_kernels::gram_loss_tiled_fwd", ("cpu", "cuda"), _gram_tiled_fwd_impl)
torch.library.register_kernel("dinov3_kernels::gram_loss_tiled_bwd", ("cpu", "cuda"), _gram_tiled_bwd_impl)


def _gram_tiled_setup_context(ctx, inputs, output):
    student, teacher = inputs[0], inputs[1]
    grad_student, grad_teacher = inputs[5], inputs[6]
    _, e, rowsums, norms, y = output
    # Only the side that gets a gradient is needed again (x̂ is rebuilt from it): a Gram teacher's features are not
    # kept alive until the backward.
    ctx.save_for_backward(student if grad_student else None, teacher if grad_teacher else None, e, rowsums, norms, y)
    ctx.flags = inputs[2:]


def _gram_tiled_backward(ctx, grad_loss, *_):
    student, teacher, *saved = ctx.saved_tensors
    empty = saved[0].new_empty(0)
    student = empty if student is None else student
    teacher = empty if teacher is None else teacher
    ds, dt = torch.ops.dinov3_kernels.gram_loss_tiled_bwd(grad_loss, student, teacher, *saved, *ctx.flags)
    grad_student, grad_teacher = ctx.flags[3], ctx.flags[4]
    return (ds if grad_student else None), (dt if grad_teacher else None), None, None, None, None, None


torch.library.register_autograd("dinov3_kernels::gram_loss_tiled_fwd", _gram_tiled_backward,
                                setup_context=_gram_tiled_setup_context)


# ---- 4. public function and module -------------------------------------------------------------------------------
def gram_loss(student, teacher, *, apply_norm=True, img_level=True, remove_neg=False, remove_only_teacher_neg=False,
              backend="auto", method="auto"):
    """Fused Gram-anchoring loss; same value and gradients as :func:`gram_loss_reference`.

    student, teacher: (B, N, D) patch features (or (B*N, D) with img_level=False). The Gram matrices are per image
    (img_level=True) or over the whole flattened batch. Gradients reach the student, and the teacher when it requires
    grad. backend: "auto" | "reference" | "composed" (batched vendor GEMMs over [Ŝ | T̂]: one (B, P, P) buffer in the
    compute dtype) | "triton" | "cuda". method (non-reference backends): "tiled" (triton/cuda: fused P×P tiles, never
    stored; composed: the GEMM form), "factored" (D×D products of the rows' sum and difference, O(P·D²), no clamping;
    see _gram_fwd_factored), or "auto" (factored on tall groups where it is predicted faster: _factored_wins).
    """
    if not torch.compiler.is_compiling():
        _check_inputs(student, teacher, img_level, remove_neg, remove_only_teacher_neg, method)
    if student.dtype != teacher.dtype:
        dtype = torch.promote_types(student.dtype, teacher.dtype)
        student, teacher = student.to(dtype), teacher.to(dtype)
    chosen = _backend.choose_backend(backend, (student, teacher), _op_check(student.dtype), "gram_loss",
                                    atomics=(),  # the Triton and CUDA kernels write each gradient element once
                                    size=student.shape[-2] if img_level else student.shape[:-1].numel())
    if chosen == "reference":
        return gram_loss_reference(student, teacher, apply_norm=apply_norm, img_level=img_level,
                                   remove_neg=remove_neg, remove_only_teacher_neg=remove_only_teacher_neg)
    D = student.shape[-1]
    if img_level:
        s, t = student, teacher
    else:  # one group of B*N rows: a view for contiguous input, one copy otherwise
        s, t = student.reshape(1, -1, D), teacher.reshape(1, -1, D)
    clamp_t = remove_neg or remove_only_teacher_neg
    if chosen == "triton" and _choose_method(method, s, clamp_t) == "tiled":  # clamp_t: any clamp at all
        loss = torch.ops.dinov3_kernels.gram_loss_tiled_fwd(s, t, apply_norm, remove_neg, clamp_t,
                                                            student.requires_grad, teacher.requires_grad)[0]
        return loss
    loss, _, _ = torch.ops.dinov3_kernels.gram_loss_fwd(
        s, t, apply_norm, remove_neg, clamp_t, student.requires_grad, teacher.requires_grad, chosen, method,
    )
    return loss


class GramLoss(torch.nn.Module):
    """Drop-in for the official ``dinov3.loss.GramLoss`` (same constructor and call), backed by the fused kernels.

    As in the official class, the Gram level is chosen by ``forward``'s ``img_level`` argument.
    """

    def __init__(self, apply_norm=True, img_level=True, remove_neg=True, remove_only_teacher_neg=False,
                 backend="auto"):
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("GramLoss: remove_neg and remove_only_teacher_neg are exclusive")
        self.apply_norm = apply_norm
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg
        self.backend = backend

    def forward(self, output_feats, target_feats, img_level=True):
        return gram_loss(output_feats, target_feats, apply_norm=self.apply_norm, img_level=img_level,
                         remove_neg=self.remove_neg, remove_only_teacher_neg=self.remove_only_teacher_neg,
                         backend=self.backend)

    def extra_repr(self):
        return (f"apply_norm={self.apply_norm}, remove_neg={self.remove_neg}, "
                f"remove_only_teacher_neg={self.remove_only_teacher_neg}, backend={self.backend!r}")
