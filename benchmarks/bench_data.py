"""Benchmark of the training input pipeline: images/s of dinov3.train.data's loader and of its BatchAugment.

    python benchmarks/bench_data.py [--quick] [--images 256] [--workers 8] [--rounds 7] [--photos DIR] [--out DIR]

On generated JPEG images (smooth random content, 480x360 like an average ImageNet photo), at the vits16 recipe crops
(batch 64, 2 x 256 px global + 8 x 112 px local crops, and 2 x 512 px Gram-teacher crops in the Gram phase):
  loader          the DataLoader as the trainer builds it (decode, multi-crop, collate, iBOT masks) with
                  train.num_workers workers (the recipe's 8, at most the machine's cores)
  loader+augment  the same, followed by BatchAugment on the training device (the whole input pipeline of a step)
  augment         BatchAugment alone on one collated batch (the device part)
The loader rows are wall-clock throughput over whole batches after the workers' prefetch queue has drained (a per-call
median would time the queue, not the workers). A training step that takes less than the loader+augment time per
batch is input-bound.

And one loader worker's images/s on photos (``per_worker``, the numbers in README, "Data loading"): the work per
image with the crops of the ViT recipes (2 x 256 px global, 8 x 112 px local, 2 x 512 px Gram-teacher crops in the
Gram phase, no flips) on scikit-image's bundled photos resized to a longer side of ~512 px and ~2048 px (JPEG quality
90; or your own with --photos DIR), before the Gram phase and during it, for three providers:
  reference       the official DINOv3 loader's operations (DataAugmentationDINO, torchvision v2 on PIL images):
                  full-resolution decode, RandomResizedCrop at max(global, Gram) size then resized to the global size,
                  colour jitter, grayscale, blur and solarize on the CPU, normalisation; Gram-teacher crops only in the
                  Gram phase (the official pretraining config has none, the Gram-anchor config builds them for every
                  image). Written here with the same PIL operations and torchvision's 9-tap blur on tensors, so that
                  torchvision is not needed.
  before          this project's loader before the Gram-teacher crops were limited to the Gram phase and before fast
                  decoding (full-resolution decode, Gram crops for every image): CropSpec(fast_decode=False).
  ours            the loader now (dinov3.train.data.load_multi_crop): Gram crops only in the Gram phase, JPEG draft
                  decoding and PIL box reduction where the crops keep REDUCING_GAP times their size, and at full
                  resolution every crop resampled by torch's antialiased uint8 bicubic (Pillow's filter, vectorised)
                  from one tensor of the image.
Our loaders leave the photometric augmentation to the training device (batched, BatchAugment), so "reference" does
more CPU work per image by design. The providers are timed side by side: each round runs one pass over the photos
with every provider in turn (one thread, one process), and the speed-up is the median over rounds of the per-round
ratio, so the load of a shared machine hits all alike.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance

import common
from dinov3.images import load_rgb
from dinov3.train.config import load_config
from dinov3.train.data import (BatchAugment, CropSpec, _gaussian_blur, build_loader, find_images, load_multi_crop,
                               multi_crop, random_resized_crop_box)

GPU_CASE = dict(recipe="vits16", batch=64, images=256, workers=8, timed_batches=8)
CPU_CASE = dict(recipe="tiny", batch=4, images=8, workers=0, timed_batches=2)


def write_jpegs(root: str, n: int, size=(480, 360), seed: int = 0) -> None:
    """n JPEG photos of smooth random content (low-frequency noise upsampled), so decoding costs what a photo does."""
    rng = np.random.default_rng(seed)
    W, H = size
    for i in range(n):
        low = (rng.random((H // 24 + 1, W // 24 + 1, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(low).resize((W, H), Image.BICUBIC)
        noise = rng.integers(-12, 13, (H, W, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        img.save(os.path.join(root, f"img{i:05d}.jpg"), format="JPEG", quality=90)


def _throughput(batches, n: int, per_batch=None):
    """Milliseconds of each of n batches drawn from the iterator (after per_batch, if given)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        batch = next(batches)
        if per_batch is not None:
            per_batch(batch)
        common.sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(settings: common.Settings, case=None) -> list:
    case = dict(case or (GPU_CASE if settings.gpu else CPU_CASE))
    if settings.quick:
        case["timed_batches"] = max(2, case["timed_batches"] // 2)
    workers = min(case["workers"], os.cpu_count() or 1)
    records = []
    with tempfile.TemporaryDirectory(prefix="dinov3-bench-data-") as root:
        write_jpegs(root, case["images"])
        for gram in (False, True):
            cfg = load_config(case["recipe"], [f"train.batch_size_per_gpu={case['batch']}",
                                               f"train.num_workers={workers}", f"gram.use_loss={gram}"]
                              + ([] if gram else ["crops.gram_teacher_crops_size=null"]))
            c = cfg["crops"]
            B = case["batch"]
            shape = (f"{case['recipe']} B={B} 2x{c['global_crops_size']}+{c['local_crops_number']}x"
                     f"{c['local_crops_size']}" + (f" gram {c['gram_teacher_crops_size']}px" if gram else ""))
            augment = BatchAugment(cfg, torch.device(settings.device))
            series = "Gram-phase crops" if gram else "pretraining crops"

            def record(backend, mode):
                return common.Record("data_loader", backend, shape, "uint8", mode, series=series, size=B,
                                     params=dict(recipe=case["recipe"], B=B, workers=workers, gram=gram))

            for backend in ("loader", "loader+augment"):
                rec = record(backend, "batch")
                if settings.deadline.expired():
                    records.append(common.skipped(rec))
                    continue
                try:
                    _, loader = build_loader(cfg, root=root, rank=0, world_size=1, start_iter=0, end_iter=None,
                                             pin_memory=settings.gpu)
                    batches = iter(loader)
                    per_batch = (lambda b: augment(b, iteration=0, rank=0)) if backend == "loader+augment" else None
                    t0 = time.perf_counter()
                    # Drain the start-up and the prefetch queue (2 batches per worker) before timing.
                    warm = _throughput(batches, 2 * max(1, workers) + 1, per_batch)
                    times = _throughput(batches, case["timed_batches"], per_batch)
                    del batches, loader
                except Exception as exc:  # noqa: BLE001 - report and go on
                    records.append(common.failed(rec, exc))
                    continue
                total = sum(times)
                rec.median_ms, rec.min_ms, rec.max_ms = total / len(times), min(times), max(times)
                rec.reps, rec.timer = len(times), "wall clock, whole batches"
                rec.compile_ms = max(0.0, (time.perf_counter() - t0) * 1e3 - total - len(warm) * rec.median_ms)
                rec.extra["images_per_s"] = B * len(times) / (total * 1e-3)
                rec.note = f"{rec.extra['images_per_s']:.0f} img/s, {workers} workers (median of batches: " \
                           f"{statistics.median(times):.1f} ms)"
                records.append(rec)
            # The device part alone, on one collated batch.
            rec = record("augment", "batch")
            try:
                _, loader = build_loader(cfg, root=root, rank=0, world_size=1, start_iter=0, end_iter=1)
                batch = next(iter(loader))
                del loader
            except Exception as exc:  # noqa: BLE001
                records.append(common.failed(rec, exc))
                continue
            common.measure(rec, lambda: augment(batch, iteration=0, rank=0), settings)
            if rec.median_ms:
                rec.extra["images_per_s"] = B / (rec.median_ms * 1e-3)
                rec.note = f"{rec.extra['images_per_s']:.0f} img/s"
            records.append(rec)
    return records + per_worker(settings)


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
PHOTO_SIZES = (512, 2048)
PHASES = ("before Gram phase", "Gram phase")


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
    times = {(p, m): [] for p in fns for m in PHASES}
    for p, fn in fns.items():  # warm-up: file cache, first-call costs
        fn(paths[0], 0, True)
    for r in range(rounds):
        for mode in PHASES:
            for p, fn in fns.items():
                t0 = time.perf_counter()
                for k in range(repeats):
                    for i, path in enumerate(paths):
                        fn(path, (r * repeats + k) * len(paths) + i, mode == "Gram phase")
                times[(p, mode)].append((time.perf_counter() - t0) / (repeats * len(paths)))
    return times


def per_worker(settings: common.Settings, *, rounds: int | None = None, photos: str | None = None) -> list:
    """One loader worker's per-image work on photos, ours / before / the official operations (see the docstring).
    Runs on the CPU whatever the device; settings.max_reps <= 5 (run_all's dry run) is a smoke run: 2 photos a
    size, 1 round."""
    smoke = settings.max_reps <= 5
    rounds = rounds or (1 if smoke else 3 if settings.quick else 7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one loader worker
    spec = CropSpec.from_config(load_config("vits16"))
    records = []
    try:
        with tempfile.TemporaryDirectory(prefix="dinov3-bench-photos-") as root:
            sets = ([(f"your photos ({photos})", find_images(photos))] if photos else
                    [(f"~{s} px JPEG photos", write_photos(os.path.join(root, f"photos_{s}"), s)) for s in PHOTO_SIZES])
            for label, paths in sets:
                if smoke or settings.quick:
                    paths = paths[:2 if smoke else 3]
                mp = statistics.mean(w * h for w, h in (Image.open(p).size for p in paths)) / 1e6
                shape = f"{label}, {len(paths)} x {mp:.2f} MP"
                if settings.deadline.expired():
                    records += [common.skipped(common.Record("data_loader", b, shape, "uint8", m))
                                for m in PHASES for b in ("reference", "before", "ours")]
                    continue
                times = measure_loader(paths, spec, rounds=rounds, repeats=1 if smoke or mp > 1 else 2)
                for mode in PHASES:
                    for provider in ("reference", "before", "ours"):
                        t = [v * 1e3 for v in times[(provider, mode)]]
                        rec = common.Record("data_loader", provider, shape, "uint8", mode, series=label,
                                            size=mp, params=dict(photos=len(paths), megapixels=mp))
                        rec.median_ms, rec.min_ms, rec.max_ms = statistics.median(t), min(t), max(t)
                        rec.reps, rec.compile_ms = len(t), 0.0
                        rec.timer = "wall clock per image, one process and thread (CPU)"
                        rec.extra["images_per_s"] = 1e3 / rec.median_ms
                        ratios = [b / o for b, o in zip(times[("before", mode)], times[(provider, mode)])]
                        rec.extra["speedup_vs_before_per_round"] = statistics.median(ratios)
                        rec.note = f"{1e3 / rec.median_ms:.1f} img/s, {statistics.median(ratios):.2f}x before"
                        records.append(rec)
    finally:
        torch.set_num_threads(threads)
    return records


def main():
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, default=GPU_CASE["images"], help="generated JPEG files")
    p.add_argument("--workers", type=int, default=GPU_CASE["workers"], help="loader workers (capped by the cores)")
    p.add_argument("--rounds", type=int, default=None, help="per-worker rounds (default 7, 3 with --quick)")
    p.add_argument("--photos", default=None, help="a folder of your own photos for the per-worker rows")
    p.add_argument("--per-worker-only", action="store_true", help="only the per-worker rows (README's numbers)")
    args = p.parse_args()
    settings = common.settings_from_args(args)
    case = dict(GPU_CASE if settings.gpu else CPU_CASE)
    if settings.gpu:
        case.update(images=args.images, workers=args.workers)
    if args.per_worker_only:
        records = per_worker(settings, rounds=args.rounds, photos=args.photos)
    else:
        records = run(settings, case)
    common.report("bench_data", records, common.environment(), args)
    for r in records:
        if r.op == "data_loader" and r.backend == "ours" and "speedup_vs_before_per_round" in r.extra and r.median_ms:
            print(f"ours vs before, {r.mode}, {r.shape}: {r.extra['speedup_vs_before_per_round']:.2f}x")


if __name__ == "__main__":
    main()
