"""Benchmark of the data loader's per-image work: images/s of one loader worker building the multi-crop views.

    python benchmarks/bench_data.py [--quick] [--rounds N] [--images DIR] [--out DIR]

What one worker does per image, with the crops of the ViT recipes (vits16/vitb16/vitl16: 2 global crops at 256 px,
8 local crops at 112 px, Gram-teacher crops at 512 px from the Gram phase on, no flips), on JPEG photos of two sizes
(scikit-image's bundled photos resized to a longer side of ~512 px and of ~2048 px, quality 90; or your own with
--images). Providers, each measured before the Gram phase (no Gram-teacher crops needed) and during it:

- "reference": the official DINOv3 loader's operations (DataAugmentationDINO, torchvision v2 on PIL images):
  full-resolution decode, RandomResizedCrop at max(global, Gram) size then resized to the global size, colour jitter,
  grayscale, blur and solarize on the CPU, float conversion and normalisation; Gram-teacher crops only in the Gram
  phase (the official pretraining config has none, the Gram-anchor config builds them for every image). Written
  here with the same PIL operations and a separable 9-tap blur as torchvision does, so that torchvision is not needed.
- "before": this project's loader before it built Gram-teacher crops only in the Gram phase and before fast decoding
  (full-resolution decode, Gram crops for every image): ``CropSpec(fast_decode=False)`` with ``gram=True``.
- "ours": the loader now (``dinov3.train.data.load_multi_crop``): Gram crops only in the Gram phase, JPEG draft
  decoding and PIL box reduction where the crops keep REDUCING_GAP times their size (see dinov3/train/data.py).

Our loaders leave the photometric augmentation to the training device (batched, BatchAugment), so "reference" does
more CPU work per image by design; "ours" vs "before" is the loader speed-up. The providers are timed side by side:
each round runs one pass over the photos with every provider in turn (one thread, one process: one loader worker),
and the speed-up is the median over rounds of the per-round ratio, so load on a shared machine hits all alike.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance

import common

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dinov3.images import load_rgb  # noqa: E402
from dinov3.train.config import load_config  # noqa: E402
from dinov3.train.data import (CropSpec, _gaussian_blur, find_images, load_multi_crop, multi_crop,  # noqa: E402
                               random_resized_crop_box)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
SIZES = (512, 2048)
MODES = ("before Gram phase", "Gram phase")


def write_photos(root: str, longer_side: int) -> list[str]:
    """scikit-image's bundled colour photos resized (bicubic) to ``longer_side`` and saved as JPEG (quality 90); random
    smooth images when scikit-image is not installed."""
    os.makedirs(root, exist_ok=True)
    try:
        from skimage import data

        arrays = [(name, getattr(data, name)()) for name in PHOTOS]
    except ImportError:
        rng = np.random.default_rng(0)
        arrays = [(f"synthetic{i}", np.asarray(Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8))
                                               .resize((640, 480), Image.BICUBIC))) for i in range(len(PHOTOS))]
    paths = []
    for name, a in arrays:
        img = Image.fromarray(a[..., :3])
        s = longer_side / max(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
        path = os.path.join(root, f"{name}_{longer_side}.jpg")
        img.save(path, quality=90)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------ the official loader's operations
_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
_STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


def _official_color(img: Image.Image, rng: random.Random) -> Image.Image:
    # RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8) then RandomGrayscale(0.2), as torchvision on PIL images.
    if rng.random() < 0.8:
        ops = [lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4)),
               lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 1.4)),
               lambda im: ImageEnhance.Color(im).enhance(rng.uniform(0.8, 1.2)),
               lambda im: _hue(im, rng.uniform(-0.1, 0.1))]
        rng.shuffle(ops)
        for op in ops:
            img = op(img)
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    return img


def _hue(img: Image.Image, shift: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    h = Image.fromarray((np.asarray(h, dtype=np.uint8) + np.uint8(int(shift * 255) % 256)).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _official_finish(img: Image.Image, rng: random.Random, blur_p: float, solarize_p: float) -> torch.Tensor:
    # GaussianBlur (kernel 9, sigma U(0.1, 2); torchvision blurs PIL images as tensors), RandomSolarize(128),
    # ToImage + ToDtype(float32, scale=True) + Normalize.
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    if rng.random() < blur_p:
        x = _gaussian_blur(x[None], torch.tensor([rng.uniform(0.1, 2.0)]))[0]
    if rng.random() < solarize_p:
        x = torch.where(x >= 128 / 255, 1 - x, x)
    return (x - _MEAN) / _STD


def official_multi_crop(path: str, spec: CropSpec, rng: random.Random, *, gram: bool) -> dict:
    """DataAugmentationDINO's work for one image (effective blur probabilities 0 / 0.9 / 0.5)."""
    img = load_rgb(path)
    gram_size = spec.gram_size if gram else None
    big = max(spec.global_size, gram_size or 0)
    out = {"global": [], "local": [], "gram": []}
    for i in range(2):
        left, top, w, h = random_resized_crop_box(*img.size, spec.global_scale, rng)
        base = img.resize((big, big), Image.BICUBIC, box=(left, top, left + w, top + h))
        if spec.horizontal_flips and rng.random() < 0.5:
            base = base.transpose(Image.FLIP_LEFT_RIGHT)
        crop = base if big == spec.global_size else base.resize((spec.global_size,) * 2, Image.BICUBIC)
        out["global"].append(_official_finish(_official_color(crop, rng), rng, (0.0, 0.9)[i], (0.0, 0.2)[i]))
        if gram_size:
            out["gram"].append(_official_finish(base, rng, 0.0, 0.0))  # gram_teacher_no_distortions: normalise only
    for _ in range(spec.n_local):
        left, top, w, h = random_resized_crop_box(*img.size, spec.local_scale, rng)
        crop = img.resize((spec.local_size,) * 2, Image.BICUBIC, box=(left, top, left + w, top + h))
        if spec.horizontal_flips and rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out["local"].append(_official_finish(_official_color(crop, rng), rng, 0.5, 0.0))
    return out


