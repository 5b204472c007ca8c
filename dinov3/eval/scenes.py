"""A small dense-prediction task generated from a seed: textured objects on textured ground, with per-pixel classes.

No segmentation set is available offline, so this one is drawn: each scene has a ground texture and one to four
objects painted over it (later ones occlude earlier ones). An object's class fixes its shape family and its surface
pattern; its colours, size, position, rotation, aspect and pattern scale are drawn per object, and the whole scene
gets a smooth illumination gradient and sensor noise. Classes:

    0 ground     low-frequency two-colour noise with grain
    1 disc       ellipse covered in polka dots
    2 box        rotated rectangle with stripes
    3 triangle   triangle with a checkerboard
    4 star       five-pointed star with fine speckle
    5 blob       irregular blob with marbled waves

A scene is a function of (seed, split, index) only, so any subset can be regenerated exactly. Scenes are drawn at
twice the output size and box-filtered down (soft edges); the mask keeps the class at each output pixel's centre.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("ground", "disc", "box", "triangle", "star", "blob")
SPLITS = {"train": 1, "val": 2, "unlabeled": 3}
MASK_SUFFIX = "_mask.png"


# ------------------------------------------------------------------------------------------------ textures
def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1] (size, size): a random (cells+1)^2 grid upsampled bicubically."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
    a = np.asarray(img)
    return (a - a.min()) / max(float(a.max() - a.min()), 1e-6)


def _rotated_coords(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _pattern(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """The surface pattern of class ``kind`` over the whole canvas, values in [0, 1]."""
    u, v = _rotated_coords(size, rng.uniform(0, math.pi))
    period = rng.uniform(0.09, 0.2) * size
    if kind == 1:  # polka dots on a grid
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return (np.hypot(du, dv) < rng.uniform(0.22, 0.32)).astype(np.float32)
    if kind == 2:  # stripes
        return (0.5 + 0.5 * np.sin(2 * math.pi * u / period) > 0.5).astype(np.float32)
    if kind == 3:  # checkerboard
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == 4:  # fine speckle
        return (_value_noise(rng, size, max(4, size // 5)) > 0.5).astype(np.float32)
    if kind == 5:  # marbled waves
        warp = _value_noise(rng, size, 4) * period * 2.5
        return 0.5 + 0.5 * np.sin(2 * math.pi * (u + warp) / period)
    raise ValueError(f"no pattern for class {kind}")


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two colours of one hue family with clearly different brightness."""
    hue = rng.random()
    sat = rng.uniform(0.35, 0.95)
    dark, light = rng.uniform(0.15, 0.45), rng.uniform(0.6, 0.98)
    a = _hsv_to_rgb(hue, sat, dark)
    b = _hsv_to_rgb((hue + rng.uniform(-0.12, 0.12)) % 1.0, sat * rng.uniform(0.5, 1.0), light)
    return (a, b) if rng.random() < 0.5 else (b, a)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


# ------------------------------------------------------------------------------------------------ shapes
def _polygon_mask(size: int, points: list[tuple[float, float]]) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).polygon(points, fill=1)
    return np.asarray(img, dtype=bool)


def _shape(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """The boolean region of one object of class ``kind`` on a size x size canvas."""
    r = rng.uniform(0.14, 0.34) * size  # scale
    cx, cy = rng.uniform(0.1, 0.9, 2) * size  # position (objects may leave the frame partly)
    rot = rng.uniform(0, 2 * math.pi)
    aspect = rng.uniform(0.6, 1.0)

    def poly(radii_angles):
        return [(cx + rr * math.cos(a + rot), cy + rr * math.sin(a + rot)) for rr, a in radii_angles]

    if kind == 1:  # ellipse
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        return _polygon_mask(size, [(cx + r * math.cos(a) * math.cos(rot) - r * aspect * math.sin(a) * math.sin(rot),
                                     cy + r * math.cos(a) * math.sin(rot) + r * aspect * math.sin(a) * math.cos(rot))
                                    for a in t])
    if kind == 2:  # rectangle
        w, h = r, r * aspect
        corners = [(-w, -h), (w, -h), (w, h), (-w, h)]
        c, s = math.cos(rot), math.sin(rot)
        return _polygon_mask(size, [(cx + c * x - s * y, cy + s * x + c * y) for x, y in corners])
    if kind == 3:  # triangle (roughly equilateral, jittered corners)
        return _polygon_mask(size, poly([(r * rng.uniform(0.85, 1.15), k * 2 * math.pi / 3) for k in range(3)]))
    if kind == 4:  # five-pointed star
        inner = rng.uniform(0.38, 0.5)
        return _polygon_mask(size, poly([(r * (1.0 if k % 2 == 0 else inner), k * math.pi / 5) for k in range(10)]))
    if kind == 5:  # blob: a disc with a noisy radius
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        noise = _value_noise(rng, size, 5)
        return np.hypot(x - cx, (y - cy) / aspect) < r * (0.7 + 0.6 * noise)
    raise ValueError(f"no shape for class {kind}")


# ------------------------------------------------------------------------------------------------ scenes
def make_scene(seed: int, split: str, index: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 (size, size, 3), class mask uint8 (size, size)), a function of its arguments only."""
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    big = 2 * size
    a, b = _colour_pair(rng)
    ground = _value_noise(rng, big, int(rng.integers(2, 5)))
    grain = _value_noise(rng, big, big // 3)
    t = np.clip(0.8 * ground + 0.2 * grain, 0, 1)[..., None]
    rgb = (1 - t) * a + t * b
    mask = np.zeros((big, big), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(1, len(CLASSES)))
        region = _shape(kind, rng, big)
        ca, cb = _colour_pair(rng)
        p = _pattern(kind, rng, big)[..., None]
        rgb = np.where(region[..., None], (1 - p) * ca + p * cb, rgb)
        mask[region] = kind
    # Illumination: a smooth gradient across the scene, then sensor noise.
    u, _ = _rotated_coords(big, rng.uniform(0, 2 * math.pi))
    light = 1.0 + rng.uniform(0.1, 0.35) * (u / big - 0.5)
    rgb = rgb * light[..., None] + rng.normal(0, 0.02, rgb.shape)
    rgb = rgb.reshape(size, 2, size, 2, 3).mean((1, 3))  # 2x2 box filter: soft edges
    out = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    return out, mask[1::2, 1::2].copy()


def write_scenes(root: str, *, seed: int = 0, n_train: int = 200, n_val: int = 100, n_unlabeled: int = 0,
                 size: int = 64) -> dict:
    """Write ``root/train`` and ``root/val`` (scene_NNNNN.png with scene_NNNNN_mask.png beside it, class indices)
    and, when ``n_unlabeled`` > 0, ``root/unlabeled`` (images only, for self-supervised training); plus
    ``root/classes.json``. Returns that file's content."""
    counts = {"train": n_train, "val": n_val, "unlabeled": n_unlabeled}
    for split, n in counts.items():
        if n <= 0:
            continue
        folder = os.path.join(root, split)
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            rgb, mask = make_scene(seed, split, i, size)
            Image.fromarray(rgb).save(os.path.join(folder, f"scene_{i:05d}.png"))
            if split != "unlabeled":
                Image.fromarray(mask, mode="L").save(os.path.join(folder, f"scene_{i:05d}{MASK_SUFFIX}"))
    meta = {"classes": list(CLASSES), "seed": seed, "size": size, "counts": counts, "mask_suffix": MASK_SUFFIX}
    with open(os.path.join(root, "classes.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta
