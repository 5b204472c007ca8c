"""Demo: the high-resolution adaptation stage at tiny scale. A `tiny` backbone pretrained at 32 px crops, then the
`tiny-highres` stage (global crops 64/96 px, Gram teacher 96/144 px) from its last checkpoint; scored before and after
at 1x and 2x input resolution:

- kNN (weighted 20-NN on CLS tokens, as benchmarks/demo_digits.py) on scikit-learn's digits at 32 px and 64 px;
- the linear patch probe of `dinov3-eval seg` (mIoU, as benchmarks/demo_seg.py) on the seeded scenes of
  dinov3/eval/scenes.py, drawn at 128 px, probed at 64 px and 128 px.

A control continues the same pretrained checkpoint with the same stage at the pretraining resolution (32 px global,
16 px local, 48 px Gram crops), so that what the higher resolution does is told apart from what more training does.

    nice -n 10 python benchmarks/demo_highres.py --threads 1

Writes WORKDIR/result.json (copied to benchmarks/results/demo_highres_cpu.json for the README).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_digits import probe as knn_probe  # noqa: E402
from demo_digits import write_digits  # noqa: E402
from demo_seg import seg_miou  # noqa: E402

from dinov3.eval.scenes import write_scenes  # noqa: E402
from dinov3.models import DinoVisionTransformer  # noqa: E402
from dinov3.train.checkpoint import list_checkpoints  # noqa: E402
from dinov3.train.config import load_config  # noqa: E402
from dinov3.train.trainer import TrainingStopped, train  # noqa: E402

# The control: the stage's schedule, losses and batch at the pretraining resolution of `tiny`.
SAME_RES = ["crops.global_crops_size=32", "crops.local_crops_size=16", "crops.gram_teacher_crops_size=48",
            "crops.global_local_crop_pairs_ratios=null"]


def load_backbone(run: str) -> torch.nn.Module:
    with open(os.path.join(run, "backbone.json")) as f:
        model = DinoVisionTransformer(**json.load(f))
    model.load_state_dict(torch.load(os.path.join(run, "backbone.pth"), weights_only=True))
    return model.eval()


def run_stage(name: str, data: str, workdir: str, recipe: str, overrides: list[str],
              overwrite: bool) -> tuple[str, float]:
    out = os.path.join(workdir, name)
    t0 = time.time()
    train(load_config(recipe, overrides), data_dir=data, output_dir=out, overwrite=overwrite)
    return out, round((time.time() - t0) / 60, 2)


def last_checkpoint(run: str) -> str:
    return list_checkpoints(os.path.join(run, "checkpoints"))[-1][1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo_highres")
    p.add_argument("--digits-iterations", type=int, default=600, help="pretraining on the digits (demo_digits)")
    p.add_argument("--scenes-iterations", type=int, default=2000, help="pretraining on the scenes (demo_seg)")
    p.add_argument("--hr-iterations", type=int, default=None, help="the stage's length (default: the recipe's)")
    p.add_argument("--unlabeled", type=int, default=2000, help="scenes to pretrain on")
    p.add_argument("--scene-size", type=int, default=128, help="side of the drawn scenes (2x probe resolution)")
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace the runs left in WORKDIR by an earlier demo")
    p.add_argument("--pretrained-from", default=None, metavar="DIR",
                   help="take the data and the two pretraining runs from an earlier demo's WORKDIR (e.g. to measure "
                        "another --hr-iterations) instead of making them")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    common = ["train.progress_bar=false", "train.log_every=25"]
    hr = common + ([f"train.iterations={args.hr_iterations}"] if args.hr_iterations else [])

    def pretrain(n):  # as demo_digits.py / demo_seg.py: the Gram phase in the last quarter
        return common + [f"train.iterations={n}", f"gram.start_iter={int(n * 0.75)}",
                         f"checkpointing.period={max(n // 4, 1)}"]
    result: dict = {"date": datetime.date.today().isoformat(), "device": "cpu", "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "train_minutes": {}}
    try:
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        result["commit"] = None

    # ---- digits: kNN on CLS tokens at 32 px (1x) and 64 px (2x)
    dig = os.path.join(args.workdir, "digits")
    src = os.path.join(args.pretrained_from or args.workdir, "digits")
    arrays = {s: write_digits(os.path.join(src, f"images_{s}"), s) for s in (32, 64)}
    n = args.digits_iterations
    if args.pretrained_from:
        pre = os.path.join(src, "digits_pretrain")
    else:
        pre, result["train_minutes"]["digits_pretrain"] = run_stage(
            "digits_pretrain", os.path.join(dig, "images_32", "train"), dig, "tiny", pretrain(n), args.overwrite)
    runs = {"pretrained": pre}
    for name, extra in (("highres", []), ("same_res", SAME_RES)):
        runs[name], result["train_minutes"][f"digits_{name}"] = run_stage(
            f"digits_{name}", os.path.join(src, "images_32", "train"), dig, "tiny-highres",
            hr + [f"student.pretrained_weights={json.dumps(last_checkpoint(pre))}"] + extra, args.overwrite)
    cfg = load_config("tiny")
    result["knn"] = {}
    for name, run in runs.items():
        model = load_backbone(run)
        result["knn"][name] = {f"{s}px": round(knn_probe(model, arr, labels, cfg, args.k), 4)
                               for s, (arr, labels) in arrays.items()}
        print(f"digits kNN {name}: {result['knn'][name]}", flush=True)

    # ---- scenes: linear patch probe (mIoU) at 64 px (1x) and 128 px (2x)
    scenes = os.path.join(args.workdir, "scenes")
    data = os.path.join(args.pretrained_from or args.workdir, "scenes", "data")
    n = args.scenes_iterations
    if args.pretrained_from:
        pre = os.path.join(args.pretrained_from, "scenes", "scenes_pretrain")
    else:
        write_scenes(data, seed=0, n_train=300, n_val=150, n_unlabeled=args.unlabeled, size=args.scene_size)
        pre, result["train_minutes"]["scenes_pretrain"] = run_stage(
            "scenes_pretrain", os.path.join(data, "unlabeled"), scenes, "tiny", pretrain(n), args.overwrite)
    runs = {"pretrained": pre}
    for name, extra in (("highres", []), ("same_res", SAME_RES)):
        runs[name], result["train_minutes"][f"scenes_{name}"] = run_stage(
            f"scenes_{name}", os.path.join(data, "unlabeled"), scenes, "tiny-highres",
            hr + [f"student.pretrained_weights={json.dumps(last_checkpoint(pre))}"] + extra, args.overwrite)
    result["miou"], result["pixel_accuracy"] = {}, {}
    half = args.scene_size // 2
    for name, run in runs.items():
        result["miou"][name], result["pixel_accuracy"][name] = {}, {}
        for size in (half, args.scene_size):
            r = seg_miou(os.path.join(run, "backbone.pth"), data, size,
                         os.path.join(scenes, f"seg_{name}_{size}.json"), args.probe_steps)
            result["miou"][name][f"{size}px"] = round(r["miou"], 4)
            result["pixel_accuracy"][name][f"{size}px"] = round(r["pixel_accuracy"], 4)
        print(f"scenes mIoU {name}: {result['miou'][name]}", flush=True)

    hr_cfg = load_config("tiny-highres", hr)
    result.update({
        "digits": f"sklearn digits (8x8 -> 32 / 64 px RGB), 70/30 split; pretraining {args.digits_iterations} "
                  "iterations of tiny on the 32 px train split",
        "scenes": f"dinov3/eval/scenes.py seed 0 at {args.scene_size} px: {args.unlabeled} unlabelled (pretraining), "
                  f"300 train / 150 val labelled; pretraining {args.scenes_iterations} iterations of tiny",
        "stage": {"recipe": "tiny-highres", "iterations": hr_cfg["train"]["iterations"],
                  "global_crops_size": hr_cfg["crops"]["global_crops_size"],
                  "local_crops_size": hr_cfg["crops"]["local_crops_size"],
                  "gram_teacher_crops_size": hr_cfg["crops"]["gram_teacher_crops_size"],
                  "global_local_crop_pairs_ratios": hr_cfg["crops"]["global_local_crop_pairs_ratios"],
                  "batch_size_per_gpu": hr_cfg["train"]["batch_size_per_gpu"], "overrides": hr,
                  "same_res_control": SAME_RES},
        "pretrained_from": args.pretrained_from, "k": args.k, "probe_steps": args.probe_steps,
        "wall_minutes": round((time.time() - t_start) / 60, 2),
    })
    print(json.dumps(result, indent=2))
    with open(os.path.join(args.workdir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    try:
        main()
    except TrainingStopped as exc:  # Ctrl-C / SIGTERM: the run's checkpoint is written; say so, no traceback
        sys.exit(f"demo_highres.py: {exc}")