# ---------------------------------------------------------------------------------------------------- providers
def providers(spec: CropSpec) -> dict:
    """provider -> fn(path, seed, gram_phase) building one image's crops."""
    before = CropSpec(**{**spec.__dict__, "fast_decode": False})
    return {
        "reference": lambda path, seed, gram: official_multi_crop(path, spec, random.Random(seed), gram=gram),
        "before": lambda path, seed, gram: multi_crop(load_rgb(path), before, random.Random(seed), gram=True),
        "ours": lambda path, seed, gram: load_multi_crop(path, spec, random.Random(seed), gram=gram),
    }


def measure_loader(paths: list[str], spec: CropSpec, *, rounds: int, repeats: int = 1) -> dict:
    """{(provider, mode): [seconds per image, one per round]}; providers and modes interleaved within each round."""
    fns = providers(spec)
    times = {(p, m): [] for p in fns for m in MODES}
    for p, fn in fns.items():  # warm-up: file cache, first-call costs
        fn(paths[0], 0, True)
    for r in range(rounds):
        for mode in MODES:
            for p, fn in fns.items():
                t0 = time.perf_counter()
                for k in range(repeats):
                    for i, path in enumerate(paths):
                        fn(path, (r * repeats + k) * len(paths) + i, mode == "Gram phase")
                times[(p, mode)].append((time.perf_counter() - t0) / (repeats * len(paths)))
    return times


def bench(*, quick: bool = False, rounds: int | None = None, images: str | None = None,
          workdir: str | None = None) -> list[common.Row]:
    """The benchmark's rows (one per image size, provider and phase), for this script and benchmarks/run_all.py."""
    torch.set_num_threads(1)  # one loader worker
    cfg = load_config("vits16")
    spec = CropSpec.from_config(cfg)
    rounds = rounds or (3 if quick else 7)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = workdir or tmp
        sets = ([(f"your images ({images})", find_images(images))] if images else
                [(f"~{s} px JPEG photos", write_photos(os.path.join(root, f"photos_{s}"), s)) for s in SIZES])
        for label, paths in sets:
            if quick:
                paths = paths[:3]
            sizes = [Image.open(p).size for p in paths]
            mp = statistics.mean(w * h for w, h in sizes) / 1e6
            shape = f"{label}, {len(paths)} x {mp:.2f} MP"
            times = measure_loader(paths, spec, rounds=rounds, repeats=1 if quick or mp > 1 else 2)
            for mode in MODES:
                for provider in ("reference", "before", "ours"):
                    t = times[(provider, mode)]
                    ms = statistics.median(t) * 1e3
                    row = common.Row("multi-crop loader", shape, "uint8", provider, mode, ms=ms)
                    row.extra["images_per_s"] = 1e3 / ms
                    row.extra["images_per_s_per_round"] = [1 / v for v in t]
                    ratios = [b / o for b, o in zip(times[("before", mode)], t)]
                    row.extra["speedup_vs_before"] = statistics.median(ratios)
                    row.note = f"{1e3 / ms:.1f} img/s, {row.extra['speedup_vs_before']:.2f}x before"
                    rows.append(row)
                    print(f"{shape:40s} {mode:17s} {provider:9s} {1e3 / ms:7.1f} img/s", flush=True)
    return rows


def main():
    p = common.parser(__doc__)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, 3 with --quick)")
    p.add_argument("--images", default=None, help="a folder of your own images instead of the generated photos")
    args = p.parse_args()
    env = common.environment()
    rows = bench(quick=args.quick, rounds=args.rounds, images=args.images)
    print("Loader work runs on the CPU: the table below is a CPU measurement whatever the banner says about GPUs; "
          "'speedup vs reference' compares with the official loader's operations, the notes with 'before'.")
    common.report("bench_data", rows, env, args)
    for mode in MODES:
        for r in rows:
            if r.provider == "ours" and r.mode == mode:
                print(f"ours vs before, {mode}, {r.shape}: {r.extra['speedup_vs_before']:.2f}x")


if __name__ == "__main__":
    main()
