"""dinov3-eval: probes of a frozen backbone on your own images.

  dinov3-eval knn    --checkpoint W --train DIR --val DIR    weighted k-NN on CLS features; DIR holds one
                                                             subfolder of images per class
  dinov3-eval seg    --checkpoint W --train DIR --val DIR    linear segmentation probe on patch features, mIoU;
                                                             each image has a mask beside it (NAME_mask.png,
                                                             class indices, 255 = ignore)
  dinov3-eval scenes OUT                                     write the generated segmentation task (textured
                                                             objects on textured ground, 6 classes) to try `seg`

Images are centre-cropped to a square and resized to --size pixels (a multiple of the patch size). --checkpoint takes
what dinov3-features takes: a backbone.pth from dinov3-train, a training checkpoint, or official weights with --arch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dinov3.cli._common import (
    CLIError,
    Report,
    add_model_args,
    autocast_context,
    check_output_dir,
    check_output_file,
    find_images,
    load_model,
    positive_int,
    resolve_device,
    run_cli,
)
from dinov3.images import UnreadableImage, center_square, load_rgb

PROG = "dinov3-eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")

    def common(sp, default_size: int):
        add_model_args(sp)
        sp.add_argument("--train", required=True, help="training images (the probe is fitted on them)")
        sp.add_argument("--val", required=True, help="validation images (the reported score)")
        sp.add_argument("--size", type=positive_int, default=default_size,
                        help=f"square side the images are cropped and resized to (default {default_size})")
        sp.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
        sp.add_argument("--output", default=None, help="also write the results to this JSON file")

    knn = sub.add_parser("knn", help="weighted k-NN on CLS features (class subfolders)",
                         description="Weighted k-NN (the DINO protocol) on L2-normalised CLS features: each --val "
                                     "image votes among its k most similar --train images with weight exp(cos / T). "
                                     "Each folder holds one subfolder of images per class.")
    common(knn, 224)
    knn.add_argument("--k", type=positive_int, default=20, help="neighbours (default 20)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote temperature T (default 0.07)")

    seg = sub.add_parser("seg", help="linear segmentation probe on patch features (masks beside the images)",
                         description="Linear segmentation probe: frozen backbone, a linear layer on the patch tokens "
                                     "fitted on the --train (image, mask) pairs, mIoU on --val. A mask is a "
                                     "single-channel PNG of class indices (255 = ignore) named like its image with "
                                     "the --mask-suffix in place of the extension.")
    common(seg, 224)
    seg.add_argument("--mask-suffix", default="_mask.png", help="mask file name after the image's stem")
    seg.add_argument("--num-classes", type=positive_int, default=None,
                     help="number of classes (default: the largest index in the training masks + 1)")
    seg.add_argument("--steps", type=positive_int, default=300, help="optimisation steps of the probe (default 300)")
    seg.add_argument("--lr", type=float, default=1e-2, help="probe learning rate (default 1e-2)")
    seg.add_argument("--seed", type=int, default=0, help="probe initialisation seed")

    sc = sub.add_parser("scenes", help="write the generated segmentation task",
                        description="Write scenes of textured objects on textured ground with per-pixel class masks "
                                    "(dinov3/eval/scenes.py): OUT/train and OUT/val (NAME.png + NAME_mask.png), "
                                    "OUT/unlabeled (images only, to pretrain on) and OUT/classes.json. Deterministic "
                                    "in --seed.")
    sc.add_argument("out", metavar="OUT", help="output folder")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--train", type=positive_int, default=300, help="labelled training scenes (default 300)")
    sc.add_argument("--val", type=positive_int, default=150, help="labelled validation scenes (default 150)")
    sc.add_argument("--unlabeled", type=int, default=0, help="unlabelled scenes for self-supervised training")
    sc.add_argument("--size", type=positive_int, default=64, help="image side in pixels (default 64)")
    return p


# ------------------------------------------------------------------------------------------------ inputs
def _folder(path: str, option: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{option} {path}: no such folder")
    if not p.is_dir():
        raise CLIError(f"{option} {path} is a file; give a folder")
    return p


def _square_rgb(path: Path, size: int, report: Report) -> np.ndarray | None:
    try:
        return np.asarray(center_square(load_rgb(path), size))
    except UnreadableImage as exc:
        report.skip(exc.path, exc.reason)
        return None


def class_folders(root: Path, option: str, report: Report) -> dict[str, list[Path]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise CLIError(f"{option} {root} has no class subfolders (one folder of images per class is expected)")
    out = {}
    for d in classes:
        try:
            out[d.name] = find_images([str(d)], report)
        except CLIError:
            report.say("warning", f"{option}: class folder {d} holds no image; left out")
    if not out:
        raise CLIError(f"{option} {root}: no class subfolder holds an image")
    return out


def _features(model, images: list[np.ndarray], args, device, kind: str) -> torch.Tensor:
    from dinov3.eval.seg import extract_patch_features, normalize

    x = normalize(np.stack(images))
    if kind == "patch":
        return extract_patch_features(model, x, batch_size=args.batch_size, device=device,
                                      autocast=lambda: autocast_context(device, args.dtype))
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], args.batch_size):
            with autocast_context(device, args.dtype):
                out.append(model.forward_features(x[i:i + args.batch_size].to(device))["x_norm_clstoken"].float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def _check_size(model, size: int) -> None:
    if size % model.patch_size:
        raise CLIError(f"--size {size} is not a multiple of the model's patch size {model.patch_size}")


# ------------------------------------------------------------------------------------------------ tasks
def run_knn(args, device) -> dict:
    from dinov3.eval.knn import knn_accuracy

    report = Report(PROG)
    train_dir, val_dir = _folder(args.train, "--train"), _folder(args.val, "--val")
    if args.temperature <= 0:
        raise CLIError("--temperature must be > 0")
    train_classes = class_folders(train_dir, "--train", report)
    val_classes = class_folders(val_dir, "--val", report)
    unknown = sorted(set(val_classes) - set(train_classes))
    if unknown:
        raise CLIError(f"--val has classes that --train lacks: {', '.join(unknown)}")
    names = sorted(train_classes)
    model = load_model(args, device)
    _check_size(model, args.size)

    def load(classes):
        imgs, labels = [], []
        for name, paths in classes.items():
            for p in paths:
                a = _square_rgb(p, args.size, report)
                if a is not None:
                    imgs.append(a)
                    labels.append(names.index(name))
        return imgs, torch.tensor(labels)

    tr_imgs, tr_labels = load(train_classes)
    va_imgs, va_labels = load(val_classes)
    if not tr_imgs or not va_imgs:
        raise CLIError("no readable image in " + ("--train" if not tr_imgs else "--val"))
    if args.k > len(tr_imgs):
        raise CLIError(f"--k {args.k} is more than the {len(tr_imgs)} training images")
    tr = _features(model, tr_imgs, args, device, "cls")
    va = _features(model, va_imgs, args, device, "cls")
    acc = knn_accuracy(tr, tr_labels, va, va_labels, k=args.k, temperature=args.temperature, num_classes=len(names))
    report.summary(sum(map(len, train_classes.values())) + sum(map(len, val_classes.values())))
    print(f"knn: top-1 accuracy {acc:.4f} (k={args.k}, T={args.temperature:g}; {len(tr_imgs)} train / "
          f"{len(va_imgs)} val images, {len(names)} classes)")
    return {"task": "knn", "accuracy": acc, "k": args.k, "temperature": args.temperature, "classes": names,
            "n_train": len(tr_imgs), "n_val": len(va_imgs), "skipped": report.skipped}


def _load_pairs(folder: Path, option: str, args, report: Report):
    from dinov3.eval.seg import find_pairs, load_pair

    pairs, lonely = find_pairs(folder, args.mask_suffix)
    if lonely:
        report.say("warning", f"{option}: {len(lonely)} image(s) without a {args.mask_suffix} mask left out, e.g. "
                              f"{lonely[0]}")
    imgs, masks = [], []
    for image, mask in pairs:
        try:
            a, m = load_pair(image, mask, args.size)
        except UnreadableImage as exc:
            report.skip(exc.path, exc.reason)
            continue
        except (OSError, ValueError) as exc:
            report.skip(mask, str(exc))
            continue
        imgs.append(a)
        masks.append(m)
    if not imgs:
        raise CLIError(f"{option} {folder}: no (image, mask) pair could be read (masks are named "
                       f"IMAGE_STEM{args.mask_suffix} beside their images)")
    return imgs, torch.from_numpy(np.stack(masks))


def _class_names(folder: Path, n: int) -> list[str]:
    """Names from a classes.json beside or above the folder (as `dinov3-eval scenes` writes), else the indices."""
    for meta in (folder / "classes.json", folder.parent / "classes.json"):
        try:
            names = json.loads(meta.read_text())["classes"]
            if len(names) >= n:
                return [str(x) for x in names[:n]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return [str(i) for i in range(n)]


def run_seg(args, device) -> dict:
    from dinov3.eval.seg import seg_probe

    report = Report(PROG)
    train_dir, val_dir = _folder(args.train, "--train"), _folder(args.val, "--val")
    if args.lr <= 0:
        raise CLIError("--lr must be > 0")
    model = load_model(args, device)
    _check_size(model, args.size)
    tr_imgs, tr_masks = _load_pairs(train_dir, "--train", args, report)
    va_imgs, va_masks = _load_pairs(val_dir, "--val", args, report)
    tr = _features(model, tr_imgs, args, device, "patch")
    va = _features(model, va_imgs, args, device, "patch")
    res = seg_probe(tr, tr_masks, va, va_masks, num_classes=args.num_classes, steps=args.steps, lr=args.lr,
                    seed=args.seed)
    names = _class_names(train_dir, res.num_classes)
    per_class = ", ".join(f"{n} {v:.3f}" for n, v in zip(names, res.per_class_iou))
    print(f"seg: mIoU {res.miou:.4f}, pixel accuracy {res.pixel_accuracy:.4f} ({res.n_train} train / {res.n_val} val "
          f"images at {args.size} px, {res.num_classes} classes)\n  IoU per class: {per_class}")
    return {"task": "seg", **res.as_dict(), "classes": names, "size": args.size, "steps": args.steps, "lr": args.lr,
            "seed": args.seed, "skipped": report.skipped}


def run_scenes(args) -> dict:
    from dinov3.eval.scenes import write_scenes

    if args.unlabeled < 0:
        raise CLIError("--unlabeled must be >= 0")
    out = Path(args.out)
    check_output_dir(out, "OUT")
    meta = write_scenes(str(out), seed=args.seed, n_train=args.train, n_val=args.val, n_unlabeled=args.unlabeled,
                        size=args.size)
    counts = ", ".join(f"{n} {split}" for split, n in meta["counts"].items() if n)
    print(f"scenes: {counts} at {args.size} px in {out} (classes: {', '.join(meta['classes'])})")
    return meta


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, PROG)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.task == "scenes":
        run_scenes(args)
        return 0
    device = resolve_device(args.device)
    if args.output:
        check_output_file(Path(args.output), "--output")
    result = run_knn(args, device) if args.task == "knn" else run_seg(args, device)
    result["checkpoint"] = str(args.checkpoint)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
