"""DINO (CLS-token) and iBOT (masked-patch) self-distillation losses with Sinkhorn-Knopp or softmax centering."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _dist_on():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_samples: int | torch.Tensor | None = None,
                   n_iterations: int = 3) -> torch.Tensor:
    """Teacher assignments (N, K) whose rows sum to 1 and whose columns (over all ranks) have equal mass.

    Q = exp(logits / temp) is alternately normalised over prototypes (rows of Q^T, summed across ranks) and over
    samples; ``n_samples`` is the global number of rows (defaults to N * world size)."""
    q = torch.exp(logits.float() / temp).t()  # (K, N)
    k = q.shape[0]
    if n_samples is None:
        n = q.shape[1] * (dist.get_world_size() if _dist_on() else 1)
    else:
        n = n_samples
        if isinstance(n, torch.Tensor):
            n = _all_reduce_sum(n.detach().clone().to(q.device)).to(q.dtype)
    q /= _all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype gets mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample gets mass 1/N
        q /= n
    q *= n
    return q.t()


class DINOLoss(nn.Module):
    """Cross-entropy between teacher probabilities and student softmax(logits / student_temp) over all
    (student crop, teacher crop) pairs of the same image; ``ignore_diagonal`` drops the pairs of a crop with itself."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # used by softmax centering only

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, teacher_temp)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        probs = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)
        self.update_center(teacher_logits)
        return probs

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        flat = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
        total = _all_reduce_sum(flat.sum(0, keepdim=True))
        count = flat.shape[0] * (dist.get_world_size() if _dist_on() else 1)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, ignore_diagonal: bool = False):
        """student_logits (S, B, K), teacher_probs (T, B, K) -> scalar mean cross-entropy."""
        s, b, _ = student_logits.shape
        t = teacher_probs.shape[0]
        log_p = F.log_softmax(_at_least_fp32(student_logits) / self.student_temp, dim=-1)
        teacher_probs = teacher_probs.to(log_p.dtype)
        if not ignore_diagonal:
            return -torch.einsum("sbk,tbk->", log_p, teacher_probs) / (b * s * t)
        pair = -torch.einsum("sbk,tbk->st", log_p, teacher_probs)
        m = min(s, t)
        pair = pair * (1 - torch.eye(s, t, device=pair.device, dtype=pair.dtype))
        return pair.sum() / (b * s * t - b * m)


class iBOTPatchLoss(nn.Module):
    """Cross-entropy on masked patch tokens; each image's masked tokens share weight 1 / (#masked tokens in it),
    and the sum is divided by the number of images (global crops)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float,
                               n_masked_patches: torch.Tensor) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_samples=n_masked_patches)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        probs = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)
        flat = teacher_logits.float()
        total = _all_reduce_sum(flat.sum(0, keepdim=True))
        count = _all_reduce_sum(torch.tensor(float(flat.shape[0]), device=flat.device)).clamp(min=1)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
        return probs

    def forward_masked(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, *, masks: torch.Tensor,
                       masks_weight: torch.Tensor) -> torch.Tensor:
        """student_logits, teacher_probs: (M, K) for the M masked tokens; masks (n_images, P) bool."""
        log_p = F.log_softmax(_at_least_fp32(student_logits) / self.student_temp, dim=-1)
        per_token = (teacher_probs.to(log_p.dtype) * log_p).sum(-1)
        return -(per_token * masks_weight.to(log_p.dtype)).sum() / masks.shape[0]
