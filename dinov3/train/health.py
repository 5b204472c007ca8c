"""Health of a run: cheap statistics of the tensors a training step already holds, and the alarms read off them.

Metrics (one value per logged iteration, keys as written to ``metrics.jsonl``):

- ``dino_target_entropy`` / ``ibot_target_entropy``: mean over rows of the teacher's target entropy
  H(q) = -sum_k q_k log q_k, in nats (after Sinkhorn-Knopp or centering);
- ``dino_student_entropy`` / ``ibot_student_entropy``: the same for the student's softmax(logits / student_temp);
- ``dino_log_k``: log K of the DINO head (the entropy of a uniform output, and the DINO loss of a student that
  outputs it against any target);
- ``cls_pairwise_cos``: mean cosine between the CLS tokens of different images of the same global crop (-> 1:
  every image maps to one feature, a collapse);
- ``cls_patch_cos``: mean cosine between each image's CLS token and its own patch tokens (the DINOv3 paper's
  measure of patch features drifting towards the global one, which Gram anchoring counters);
- ``feature_rank``: effective rank exp(H(s / sum s)) of the CLS features of the batch's global crops, s their
  singular values (RankMe, Garrido et al. 2023; at most min(2B, D), so compare runs of the same batch size).

The backbone statistics use the EMA teacher's features: they come from unmasked crops without drop-path, and the
teacher is the model a run exports.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

logger = logging.getLogger("dinov3.train")

# The CLS-cosine alarm is armed once the cosine has come this far below its threshold (hysteresis: early in training
# it wanders around the threshold on its way down from ~1).
CLS_COS_HYSTERESIS = 0.1

HEALTH_KEYS = ("dino_target_entropy", "dino_student_entropy", "ibot_target_entropy", "ibot_student_entropy",
               "dino_log_k", "cls_pairwise_cos", "cls_patch_cos", "feature_rank")


def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_k p_k log p_k (nats) for probabilities (..., K); NaN when there is no row."""
    p = probs.float().reshape(-1, probs.shape[-1])
    if p.shape[0] == 0:
        return torch.tensor(float("nan"), device=p.device)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()


