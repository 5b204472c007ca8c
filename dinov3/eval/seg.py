"""Linear patch-level segmentation probe: a frozen backbone, one linear layer on its patch tokens, mIoU.

Data: a folder of images, each with a mask beside it named ``<stem>_mask.png`` (a single-channel PNG whose pixel
values are class indices; 255 = ignore). Images and masks are centre-cropped to a square and resized to ``size``
pixels (bicubic for images, nearest for masks). The probe: patch features standardised with the training
set's mean and std, a linear map to class logits per patch, trained with the cross-entropy against the class
fractions of the patch's pixels; predictions are the logits upsampled bilinearly to the mask's resolution, scored as
the mean over classes of intersection-over-union on the validation pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinov3.images import IMAGE_EXTENSIONS

MASK_SUFFIX = "_mask.png"
IGNORE_INDEX = 255


# ------------------------------------------------------------------------------------------------ data
def find_pairs(folder: str | Path, mask_suffix: str = MASK_SUFFIX) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(image, mask) pairs under ``folder`` (recursive, sorted) and the images that have no mask beside them."""
    folder = Path(folder)
    pairs, lonely = [], []
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if f.name.endswith(mask_suffix) or f.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        mask = f.with_name(f.stem + mask_suffix)
        (pairs.append((f, mask)) if mask.is_file() else lonely.append(f))
    return pairs, lonely


def read_mask(path: str | Path) -> np.ndarray:
    """Class indices (H, W) int64 of a mask image; ValueError (with the reason) if it is not single-channel."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B", "1"):
            raise ValueError(f"a mask must be a single-channel image of class indices, not mode {img.mode}")
        return np.asarray(img).astype(np.int64)


def load_pair(image_path: Path, mask_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (size, size, 3), class indices int64 (size, size)). Raises UnreadableImage / ValueError."""
    from PIL import Image

    from dinov3.images import center_square, load_rgb

    img = load_rgb(image_path)
    mask = read_mask(mask_path)
    if mask.shape != (img.size[1], img.size[0]):
        raise ValueError(f"mask {mask.shape[1]}x{mask.shape[0]} does not match the image's {img.size[0]}x{img.size[1]}")
    m = center_square(Image.fromarray(mask.astype(np.int32), mode="I"), size, Image.NEAREST)
    return np.asarray(center_square(img, size)), np.asarray(m).astype(np.int64)


def normalize(rgb: np.ndarray, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32, mean/std normalised."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).float().div(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def extract_patch_features(model: nn.Module, images: torch.Tensor, *, batch_size: int = 64,
                           device: str | torch.device = "cpu", autocast: Callable | None = None) -> torch.Tensor:
    """(N, 3, S, S) normalised images -> (N, S/p, S/p, D) ``x_norm_patchtokens`` (float32, CPU)."""
    was_training = model.training
    model.eval()
    p = model.patch_size
    h, w = images.shape[-2] // p, images.shape[-1] // p
    out = []
    for i in range(0, images.shape[0], batch_size):
        ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            f = model.forward_features(images[i:i + batch_size].to(device))["x_norm_patchtokens"]
        out.append(f.float().cpu().unflatten(1, (h, w)))
    model.train(was_training)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ the probe
class LinearSegHead(nn.Module):
    """Standardised patch features (fixed mean/std from the training set) -> a linear layer -> class logits."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), num_classes)

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, h, w, D) -> logits (N, C, *size), upsampled bilinearly from the patch grid."""
        logits = self.linear((feats - self.mean) / self.std).permute(0, 3, 1, 2)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def patch_targets(masks: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """(N, H, W) class masks -> (N, h, w, C): the fraction of each patch's labelled pixels in each class (all zero
    for a patch without a labelled pixel). H, W must be multiples of h, w."""
    n, hh, ww = masks.shape
    h, w = grid
    valid = (masks >= 0) & (masks < num_classes)
    onehot = F.one_hot(torch.where(valid, masks, 0), num_classes).float() * valid[..., None]
    counts = onehot.reshape(n, h, hh // h, w, ww // w, num_classes).sum((2, 4))
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def train_linear_probe(feats: torch.Tensor, masks: torch.Tensor, num_classes: int, *, steps: int = 300,
                       lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> LinearSegHead:
    """Fit the head on (N, h, w, D) features and (N, H, W) masks (IGNORE_INDEX pixels left out). The loss is the
    cross-entropy of each patch's logits against its pixels' class fractions, weighted by its labelled pixels:
    the per-pixel loss of a head whose logits are constant over the patch, computed without upsampling.
    Full-batch AdamW with a cosine lr over ``steps`` steps; the init is seeded."""
    flat = feats.reshape(-1, feats.shape[-1])
    head = LinearSegHead(flat.mean(0), flat.std(0).clamp_min(1e-6), num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.linear.reset_parameters()
    target = patch_targets(masks, tuple(feats.shape[1:3]), num_classes).reshape(-1, num_classes)
    weight = target.sum(-1)  # 1 for a patch with labelled pixels, 0 otherwise
    x = (flat - head.mean) / head.std
    opt = torch.optim.AdamW(head.linear.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(steps):
        log_p = F.log_softmax(head.linear(x), dim=-1)
        loss = -(target * log_p).sum() / weight.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


@torch.no_grad()
def predict(head: LinearSegHead, feats: torch.Tensor, size: tuple[int, int], batch_size: int = 64) -> torch.Tensor:
    return torch.cat([head(feats[i:i + batch_size], size).argmax(1) for i in range(0, feats.shape[0], batch_size)])


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) pixel counts, rows = true class, columns = predicted; IGNORE_INDEX and out-of-range targets left out."""
    keep = (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> tuple[float, list[float]]:
    """(mIoU over the classes present in the targets or predictions, per-class IoU with NaN for absent ones)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = ~iou.isnan()
    return (float(iou[present].mean()) if present.any() else float("nan")), iou.tolist()


@dataclass
class SegResult:
    miou: float
    per_class_iou: list[float]
    pixel_accuracy: float
    num_classes: int
    n_train: int
    n_val: int

    def as_dict(self) -> dict:
        return {"miou": self.miou, "per_class_iou": self.per_class_iou, "pixel_accuracy": self.pixel_accuracy,
                "num_classes": self.num_classes, "n_train": self.n_train, "n_val": self.n_val}


def seg_probe(train_feats: torch.Tensor, train_masks: torch.Tensor, val_feats: torch.Tensor, val_masks: torch.Tensor,
              *, num_classes: int | None = None, **train_kwargs) -> SegResult:
    """Train the linear head on the training features and report mIoU on the validation ones."""
    if num_classes is None:
        labels = train_masks[train_masks != IGNORE_INDEX]
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
    head = train_linear_probe(train_feats, train_masks, num_classes, **train_kwargs)
    pred = predict(head, val_feats, tuple(val_masks.shape[-2:]))
    conf = confusion_matrix(pred, val_masks, num_classes)
    miou, per_class = iou_from_confusion(conf)
    acc = float(conf.diag().sum() / conf.sum().clamp_min(1))
    return SegResult(miou, per_class, acc, num_classes, int(train_feats.shape[0]), int(val_feats.shape[0]))
