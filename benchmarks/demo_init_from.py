"""Demo: continue self-supervised training from a trained backbone (``dinov3-train --init-from``), on the same images
and on another image distribution, with and without the head warm-up; kNN accuracy along the way.

    pip install scikit-learn
    python benchmarks/demo_init_from.py --iterations 600 --threads 1

1. Pretrain `tiny` on scikit-learn's digits as benchmarks/demo_digits.py does (or take --pretrained BACKBONE.pth):
   backbone A, kNN accuracy a.
2. From A, train `tiny` again for as many iterations with fresh heads, once per image domain and variant:
   - domains: "digits" (the same images) and "textured" (the same digits as dark ink on a light colour gradient
     with faint stripes and noise, half of them inverted: another image distribution, generated here); on request
     "textured-upright" (the same, none inverted: dark ink on light, the opposite of the digits' polarity),
     "textured-light" (the same, all inverted: light ink on a dark textured background, the digits' polarity) and
     "coloured" (light ink of a random colour on a dark background of another: a colour shift only);
   - variants: "warm-up" (the defaults with pretrained weights: head warm-up with the backbone frozen, 180
     iterations in tiny), "no warm-up" (train.head_warmup_iters=0) and, on request, "warm-up 100"
     (train.head_warmup_iters=100), "warm-up + ramp" / "ramp 420" (then the backbone lr ramps up over 100 / 420
     iterations), "warm-up + anchor N" (train.pretrained_anchor=N), "warm-up + feature anchor N"
     (train.feature_anchor=N), "warm-up + Gram anchor" (Gram loss against A
     from iteration 0), a higher teacher momentum, a stronger layer-wise lr decay, no KoLeo (see VARIANTS).
3. kNN (weighted 20-NN on CLS features of the EMA teacher; train split -> test split of each domain) at the start
   (= A), at every checkpoint and at the end.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo_digits import probe, write_digits  # noqa: E402

from dinov3.models import DinoVisionTransformer  # noqa: E402
from dinov3.train.checkpoint import list_checkpoints  # noqa: E402
from dinov3.train.config import load_config  # noqa: E402
from dinov3.train.pretrained import read_pretrained  # noqa: E402
from dinov3.train.trainer import TrainingStopped, train  # noqa: E402

VARIANTS = {"warm-up": [], "no warm-up": ["train.head_warmup_iters=0"],
            "warm-up 100": ["train.head_warmup_iters=100"],
            "warm-up + ramp": ["train.backbone_lr_ramp_iters=100"],
            "warm-up + ramp 420": ["train.backbone_lr_ramp_iters=420"],
            "warm-up + anchor 30": ["train.pretrained_anchor=30"],
            "warm-up + anchor 100": ["train.pretrained_anchor=100"],
            "warm-up + anchor 300": ["train.pretrained_anchor=300"],
            # The feature-space anchor (CaSSLe-style predictor toward A's tokens).
            "warm-up + feature anchor 1": ["train.feature_anchor=1"],
            "warm-up + feature anchor 3": ["train.feature_anchor=3"],
            "warm-up + feature anchor 10": ["train.feature_anchor=10"],
            "warm-up + feature anchor 20": ["train.feature_anchor=20"],
            # The Gram loss from iteration 0 against backbone A (not refreshed from the EMA teacher).
            "warm-up + Gram anchor": ["gram.ckpt={pretrained}", "gram.start_iter=0", "gram.rep_update=false"],
            "warm-up + momentum 0.995": ["schedules.momentum.start=0.995", "schedules.momentum.peak=0.995",
                                         "schedules.momentum.end=0.995", "train.head_warmup_iters=180"],
            "warm-up + layer decay 0.5": ["optim.layerwise_decay=0.5"],
            "warm-up + layer decay 0.2": ["optim.layerwise_decay=0.2"],
            "warm-up, no KoLeo": ["dino.koleo_loss_weight=0"]}


def texturize(arrays: dict, seed: int = 1, invert: float = 0.5) -> dict:
    """The digits as dark ink on a light background with a colour gradient, faint stripes and pixel noise (a fraction
    `invert` of them inverted: light on dark), in random colours: another image distribution, still legible."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, imgs in arrays.items():
        n, h, w, _ = imgs.shape
        y, x = np.mgrid[0:h, 0:w].astype(np.float32) / (h - 1)
        res = []
        for img in imgs:
            alpha = img[..., :1].astype(np.float32) / 255
            light = rng.uniform(150, 255, (2, 3))  # gradient end colours
            ink = rng.uniform(0, 100, 3)
            angle = rng.uniform(0, 2 * np.pi)
            t = (x * np.cos(angle) + y * np.sin(angle))[..., None]
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
            bg = light[0] * t + light[1] * (1 - t)
            bg = bg + 15 * np.sin(2 * np.pi * (x + y) * h / rng.uniform(4, 8))[..., None]
            im = bg * (1 - alpha) + ink * alpha + rng.normal(0, 8, (h, w, 3))
            if rng.random() < invert:
                im = 255 - im
            res.append(np.clip(im, 0, 255).astype(np.uint8))
        out[split] = np.stack(res)
    return out


