"""dinov3-viz: PCA of DINOv3 patch features as RGB, and cosine-similarity maps of one patch.

For each image IMG writes, next to it or into --output-dir:
  IMG_pca.png               first three principal components of the patch features as RGB
                            (with --fg-threshold: background, by the first component, in black)
  IMG_sim_rROW_cCOL.png     cosine similarity of every patch to patch (ROW, COL), with --patch ROW COL
The maps have the (cropped) image's resolution: each patch drawn as a patch_size x patch_size block.
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
    add_model_args,
    autocast_context,
    default_output_dir,
    find_images,
    load_model,
    load_rgb,
    resize_to_patch_multiple,
    to_normalized_tensor,
)


_OUR_OUTPUT = re.compile(r"_(pca|sim_r\d+_c\d+)\.png$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinov3-viz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--output-dir", default=None, help="where to write the PNGs (default: next to each image)")
    p.add_argument("--size", type=int, default=None,
                   help="resize the shorter side to this many pixels first (default: native resolution)")
    p.add_argument("--patch", type=int, nargs=2, metavar=("ROW", "COL"), default=None,
                   help="also write the cosine-similarity map of this patch (row, column in the patch grid)")
    p.add_argument("--fg-threshold", type=float, default=None,
                   help="foreground = first PCA component (scaled to [0, 1]) above this value")
    p.add_argument("--fg-invert", action="store_true", help="foreground below the threshold instead")
    p.add_argument("--blend", type=float, default=0.0,
                   help="mix this fraction of the input image into the maps (0 = maps only)")
    return p


def _to_png(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)).save(path)


@torch.no_grad()
def visualize(model, image_path: Path, args) -> list[Path]:
    img = resize_to_patch_multiple(load_rgb(image_path), model.patch_size, args.size, square=False)
    device = next(model.parameters()).device
    x = to_normalized_tensor(img)[None].to(device)
    with autocast_context(device, args.dtype):
        feats = model.forward_features(x)["x_norm_patchtokens"][0].float().cpu()
    p = model.patch_size
    h, w = x.shape[2] // p, x.shape[3] // p
    feats = feats.reshape(h, w, -1)
    base = np.asarray(img, dtype=np.float64) / 255.0
    out_dir = default_output_dir(image_path, args.output_dir)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.size is not None and args.size <= 0:
        raise SystemExit("dinov3-viz: --size must be > 0")
    if not 0.0 <= args.blend <= 1.0:
        raise SystemExit("dinov3-viz: --blend must be in [0, 1]")
    try:
        # outputs of an earlier run in the same folder are not inputs
        paths = [p for p in find_images(args.images) if not _OUR_OUTPUT.search(p.name)]
        if not paths:
            raise ValueError("only dinov3-viz outputs found among the inputs")
        model = load_model(args)
        for path in paths:
            for out in visualize(model, path, args):
                print(out)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"dinov3-viz: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
