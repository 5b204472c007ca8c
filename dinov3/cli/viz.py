"""dinov3-viz: PCA of DINOv3 patch features as RGB, and cosine-similarity maps of one patch.

For each image IMG writes, next to it or into --output-dir:
  IMG_pca.png               first three principal components of the patch features as RGB
                            (with --fg-threshold: background, by the first component, in black)
  IMG_sim_rROW_cCOL.png     cosine similarity of every patch to patch (ROW, COL), with --patch ROW COL
The maps have the (cropped) image's resolution: each patch drawn as a patch_size x patch_size block. Without
--size, images larger than --max-side are downscaled first (with a note). Unreadable inputs are skipped with a
warning and counted.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

from dinov3.viz import colorize, patch_similarity, pca_rgb, upscale_nearest

from ._common import (
    CLIError,
    Report,
    add_max_side_arg,
    add_model_args,
    autocast_context,
    check_output_dir,
    check_size_args,
    find_images,
    load_model,
    positive_int,
    prepare_image,
    resolve_device,
    run_cli,
    to_normalized_tensor,
)

PROG = "dinov3-viz"


_OUR_OUTPUT = re.compile(r"_(pca|sim_r\d+_c\d+)\.png$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--output-dir", default=None, help="where to write the PNGs (default: next to each image)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="resize the shorter side to this many pixels first (default: the image's resolution, up to "
                        "--max-side)")
    add_max_side_arg(p, "without --size")
    p.add_argument("--patch", type=int, nargs=2, metavar=("ROW", "COL"), default=None,
                   help="also write the cosine-similarity map of this patch (row, column in the patch grid)")
    p.add_argument("--fg-threshold", type=float, default=None,
                   help="foreground = first PCA component (scaled to [0, 1]) above this value")
    p.add_argument("--fg-invert", action="store_true", help="foreground below the threshold instead")
    p.add_argument("--blend", type=float, default=0.0,
                   help="mix this fraction of the input image into the maps (0 = maps only)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown for several images)")
    return p


def _to_png(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)).save(path)


@torch.no_grad()
def visualize(model, img, image_path: Path, out_dir: Path, args) -> list[Path]:
    """Write the maps of one prepared (patch-multiple) image; returns the paths written."""
    p = model.patch_size
    w, h = img.size[0] // p, img.size[1] // p
    if args.patch is not None and not (0 <= args.patch[0] < h and 0 <= args.patch[1] < w):
        raise CLIError(f"--patch {args.patch[0]} {args.patch[1]} is outside the {h}x{w} patch grid of {image_path}")
    device = next(model.parameters()).device
    x = to_normalized_tensor(img)[None].to(device)
    with autocast_context(device, args.dtype):
        feats = model.forward_features(x)["x_norm_patchtokens"][0].float().cpu()
    feats = feats.reshape(h, w, -1)
    base = np.asarray(img, dtype=np.float64) / 255.0
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def finish(grid_rgb: np.ndarray, name: str):
        rgb = upscale_nearest(grid_rgb, p)
        if args.blend > 0:
            rgb = (1 - args.blend) * rgb + args.blend * base
        path = out_dir / f"{image_path.stem}_{name}.png"
        _to_png(rgb, path)
        written.append(path)

    rgb, _ = pca_rgb(feats, fg_threshold=args.fg_threshold, fg_invert=args.fg_invert)
    finish(rgb, "pca")
    if args.patch is not None:
        row, col = args.patch
        sim = patch_similarity(feats, row, col)
        colored = colorize(sim, -1.0, 1.0)
        colored[row, col] = (1.0, 0.0, 0.0)  # the query patch in red
        finish(colored, f"sim_r{row}_c{col}")
    return written


def output_dirs(paths: list[Path], output_dir: str | None) -> list[Path]:
    """Where each image's maps go; CLIError if a folder is not writable or two images would write the same names."""
    dirs = [Path(output_dir) if output_dir else path.parent for path in paths]
    for d in dict.fromkeys(dirs):
        check_output_dir(d, "--output-dir" if output_dir else "output folder (next to the image)")
    owner: dict[tuple[Path, str], Path] = {}
    for d, path in zip(dirs, paths):
        first = owner.setdefault((d, path.stem), path)
        if first != path:
            elsewhere = " or leave out --output-dir" if output_dir and first.parent != path.parent else ""
            raise CLIError(f"{first} and {path} would both write {d / path.stem}_*.png; rename one{elsewhere}")
    return dirs


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, PROG)


def _main(argv: list[str] | None) -> int:
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    if not 0.0 <= args.blend <= 1.0:
        raise CLIError("--blend must be in [0, 1]")
    device = resolve_device(args.device)
    report = Report(PROG)
    # outputs of an earlier run in the same folder are not inputs
    paths = [p for p in find_images(args.images, report) if not _OUR_OUTPUT.search(p.name)]
    if not paths:
        raise CLIError("only dinov3-viz outputs found among the inputs")
    out_dirs = output_dirs(paths, args.output_dir)
    model = load_model(args, device)
    check_size_args(args.size, args.max_side, model.patch_size)
    done = 0
    with tqdm(total=len(paths), unit="img", desc=PROG, disable=args.no_progress or len(paths) < 2) as bar:
        for path, out_dir in zip(paths, out_dirs):
            img = prepare_image(path, report, patch=model.patch_size, size=args.size, square=False,
                                max_side=args.max_side)
            if img is not None:
                for out in visualize(model, img, path, out_dir, args):
                    tqdm.write(str(out))
                done += 1
            bar.update(1)
    report.summary(len(paths))
    if not done:
        raise CLIError(f"none of the {len(paths)} input files could be read as an image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
