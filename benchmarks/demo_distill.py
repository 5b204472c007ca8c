"""Demo: distil a `tiny` teacher into a smaller student (`vit_nano`: half the width) on scikit-learn's digits, and
compare with the same student trained by self-supervision from scratch; kNN accuracy of each.

    pip install scikit-learn
    python benchmarks/demo_distill.py --threads 1     # teacher and students 6000 iterations each

1. Teacher: `tiny` trained on the digits' train split as benchmarks/demo_digits.py does (or --teacher-run, a
   finished run folder of it): its checkpoint (backbone + heads) and backbone.pth.
2. Students (`tiny` recipe with student.arch=vit_nano), each for --iterations iterations:
   (a) "ssl": self-supervised from scratch (the `tiny` recipe as it is);
   (b) "heads": distillation.mode=heads from the teacher's checkpoint (its DINO/iBOT heads give the targets);
   (c) "features": distillation.mode=features from the teacher's backbone.pth (CLS + patch tokens, cosine loss,
       through the learnable projection 32 -> 64).
   The distilled runs turn Gram anchoring off, as the official distillation config does.
3. kNN (weighted 20-NN on the CLS tokens of each run's exported backbone; train split -> test split).

--domain trains teacher and students on one of the generated image domains of demo_init_from.py (the same digits
textured, inverted or coloured) instead of the digits, and probes on that domain's test split. --recipe applies to
the teacher and every student (e.g. student.patch_size=4 for a teacher and students with 4-pixel patches).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo_digits import probe, write_digits  # noqa: E402
from demo_init_from import DOMAINS, load_backbone, save_split  # noqa: E402

from dinov3.train.checkpoint import latest_checkpoint  # noqa: E402
from dinov3.train.config import load_config  # noqa: E402
from dinov3.train.trainer import TrainingStopped, train  # noqa: E402

# The `tiny` recipe's teacher temperature (0.04 -> 0.07, official) leaves this 2-block model's DINO head collapsed on
# the digits: its CLS tokens start nearly equal (pairwise cosine 0.998), the Sinkhorn-Knopp targets are uniform from
# iteration 0 and the head learns to output the uniform distribution for good (loss at log K; the health monitor
# says so), so a head-distilled student would learn from empty CLS targets. A constant 0.02 sharpens the small early
# differences enough: the targets leave log K within 100 iterations. Teacher and every student use the same SSL recipe.
RECIPE = ["schedules.teacher_temp.start=0.02", "schedules.teacher_temp.peak=0.02", "schedules.teacher_temp.end=0.02"]

STUDENTS = {
    "ssl": [],
    "heads": ["distillation.enabled=true", "distillation.mode=heads", "gram.use_loss=false"],
    "features": ["distillation.enabled=true", "distillation.mode=features", "gram.use_loss=false"],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo_distill")
    p.add_argument("--teacher-iterations", type=int, default=6000)
    p.add_argument("--iterations", type=int, default=6000, help="of each student")
    p.add_argument("--teacher-run", default=None,
                   help="a finished `tiny` run on the --domain images (default: train it)")
    p.add_argument("--student-arch", default="vit_nano")
    p.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument("--domain", default="digits", choices=list(DOMAINS),
                   help="the images of teacher and students (generated from the digits as in demo_init_from.py; "
                        "kNN on the same domain's test split)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", default="", help="suffix of the result file")
    p.add_argument("--recipe", nargs="*", default=RECIPE,
                   help="overrides of the `tiny` recipe for the teacher and every student (default: %(default)s)")
    p.add_argument("overrides", nargs="*",
                   help="extra config overrides for the distilled students (key=value; after --recipe, put -- first)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arrays, labels = write_digits(os.path.join(args.workdir, "digits"), 32)
    data = os.path.join(args.workdir, "digits", "train")
    if args.domain != "digits":
        arrays = DOMAINS[args.domain](arrays)
        data = save_split(os.path.join(args.workdir, args.domain, "train"), arrays["train"])
    common = ["train.progress_bar=false", "train.log_every=50", *args.recipe]

    teacher_run = args.teacher_run
    t_minutes = None
    n_t = args.teacher_iterations
    if teacher_run is None:
        teacher_run = os.path.join(args.workdir, "teacher")
        cfg = load_config("tiny", common + [f"train.iterations={n_t}", f"gram.start_iter={int(n_t * 0.75)}"])
        t0 = time.time()
        train(cfg, data_dir=data, output_dir=teacher_run, overwrite=True)
        t_minutes = round((time.time() - t0) / 60, 2)
    teacher_ckpt = latest_checkpoint(os.path.join(teacher_run, "checkpoints"))
    teacher_backbone = os.path.join(teacher_run, "backbone.pth")
    cfg = load_config("tiny", common)

    def knn(path):
        return round(100 * probe(load_backbone(path), arrays, labels, cfg, args.k), 1)

    results = {"dataset": "sklearn digits (8x8 -> 32 px RGB), 70/30 split", "domain": args.domain, "k": args.k,
               "threads": torch.get_num_threads(), "teacher": {"run": teacher_run, "arch": "vit_tiny",
                                                               "iterations": n_t, "train_minutes": t_minutes,
                                                               "knn": knn(teacher_backbone)},
               "student_arch": args.student_arch, "iterations": args.iterations, "students": []}
    print(f"teacher {teacher_run}: kNN {results['teacher']['knn']}", flush=True)
    n = args.iterations
    for name in args.students:
        overrides = common + [f"train.iterations={n}", f"gram.start_iter={int(n * 0.75)}",
                              f"student.arch={args.student_arch}", *STUDENTS[name]]
        if name == "heads":
            overrides.append(f"distillation.teacher={json.dumps(os.path.abspath(teacher_ckpt))}")
        elif name == "features":
            overrides.append(f"distillation.teacher={json.dumps(os.path.abspath(teacher_backbone))}")
        if name != "ssl":
            overrides += args.overrides
        run_cfg = load_config("tiny", overrides)
        out = os.path.join(args.workdir, f"student_{name}{args.tag}")
        t0 = time.time()
        train(run_cfg, data_dir=data, output_dir=out, overwrite=True)
        row = {"student": name, "train_minutes": round((time.time() - t0) / 60, 2),
               "knn": knn(os.path.join(out, "backbone.pth")), "overrides": overrides}
        results["students"].append(row)
        print(json.dumps(row), flush=True)
    print(f"teacher (vit_tiny, {n_t} it): kNN {results['teacher']['knn']:.1f}")
    for r in results["students"]:
        print(f"student {args.student_arch} {r['student']:9s} ({n} it): kNN {r['knn']:.1f}  "
              f"({r['knn'] - results['teacher']['knn']:+.1f} vs the teacher)")
    with open(os.path.join(args.workdir, f"result{args.tag}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    try:
        main()
    except TrainingStopped as exc:  # Ctrl-C / SIGTERM: the run's checkpoint is written; say so, no traceback
        sys.exit(f"demo_distill.py: {exc}")
