"""Patch-feature visualisations: PCA to RGB and cosine-similarity maps."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["pca_rgb", "patch_similarity", "colorize", "upscale_nearest"]


def _pca_project(x: Tensor, k: int) -> Tensor:
    """Project rows of x (P, C) on its first k principal components, deterministic signs. -> (P, k)."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:k]
    # Sign convention: the largest-magnitude loading of each component is positive.
    idx = comps.abs().argmax(dim=1)
    comps = comps * comps.gather(1, idx[:, None]).sign()
    proj = x @ comps.T
    if proj.shape[1] < k:  # fewer rows/dims than components
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], k - proj.shape[1])], 1)
    return proj


def _minmax(x: Tensor, dim: int = 0) -> Tensor:
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def pca_rgb(
    features: Tensor, *, fg_threshold: float | None = None, fg_invert: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Patch features (h, w, C) -> (RGB image (h, w, 3) in [0, 1], foreground mask (h, w)).

    Colours are the first three principal components, each min-max scaled. With ``fg_threshold``
    the first component (scaled to [0, 1]) separates foreground (> threshold; < with ``fg_invert``)
    from background; colours then come from a PCA of the foreground patches only, background black.
    """
    if features.ndim != 3:
        raise ValueError(f"expected patch features (h, w, C), got {tuple(features.shape)}")
    h, w, c = features.shape
    flat = features.reshape(h * w, c).float()
    fg = torch.ones(h * w, dtype=torch.bool)
    if fg_threshold is not None:
        if not 0.0 <= fg_threshold <= 1.0:
            raise ValueError(f"fg_threshold must be in [0, 1], got {fg_threshold}")
        first = _minmax(_pca_project(flat, 1)[:, 0])
        fg = first < fg_threshold if fg_invert else first > fg_threshold
    rgb = torch.zeros(h * w, 3, dtype=torch.float64)
    if fg.sum() >= 2:
        rgb[fg] = _minmax(_pca_project(flat[fg], 3))
    elif fg.sum() == 1:
        rgb[fg] = 1.0
    return rgb.reshape(h, w, 3).numpy(), fg.reshape(h, w).numpy()


def patch_similarity(features: Tensor, row: int, col: int) -> np.ndarray:
    """Cosine similarity (h, w) of every patch to the patch at (row, col) of features (h, w, C)."""
    if features.ndim != 3:
        raise ValueError(f"expected patch features (h, w, C), got {tuple(features.shape)}")
    h, w, _ = features.shape
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"patch ({row}, {col}) is outside the {h}x{w} patch grid")
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    return (f @ f[row, col]).numpy()


def colorize(values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scalar map (h, w) -> RGB (h, w, 3) in [0, 1] with the viridis colormap (grey ramp without matplotlib)."""
    vmin = float(values.min()) if vmin is None else vmin
    vmax = float(values.max()) if vmax is None else vmax
    t = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    try:
        from matplotlib import colormaps

        return colormaps["viridis"](t)[..., :3]
    except ImportError:
        return np.repeat(t[..., None], 3, axis=-1)


def upscale_nearest(img: np.ndarray, factor: int) -> np.ndarray:
    """(h, w, ...) -> (h*factor, w*factor, ...) by repeating each patch."""
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)