def mean_softmax_entropy(logits: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean over rows of the entropy of softmax(logits / temp), computed from log-probabilities (nats)."""
    z = logits.float().reshape(-1, logits.shape[-1])
    if z.shape[0] == 0:
        return torch.tensor(float("nan"), device=z.device)
    log_p = F.log_softmax(z / temp, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def pairwise_cos(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine between different rows of x (..., B, D), averaged over the leading dims; NaN for B < 2."""
    b = x.shape[-2]
    if b < 2:
        return torch.tensor(float("nan"), device=x.device)
    u = F.normalize(x.float(), dim=-1)
    s = u.sum(-2)  # sum_{i,j} u_i . u_j = |sum_i u_i|^2; remove the B diagonal ones
    off = (s * s).sum(-1) - (u * u).sum((-2, -1))
    return (off / (b * (b - 1))).mean()


def cls_patch_cos(cls: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Mean cosine between each image's CLS token (N, D) and its patch tokens (N, P, D)."""
    c = F.normalize(cls.float(), dim=-1)
    p = F.normalize(patch.float(), dim=-1)
    return torch.einsum("nd,npd->np", c, p).mean()


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalised singular values) of the rows x (N, D): 1 for identical rows, min(N, D) for
    orthogonal rows of equal norm. The rows are not centred, so a collapse to one vector reads as 1."""
    s = torch.linalg.svdvals(x.float())
    p = s / s.sum().clamp_min(1e-30)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


@torch.no_grad()
def health_metrics(*, dino_targets: torch.Tensor, dino_student_logits: list[torch.Tensor], dino_student_temp: float,
                   ibot_targets: torch.Tensor, ibot_student_logits: torch.Tensor, ibot_student_temp: float,
                   teacher_cls: torch.Tensor, teacher_patch: torch.Tensor, n_global: int) -> dict[str, torch.Tensor]:
    """The metrics of the module docstring from one step's tensors.

    dino_targets (..., K) teacher probabilities; dino_student_logits: the student's DINO logits (rows of K), one
    tensor per crop kind; ibot_targets / ibot_student_logits (M, K') for the masked patches; teacher_cls (n_global*B,
    D) and teacher_patch (n_global*B, P, D) crop-major, as the teacher returns them."""
    k = dino_targets.shape[-1]
    student = torch.cat([z.reshape(-1, k) for z in dino_student_logits])
    cls = teacher_cls.float().unflatten(0, (n_global, -1))  # (n_global, B, D)
    return {
        "dino_target_entropy": mean_entropy(dino_targets),
        "dino_student_entropy": mean_softmax_entropy(student, dino_student_temp),
        "ibot_target_entropy": mean_entropy(ibot_targets),
        "ibot_student_entropy": mean_softmax_entropy(ibot_student_logits, ibot_student_temp),
        "dino_log_k": torch.tensor(math.log(k), device=dino_targets.device),
        "cls_pairwise_cos": pairwise_cos(cls),
        "cls_patch_cos": cls_patch_cos(teacher_cls, teacher_patch),
        "feature_rank": effective_rank(teacher_cls),
    }


class HealthMonitor:
    """Reads the logged rows and warns (once, then at most every ``warn_every`` iterations per alarm) when

    - the DINO terms have stayed within ``dino_margin`` nats of log K for ``patience`` logged rows in a row, after the
      teacher-temperature warm-up: the DINO head outputs a uniform distribution and its loss no longer trains anything;
    - ``cls_pairwise_cos`` passes ``cls_cos_threshold`` from below: different images, whose CLS tokens had spread
      apart, get nearly the same CLS feature again. At initialisation every image's CLS token is about the learned
      CLS token itself (cosine ~0.99 in the ``tiny`` runs), so a value above the threshold is the starting point, not
      an alarm, until the cosine has once come ``CLS_COS_HYSTERESIS`` below the threshold.
    """

    def __init__(self, *, warmup_iters: int, dino_margin: float, cls_cos_threshold: float, warn_every: int,
                 patience: int):
        self.warmup_iters = warmup_iters
        self.dino_margin = dino_margin
        self.cls_cos_threshold = cls_cos_threshold
        self.warn_every = warn_every
        self.patience = max(1, patience)
        self._dino_streak: list[int] = []  # iterations of the current run of rows at log K
        self._cls_was_below = False
        self._last_warned: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg: dict) -> "HealthMonitor":
        h = cfg["health"]
        return cls(warmup_iters=int(cfg["schedules"]["teacher_temp"].get("warmup_iters", 0)),
                   dino_margin=float(h["dino_log_k_margin"]), cls_cos_threshold=float(h["cls_cos_threshold"]),
                   warn_every=int(h["warn_every"]), patience=int(h["patience"]))

    def prime(self, metrics_path: str) -> None:
        """Read the rows an interrupted run already logged (a resume), so that a streak or a CLS cosine that had
        come down carries over; each alarm may then fire once more in this process."""
        from .rundir import read_metrics

        try:
            rows = read_metrics(metrics_path)
        except FileNotFoundError:
            return
        for row in rows:
            self.check(row)
        self._last_warned.clear()

    def _due(self, alarm: str, iteration: int) -> bool:
        last = self._last_warned.get(alarm)
        if last is not None and iteration - last < self.warn_every:
            return False
        self._last_warned[alarm] = iteration
        return True

    def check(self, row: dict) -> list[str]:
        """The warnings this logged row raises (an empty list for a healthy one)."""
        it = int(row["iteration"])
        out = []
        cos = row.get("cls_pairwise_cos")
        if cos is not None and math.isfinite(cos):
            if cos <= self.cls_cos_threshold - CLS_COS_HYSTERESIS:
                self._cls_was_below = True
            elif cos > self.cls_cos_threshold and self._cls_was_below and self._due("cls_cos", it):
                out.append(
                    f"iteration {it}: CLS tokens of different images have mean cosine {cos:.3f}, above "
                    f"{self.cls_cos_threshold:g} after having spread below "
                    f"{self.cls_cos_threshold - CLS_COS_HYSTERESIS:g} (feature rank "
                    f"{row.get('feature_rank', math.nan):.1f}): the backbone now gives nearly every image the same "
                    "global feature, a representation collapse. Try a higher dino.koleo_loss_weight (it spreads the "
                    "CLS tokens apart), a lower schedules.lr.peak or a higher teacher momentum (schedules.momentum), "
                    "and check that the images are not near-duplicates.")
        if it < self.warmup_iters or "dino_log_k" not in row:
            self._dino_streak = []
            return out
        log_k = row["dino_log_k"]
        dino = [row[k] for k in ("dino_global_crops_loss", "dino_local_crops_loss") if k in row]
        if dino and all(abs(v - log_k) < self.dino_margin for v in dino):
            self._dino_streak.append(it)
        else:
            self._dino_streak = []
        if len(self._dino_streak) >= self.patience and self._due("dino_log_k", it):
            out.append(
                f"iteration {it}: the DINO loss has stayed within {self.dino_margin:g} of log K = {log_k:.4f} since "
                f"iteration {self._dino_streak[0]} (global {row.get('dino_global_crops_loss', math.nan):.4f}, local "
                f"{row.get('dino_local_crops_loss', math.nan):.4f}; student entropy "
                f"{row.get('dino_student_entropy', math.nan):.4f}, teacher target entropy "
                f"{row.get('dino_target_entropy', math.nan):.4f} nats). The DINO head's output has collapsed to the "
                "uniform distribution: the image-level (CLS) objective gives no signal, only iBOT, KoLeo and Gram "
                "train the backbone (the kNN and seg probes of dinov3-eval tell whether it still learns). It happens "
                "when a crop's CLS token cannot predict another crop's of the same image (hard views, small images, "
                "little data). Try easier views (larger crops.global_crops_scale and crops.local_crops_scale "
                "minimums), fewer prototypes (dino.head_n_prototypes), a lower schedules.teacher_temp.peak, or a "
                "longer teacher-temperature warm-up.")
        return out
