"""dinov3-features: CLS and patch features of images with a DINOv3 backbone.

Output by extension:
  .safetensors  "cls" (N, C), "storage" (N, R, C), and "patch" (N, h, w, C) when all images share a size,
                else "patch.<i>" (h_i, w_i, C) per image; metadata "paths" (JSON list) and "patch_size".
  .npz          the same arrays in one numpy archive, plus "paths".
  .npy          FILE holds "cls"; FILE_patch.npy the patch features (one size only); FILE_paths.txt the paths.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ._common import (
    add_model_args,
    autocast_context,
    find_images,
    load_model,
    load_rgb,
    resize_to_patch_multiple,
    to_normalized_tensor,
)

SUFFIXES = (".safetensors", ".npz", ".npy")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinov3-features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--output", "-o", required=True, help="output file: .safetensors, .npz or .npy")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=224,
                   help="resize target in pixels (default 224); 0 keeps each image's native resolution")
    p.add_argument("--keep-aspect", action="store_true",
                   help="resize the shorter side to --size instead of to --size x --size")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


@torch.no_grad()
def extract(model, paths: list[Path], preprocess, batch_size: int, dtype: str, progress: bool):
    """Features of each image. Images are read one at a time; those of one shape are batched together."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    n = len(paths)
    cls, storage, patch = [None] * n, [None] * n, [None] * n
    pending: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    bar = tqdm(total=n, unit="img", disable=not progress, desc="dinov3-features")
    p = model.patch_size

    def run(items):
        x = torch.stack([t for _, t in items]).to(device)
        h, w = x.shape[2] // p, x.shape[3] // p
        with autocast_context(device, dtype):
            out = model.forward_features(x)
        for j, (i, _) in enumerate(items):
            cls[i] = out["x_norm_clstoken"][j].float().cpu()
            storage[i] = out["x_storage_tokens"][j].float().cpu()
            patch[i] = out["x_norm_patchtokens"][j].float().cpu().reshape(h, w, -1)
        bar.update(len(items))

    for i, path in enumerate(paths):
        t = preprocess(path)
        group = pending[tuple(t.shape)]
        group.append((i, t))
        if len(group) == batch_size:
            run(group)
            group.clear()
    for group in pending.values():
        if group:
            run(group)
    bar.close()
    return torch.stack(cls), torch.stack(storage), patch


def save(output: Path, paths: list[Path], cls, storage, patch, patch_size: int) -> list[Path]:
    uniform = len({tuple(t.shape) for t in patch}) == 1
    arrays = {"cls": cls.contiguous(), "storage": storage.contiguous()}
    if uniform:
        arrays["patch"] = torch.stack(patch).contiguous()
    else:
        arrays.update({f"patch.{i}": t.contiguous() for i, t in enumerate(patch)})
    names = [str(p) for p in paths]
    suffix = output.suffix.lower()
    output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(arrays, str(output), metadata={"paths": json.dumps(names), "patch_size": str(patch_size)})
        return [output]
    if suffix == ".npz":
        np.savez(output, paths=np.array(names), **{k: v.numpy() for k, v in arrays.items()})
        return [output]
    if not uniform:
        raise ValueError("images of different sizes need a .safetensors or .npz output (or use --size)")
    stem = output.with_suffix("")
    patch_path, paths_path = Path(f"{stem}_patch.npy"), Path(f"{stem}_paths.txt")
    np.save(output, arrays["cls"].numpy())
    np.save(patch_path, arrays["patch"].numpy())
    paths_path.write_text("\n".join(names) + "\n")
    return [output, patch_path, paths_path]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    if output.suffix.lower() not in SUFFIXES:
        raise SystemExit(f"dinov3-features: --output must end with one of {SUFFIXES}, got {output.name}")
    if args.batch_size < 1:
        raise SystemExit("dinov3-features: --batch-size must be >= 1")
    if args.size < 0:
        raise SystemExit("dinov3-features: --size must be >= 0")
    try:
        paths = find_images(args.images)
        model = load_model(args)
        size = args.size or None

        def preprocess(path):
            img = resize_to_patch_multiple(load_rgb(path), model.patch_size, size, square=not args.keep_aspect)
            return to_normalized_tensor(img)

        cls, storage, patch = extract(model, paths, preprocess, args.batch_size, args.dtype, not args.no_progress)
        written = save(output, paths, cls, storage, patch, model.patch_size)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"dinov3-features: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(paths)} images -> {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
