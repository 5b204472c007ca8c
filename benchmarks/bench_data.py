"""Benchmark of the training input pipeline: images/s of dinov3.train.data's loader and of its BatchAugment.

    python benchmarks/bench_data.py [--quick] [--images 256] [--workers 8] [--out DIR]

On generated JPEG images (smooth random content, 480x360 like an average ImageNet photo), at the vits16 recipe crops
(batch 64, 2 x 256 px global + 8 x 112 px local crops, and 2 x 512 px Gram-teacher crops in the Gram phase):
  loader          the DataLoader as the trainer builds it (decode, multi-crop, collate, iBOT masks) with
                  train.num_workers workers (the recipe's 8, at most the machine's cores)
  loader+augment  the same, followed by BatchAugment on the training device (the whole input pipeline of a step)
  augment         BatchAugment alone on one collated batch (the device part)
The loader rows are wall-clock throughput over whole batches after the workers' prefetch queue has drained (a per-call
median would time the queue, not the workers). A training step that takes less than the loader+augment time per
batch is input-bound.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import common
from dinov3.train.config import load_config
from dinov3.train.data import BatchAugment, build_loader

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
    return records


def main():
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, default=GPU_CASE["images"], help="generated JPEG files")
    p.add_argument("--workers", type=int, default=GPU_CASE["workers"], help="loader workers (capped by the cores)")
    args = p.parse_args()
    settings = common.settings_from_args(args)
    case = dict(GPU_CASE if settings.gpu else CPU_CASE)
    if settings.gpu:
        case.update(images=args.images, workers=args.workers)
    records = run(settings, case)
    common.report("bench_data", records, common.environment(), args)


if __name__ == "__main__":
    main()
