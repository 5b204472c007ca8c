"""torch.library schemas and fake (meta) implementations of the ops.

Schemas live here, in Python, so the ops exist (for torch.compile, opcheck, export) whether or not the CUDA
extension was built. Each op module registers its real kernel (CPU and CUDA) and its autograd formula next to its
reference, in dinov3_kernels/<op>.py.
"""

import torch

LIB = torch.library.Library("dinov3_kernels", "DEF")  # noqa: TOR901 (kept alive for the process)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- gram_loss -------------------------------------------------------------------------------------------------
# (G, P, D) student and teacher -> (loss, d loss/d student, d loss/d teacher). The gradients are for a loss weight of
# one and are empty (numel 0) when not asked for; the autograd formula scales them by the incoming gradient.
LIB.define(
    "gram_loss_fwd(Tensor student, Tensor teacher, bool apply_norm, bool clamp_student, bool clamp_teacher, "
    "bool grad_student, bool grad_teacher, str backend, str method) -> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("dinov3_kernels::gram_loss_fwd")
def _gram_loss_fwd_fake(student, teacher, apply_norm, clamp_student, clamp_teacher, grad_student, grad_teacher,
                        backend, method):
    loss = student.new_empty((), dtype=_loss_dtype(student.dtype))
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher, memory_format=torch.contiguous_format) if grad_teacher else teacher.new_empty(0)
    return loss, gs, gt


# ---- koleo_loss ------------------------------------------------------------------------------------------------
# search (M, D) raw features; the n query rows are search[offset : offset + n]. Returns (loss, indices (n, topk)
# int64 into search, distances (n, topk) fp32, row norms (M,) fp32); the last three are saved for the backward.
LIB.define("koleo_loss_fwd(Tensor search, int offset, int n, int topk, float eps, str backend) -> "
           "(Tensor, Tensor, Tensor, Tensor)")


@torch.library.register_fake("dinov3_kernels::koleo_loss_fwd")
def _koleo_loss_fwd_fake(search, offset, n, topk, eps, backend):
    loss = search.new_empty((), dtype=_loss_dtype(search.dtype))
    idx = search.new_empty((n, topk), dtype=torch.int64)
    dist = search.new_empty((n, topk), dtype=torch.float32)
    norm = search.new_empty((search.shape[0],), dtype=torch.float32)
    return loss, idx, dist, norm
