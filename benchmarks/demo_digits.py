"""Demo: train the `tiny` DINOv3 recipe on scikit-learn's digits for a few CPU minutes, then compare a kNN probe on
the CLS features of the trained EMA-teacher backbone with the same probe on the randomly initialised backbone.

    pip install scikit-learn
    python benchmarks/demo_digits.py --iterations 600

The 8x8 digits are upsampled (bicubic) to 32 px RGB PNGs; the self-supervised run sees only the training split's
images, never a label. The probe: weighted 20-NN on L2-normalised CLS tokens, train split -> test split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dinov3.eval.knn import extract_cls_features, knn_accuracy  # noqa: E402
from dinov3.models import DinoVisionTransformer  # noqa: E402
from dinov3.train.config import backbone_kwargs, load_config  # noqa: E402
from dinov3.train.ssl_arch import SSLMetaArch  # noqa: E402
from dinov3.train.trainer import TrainingStopped, train  # noqa: E402


def write_digits(root: str, size: int, seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    n_train = int(0.7 * len(order))
    splits = {"train": order[:n_train], "test": order[n_train:]}
    arrays, labels = {}, {}
    for split, idx in splits.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        imgs = []
        for i in idx:
            a = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            img = Image.fromarray(a, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            img.save(os.path.join(root, split, f"{i:05d}.png"))
            imgs.append(np.asarray(img))
        arrays[split] = np.stack(imgs)
        labels[split] = torch.as_tensor(digits.target[idx])
    return arrays, labels


def to_input(arr: np.ndarray, cfg: dict) -> torch.Tensor:
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(cfg["crops"]["rgb_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["crops"]["rgb_std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def probe(model, arrays, labels, cfg, k):
    tr = extract_cls_features(model, to_input(arrays["train"], cfg))
    te = extract_cls_features(model, to_input(arrays["test"], cfg))
    return knn_accuracy(tr, labels["train"], te, labels["test"], k=k)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo_digits")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--size", type=int, default=32, help="image side after upsampling (= tiny's global crop size)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace the run left in WORKDIR/run by an earlier demo")
    p.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = os.path.join(args.workdir, "images")
    arrays, labels = write_digits(data, args.size)
    overrides = [f"train.iterations={args.iterations}", "train.progress_bar=false", "train.log_every=25",
                 f"gram.start_iter={int(args.iterations * 0.75)}", f"crops.global_crops_size={args.size}",
                 f"checkpointing.period={max(args.iterations // 4, 1)}"] + args.overrides
    cfg = load_config("tiny", overrides)

    torch.manual_seed(cfg["train"]["seed"])  # the trainer's initial weights: same seed, same construction
    random_backbone = SSLMetaArch(cfg).teacher.backbone
    acc_random = probe(random_backbone, arrays, labels, cfg, args.k)
    print(f"kNN (k={args.k}) on random-init backbone: {acc_random:.4f}", flush=True)

    out = os.path.join(args.workdir, "run")
    t0 = time.time()
    train(cfg, data_dir=os.path.join(data, "train"), output_dir=out, overwrite=args.overwrite)
    minutes = (time.time() - t0) / 60
    with open(os.path.join(out, "backbone.json")) as f:
        model = DinoVisionTransformer(**json.load(f))
    model.load_state_dict(torch.load(os.path.join(out, "backbone.pth"), weights_only=True))
    acc_trained = probe(model, arrays, labels, cfg, args.k)
    result = {"dataset": "sklearn digits (8x8 -> %d px RGB), 70/30 split" % args.size,
              "n_train": int(len(labels["train"])), "n_test": int(len(labels["test"])),
              "iterations": args.iterations, "train_minutes": round(minutes, 2),
              "threads": torch.get_num_threads(), "k": args.k, "knn_random_init": acc_random,
              "knn_trained": acc_trained, "backbone_kwargs": backbone_kwargs(cfg), "overrides": overrides}
    print(json.dumps(result, indent=2))
    with open(os.path.join(args.workdir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    try:
        main()
    except TrainingStopped as exc:  # Ctrl-C / SIGTERM: the run's checkpoint is written; say so, no traceback
        sys.exit(f"demo_digits.py: {exc}")