def colourize(arrays: dict, seed: int = 2) -> dict:
    """The digits in colour, with their own polarity and nothing else added: light ink of a random colour on a dark
    background of another random colour (both drawn per image; ink at least 120 levels brighter than the background in
    its mean over R, G, B). A colour shift only."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, imgs in arrays.items():
        res = []
        for img in imgs:
            alpha = img[..., :1].astype(np.float32) / 255
            bg = rng.uniform(0, 110, 3)
            ink = rng.uniform(0, 255, 3)
            ink = ink + max(0.0, 120 + bg.mean() - ink.mean())  # at least 120 levels above the background on average
            im = bg * (1 - alpha) + np.clip(ink, 0, 255) * alpha
            res.append(np.clip(np.rint(im), 0, 255).astype(np.uint8))
        out[split] = np.stack(res)
    return out


def save_split(root: str, arrays: np.ndarray) -> str:
    os.makedirs(root, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(os.path.join(root, f"{i:05d}.png"))
    return root


# Image domains. The digits are light ink on black; "textured" inverts half of its images (dark ink on light),
# "textured-upright" all of them (the texture's own polarity: the opposite of the digits'), "textured-light" none
# (light ink on a dark textured background: the digits' polarity); "coloured" changes the colours only.
DOMAINS = {"digits": lambda a: a, "textured": texturize,
           "textured-upright": lambda a: texturize(a, invert=0.0),
           "textured-light": lambda a: texturize(a, invert=1.0),
           "coloured": colourize}


def load_backbone(path: str) -> DinoVisionTransformer:
    weights = read_pretrained(path)
    model = DinoVisionTransformer(**weights.model_kwargs)
    model.load_state_dict(weights.state_dict)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo_init_from")
    p.add_argument("--iterations", type=int, default=600, help="of the pretraining and of each continuation")
    p.add_argument("--pretrained", default=None, help="backbone A (a backbone.pth of `tiny`); default: train it")
    p.add_argument("--domains", nargs="+", default=["digits", "textured"], choices=list(DOMAINS))
    p.add_argument("--variants", nargs="+", default=["warm-up", "no warm-up"], choices=list(VARIANTS))
    p.add_argument("--probes", type=int, default=6, help="checkpoints (kNN points) per continuation")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="extra config overrides for the continuations (key=value)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.iterations
    arrays, labels = write_digits(os.path.join(args.workdir, "digits"), 32)
    # The digits always (the old domain), the default textured domain, and whatever else was asked for.
    domains = {d: DOMAINS[d](arrays) for d in DOMAINS if d in ("digits", "textured") or d in args.domains}
    for name in domains:
        if name != "digits":
            save_split(os.path.join(args.workdir, name, "train"), domains[name]["train"])
    base = [f"train.iterations={n}", "train.progress_bar=false", "train.log_every=50",
            f"gram.start_iter={int(n * 0.75)}"]
    cfg = load_config("tiny", base)

    def knn(model):
        return {d: round(100 * probe(model, domains[d], labels, cfg, args.k), 1) for d in domains}

    pretrained = args.pretrained
    if pretrained is None:
        out = os.path.join(args.workdir, "A")
        train(cfg, data_dir=os.path.join(args.workdir, "digits", "train"), output_dir=out, overwrite=True)
        pretrained = os.path.join(out, "backbone.pth")
    start = knn(load_backbone(pretrained))
    print(f"backbone A ({pretrained}): kNN {start}", flush=True)
    results = {"iterations": n, "pretrained": pretrained, "knn_A": start, "runs": []}
    for domain in args.domains:
        for variant in args.variants:
            out = os.path.join(args.workdir, f"{domain}_{variant.replace(' ', '_').replace(',', '')}")
            overrides = base + [f"checkpointing.period={max(n // args.probes, 1)}", "checkpointing.max_to_keep=0",
                                f"student.pretrained_weights={json.dumps(os.path.abspath(pretrained))}",
                                *[o.format(pretrained=json.dumps(os.path.abspath(pretrained)))
                                  for o in VARIANTS[variant]],
                                *args.overrides]
            run_cfg = load_config("tiny", overrides)
            t0 = time.time()
            train(run_cfg, data_dir=os.path.join(args.workdir, domain, "train"), output_dir=out, overwrite=True)
            minutes = (time.time() - t0) / 60
            points = [{"iteration": 0, **start}]
            for it, ckpt in list_checkpoints(os.path.join(out, "checkpoints")):
                points.append({"iteration": it, **knn(load_backbone(ckpt))})
            row = {"domain": domain, "variant": variant, "train_minutes": round(minutes, 2), "knn": points,
                   "overrides": overrides}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    for r in results["runs"]:
        for d in domains:
            seq = " ".join(f"{pt[d]:5.1f}" for pt in r["knn"])
            low = min(pt[d] for pt in r["knn"])
            print(f"trained on {r['domain']:8s} {r['variant']:16s} kNN on {d:8s}: {seq}   (min {low:.1f})")
    with open(os.path.join(args.workdir, f"result_{'_'.join(args.domains)}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    try:
        main()
    except TrainingStopped as exc:  # Ctrl-C / SIGTERM: the run's checkpoint is written; say so, no traceback
        sys.exit(f"demo_init_from.py: {exc}")
