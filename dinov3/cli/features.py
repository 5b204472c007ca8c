"""dinov3-features: CLS and patch features of images with a DINOv3 backbone.

Output by extension:
  .safetensors  "cls" (N, C), "storage" (N, R, C), and "patch" (N, h, w, C) when all images share a size,
                else "patch.<i>" (h_i, w_i, C) per image; metadata "paths" (JSON list), "patch_size", and
                "skipped" / "skipped_reasons" (JSON lists: the inputs that could not be read, and why).
  .npz          the same arrays in one numpy archive, plus "paths", "skipped" and "skipped_reasons".
  .npy          FILE holds "cls"; FILE_patch.npy the patch features (one size only); FILE_paths.txt the paths;
                FILE_skipped.txt the skipped inputs (path TAB reason per line).
Unreadable inputs (empty, truncated, not an image, too many pixels) are skipped with a warning and counted.
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
    CLIError,
    Report,
    add_max_side_arg,
    add_model_args,
    autocast_context,
    check_output_file,
    check_size_args,
    find_images,
    load_model,
    nonnegative_int,
    positive_int,
    prepare_image,
    resolve_device,
    run_cli,
    to_normalized_tensor,
)

PROG = "dinov3-features"
SUFFIXES = (".safetensors", ".npz", ".npy")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--output", "-o", required=True, help="output file: .safetensors, .npz or .npy")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--size", type=nonnegative_int, default=224,
                   help="resize target in pixels (default 224); 0 keeps each image's resolution (up to --max-side)")
    p.add_argument("--keep-aspect", action="store_true",
                   help="resize the shorter side to --size instead of to --size x --size")
    add_max_side_arg(p, "with --size 0")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


@torch.no_grad()
def extract(model, paths: list[Path], preprocess, batch_size: int, dtype: str, progress: bool, one_shape: bool):
    """Features of every image ``preprocess`` gives a tensor for (None: skipped), as (kept indices, cls, storage,
    patch list). Images are read one at a time; those of one shape are batched together. ``one_shape``: stop at the
    first image whose shape differs from the first one's (before computing it)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    feats: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    pending: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    p = model.patch_size
    first_shape = None

    def run(items):
        x = torch.stack([t for _, t in items]).to(device)
        h, w = x.shape[2] // p, x.shape[3] // p
        with autocast_context(device, dtype):
            out = model.forward_features(x)
        for j, (i, _) in enumerate(items):
            feats[i] = (out["x_norm_clstoken"][j].float().cpu(), out["x_storage_tokens"][j].float().cpu(),
                        out["x_norm_patchtokens"][j].float().cpu().reshape(h, w, -1))
        bar.update(len(items))

    with tqdm(total=len(paths), unit="img", disable=not progress, desc=PROG) as bar:
        for i, path in enumerate(paths):
            t = preprocess(path)
            if t is None:
                bar.update(1)
                continue
            shape = tuple(t.shape)
            first_shape = first_shape or shape
            if one_shape and shape != first_shape:
                raise CLIError(f"{path} gives a {shape[1] // p}x{shape[2] // p} patch grid, the images before it "
                               f"{first_shape[1] // p}x{first_shape[2] // p}: a .npy output needs one size; write "
                               ".safetensors or .npz, or give --size without --keep-aspect")
            group = pending[shape]
            group.append((i, t))
            if len(group) == batch_size:
                run(group)
                group.clear()
        for group in pending.values():
            if group:
                run(group)
    kept = sorted(feats)
    if not kept:
        return kept, None, None, []
    return (kept, torch.stack([feats[i][0] for i in kept]), torch.stack([feats[i][1] for i in kept]),
            [feats[i][2] for i in kept])


def output_files(output: Path) -> list[Path]:
    """Every file an output name stands for (.npy writes four)."""
    if output.suffix.lower() != ".npy":
        return [output]
    stem = output.with_suffix("")
    return [output, Path(f"{stem}_patch.npy"), Path(f"{stem}_paths.txt"), Path(f"{stem}_skipped.txt")]


def save(output: Path, paths: list[Path], cls, storage, patch, patch_size: int,
         skipped: list[tuple[str, str]]) -> list[Path]:
    uniform = len({tuple(t.shape) for t in patch}) == 1
    arrays = {"cls": cls.contiguous(), "storage": storage.contiguous()}
    if uniform:
        arrays["patch"] = torch.stack(patch).contiguous()
    else:
        arrays.update({f"patch.{i}": t.contiguous() for i, t in enumerate(patch)})
    names = [str(p) for p in paths]
    skipped_paths, reasons = [p for p, _ in skipped], [r for _, r in skipped]
    suffix = output.suffix.lower()
    output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(arrays, str(output), metadata={"paths": json.dumps(names), "patch_size": str(patch_size),
                                                 "skipped": json.dumps(skipped_paths),
                                                 "skipped_reasons": json.dumps(reasons)})
        return [output]
    if suffix == ".npz":
        np.savez(output, paths=np.array(names), skipped=np.array(skipped_paths, dtype=str),
                 skipped_reasons=np.array(reasons, dtype=str), **{k: v.numpy() for k, v in arrays.items()})
        return [output]
    written = output_files(output)
    _, patch_path, paths_path, skipped_path = written
    np.save(output, arrays["cls"].numpy())
    np.save(patch_path, arrays["patch"].numpy())
    paths_path.write_text("\n".join(names) + "\n")
    skipped_path.write_text("".join(f"{p}\t{r}\n" for p, r in skipped))
    return written


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, PROG)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    if output.suffix.lower() not in SUFFIXES:
        raise CLIError(f"--output must end with one of {', '.join(SUFFIXES)}, got {output.name}")
    for path in output_files(output):
        check_output_file(path, "--output")
    device = resolve_device(args.device)
    report = Report(PROG)
    paths = find_images(args.images, report)
    model = load_model(args, device)
    patch_size = model.patch_size
    size = args.size or None
    check_size_args(size, args.max_side, patch_size)

    def preprocess(path):
        img = prepare_image(path, report, patch=patch_size, size=size, square=not args.keep_aspect,
                            max_side=args.max_side)
        return None if img is None else to_normalized_tensor(img)

    kept, cls, storage, patch = extract(model, paths, preprocess, args.batch_size, args.dtype, not args.no_progress,
                                        one_shape=output.suffix.lower() == ".npy")
    report.summary(len(paths))
    if not kept:
        raise CLIError(f"none of the {len(paths)} input files could be read as an image")
    written = save(output, [paths[i] for i in kept], cls, storage, patch, patch_size, report.skipped)
    skipped = f" ({len(report.skipped)} skipped)" if report.skipped else ""
    print(f"{len(kept)} images{skipped} -> {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
