"""Demo: does the Gram phase help dense features? The `tiny` recipe trained on generated scenes with and without
Gram anchoring, for the same number of iterations, and a randomly initialised backbone, scored by the linear
segmentation probe of `dinov3-eval seg` (mIoU on held-out scenes).

    python benchmarks/demo_seg.py --iterations 2000 --threads 1

The scenes (dinov3/eval/scenes.py, seed 0): textured objects of 5 classes on textured ground, 64 px. Pretraining sees
only the unlabelled split; the probe is fitted on the labelled train split and scored on the val split at 64 px.
Writes WORKDIR/result.json; each run's folder has its metrics, probe maps and (with matplotlib) `dinov3-plot` output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dinov3.eval.cli import main as eval_main  # noqa: E402
from dinov3.eval.scenes import write_scenes  # noqa: E402
from dinov3.train.checkpoint import atomic_save  # noqa: E402
from dinov3.train.config import backbone_kwargs, load_config  # noqa: E402
from dinov3.train.ssl_arch import SSLMetaArch  # noqa: E402
from dinov3.train.trainer import TrainingStopped, train  # noqa: E402


def seg_miou(checkpoint: str, scenes: str, size: int, out_json: str, steps: int) -> dict:
    code = eval_main(["seg", "--checkpoint", checkpoint, "--train", os.path.join(scenes, "train"),
                      "--val", os.path.join(scenes, "val"), "--size", str(size), "--steps", str(steps),
                      "--device", "cpu", "--output", out_json])
    if code != 0:
        raise SystemExit(f"dinov3-eval seg failed on {checkpoint}")
    with open(out_json) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo_seg")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--gram-start", type=float, default=0.75, help="Gram phase start, as a fraction of --iterations")
    p.add_argument("--unlabeled", type=int, default=2000, help="scenes to pretrain on")
    p.add_argument("--size", type=int, default=64, help="scene side in pixels (also the probe's input size)")
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace the runs left in WORKDIR by an earlier demo")
    p.add_argument("overrides", nargs="*", help="extra config overrides for both runs (key=value)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scenes = os.path.join(args.workdir, "scenes")
    write_scenes(scenes, seed=0, n_train=300, n_val=150, n_unlabeled=args.unlabeled, size=args.size)
    n = args.iterations
    common = [f"train.iterations={n}", "train.progress_bar=false", "train.log_every=25",
              f"train.probe_every={max(n // 10, 1)}", f"checkpointing.period={max(n // 4, 1)}"] + args.overrides
    variants = {"no_gram": common + ["gram.use_loss=false"],
                "gram": common + ["gram.use_loss=true", f"gram.start_iter={int(n * args.gram_start)}"]}

    # The trainer's initial weights: same seed, same construction.
    cfg = load_config("tiny", variants["gram"])
    torch.manual_seed(cfg["train"]["seed"])
    random_dir = os.path.join(args.workdir, "random_init")
    os.makedirs(random_dir, exist_ok=True)
    atomic_save(SSLMetaArch(cfg).teacher.backbone.state_dict(), os.path.join(random_dir, "backbone.pth"))
    with open(os.path.join(random_dir, "backbone.json"), "w") as f:
        json.dump(backbone_kwargs(cfg), f, indent=2)
    results = {"random_init": seg_miou(os.path.join(random_dir, "backbone.pth"), scenes, args.size,
                                       os.path.join(random_dir, "seg.json"), args.probe_steps)}
    minutes = {}
    for name, overrides in variants.items():
        out = os.path.join(args.workdir, name)
        t0 = time.time()
        train(load_config("tiny", overrides), data_dir=os.path.join(scenes, "unlabeled"), output_dir=out,
              overwrite=args.overwrite)
        minutes[name] = round((time.time() - t0) / 60, 2)
        results[name] = seg_miou(os.path.join(out, "backbone.pth"), scenes, args.size, os.path.join(out, "seg.json"),
                                 args.probe_steps)
        try:
            from dinov3.cli.plot import make_plots
            from pathlib import Path

            make_plots(Path(out), Path(out) / "plots")
        except Exception as exc:  # noqa: BLE001 - the plots are a convenience (matplotlib may be missing)
            print(f"no plots for {out}: {exc}")
    summary = {
        "scenes": f"dinov3/eval/scenes.py seed 0: {args.unlabeled} unlabelled (pretraining), 300 train / 150 val "
                  f"labelled, {args.size} px",
        "iterations": n, "gram_start_iter": int(n * args.gram_start), "threads": torch.get_num_threads(),
        "train_minutes": minutes, "probe_steps": args.probe_steps,
        "miou": {k: round(v["miou"], 4) for k, v in results.items()},
        "pixel_accuracy": {k: round(v["pixel_accuracy"], 4) for k, v in results.items()},
        "per_class_iou": {k: [round(x, 4) for x in v["per_class_iou"]] for k, v in results.items()},
        "classes": results["random_init"]["classes"], "overrides": variants,
    }
    print(json.dumps(summary, indent=2))
    with open(os.path.join(args.workdir, "result.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    try:
        main()
    except TrainingStopped as exc:  # Ctrl-C / SIGTERM: the run's checkpoint is written; say so, no traceback
        sys.exit(f"demo_seg.py: {exc}")
