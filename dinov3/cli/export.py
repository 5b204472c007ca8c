"""dinov3-export: a backbone in the form another stack deploys or fine-tunes.

Formats (--format):
  onnx         one graph, input pixel_values (B, 3, H, W) with dynamic batch, height and width (multiples of the patch
               size), outputs cls_token, patch_tokens and register_tokens (when the model has them); RoPE computed in
               the graph; plain ONNX ops (opset 18). Checked with onnxruntime against PyTorch after writing
               (--check-sizes, batches 1 and 3). --fp16 writes a float16 graph (checked for finite outputs).
  hf           a folder for transformers.AutoModel.from_pretrained: config.json + model.safetensors (DINOv3ViTModel).
  timm         a state dict for timm's DINOv3 models (eva.py); the timm model name and arguments are printed.
               .safetensors (the model in its metadata) or .pth (the model in a .json beside it).
  safetensors  our official-layout state dict with the model's arguments in its metadata (no --arch needed to load).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ._common import CLIError, add_model_args, check_output_dir, check_output_file, load_model, run_cli

PROG = "dinov3-export"
FORMATS = ("onnx", "hf", "timm", "safetensors")
SUFFIXES = {"onnx": (".onnx",), "timm": (".safetensors", ".pth", ".pt"), "safetensors": (".safetensors",)}
# Default check sizes, in patches: square, non-square, and larger than the training crop.
CHECK_PATCHES = ((14, 14), (14, 20), (20, 20))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, compute=False)
    p.add_argument("--format", "-f", required=True, choices=FORMATS, help="what to write (see above)")
    p.add_argument("--output", "-o", required=True,
                   help="output file (.onnx; .safetensors; timm: .safetensors or .pth) or, for hf, folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--fp16", action="store_true", help="onnx: a float16 graph (input, weights and outputs)")
    p.add_argument("--check-sizes", nargs="+", metavar="HxW", default=None,
                   help="onnx: the image sizes at which onnxruntime is compared with PyTorch, each a multiple of the "
                        "patch size (default: 14x14, 14x20 and 20x20 patches, e.g. 224x224 224x320 320x320 at "
                        "patch 16)")
    p.add_argument("--no-check", action="store_true", help="onnx: write the graph without running it")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, PROG)


def _parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise CLIError(f"--check-sizes: {text!r} is not HEIGHTxWIDTH (e.g. 224x320)")
    return int(m.group(1)), int(m.group(2))


def _check_outputs(fmt: str, output: Path, overwrite: bool) -> list[Path]:
    """The paths the export writes, checked for suffix, existence and writability before the model is loaded."""
    if fmt in SUFFIXES and output.suffix.lower() not in SUFFIXES[fmt]:
        raise CLIError(f"--output for --format {fmt} must end with {' or '.join(SUFFIXES[fmt])}, got {output.name}")
    if fmt == "hf":
        written = [output / "config.json", output / "model.safetensors"]
        check_output_dir(output, "--output")
        existing = [output] if output.exists() else []
    else:
        written = [output] + ([output.with_suffix(".json")] if fmt == "timm" and output.suffix != ".safetensors"
                              else [])
        for path in written:
            check_output_file(path, "--output")
        existing = [path for path in written if path.exists()]
    if existing and not overwrite:
        raise CLIError(f"--output {existing[0]} exists; add --overwrite to replace it, or choose another path")
    return written


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    onnx_only = [name for name, given in (("--fp16", args.fp16), ("--check-sizes", args.check_sizes),
                                          ("--no-check", args.no_check)) if given]
    if onnx_only and args.format != "onnx":
        raise CLIError(f"{', '.join(onnx_only)} only apply to --format onnx")
    if args.check_sizes and args.no_check:
        raise CLIError("--check-sizes and --no-check contradict each other")
    sizes = [_parse_size(s) for s in args.check_sizes] if args.check_sizes else None
    written = _check_outputs(args.format, output, args.overwrite)
    if args.format == "onnx":
        _require("onnx", "onnxscript", *(() if args.no_check else ("onnxruntime",)))
    elif args.format == "hf":
        _require("transformers")

    import torch

    model = load_model(args, torch.device("cpu"))
    p = model.patch_size
    if args.format == "onnx":
        sizes = sizes or [(h * p, w * p) for h, w in CHECK_PATCHES]
        bad = [f"{h}x{w}" for h, w in sizes if h <= 0 or w <= 0 or h % p or w % p]
        if bad:
            raise CLIError(f"--check-sizes {' '.join(bad)}: not a positive multiple of the patch size {p} "
                           f"(e.g. {max(p, sizes[0][0] // p * p)}x{max(p, sizes[0][1] // p * p)})")
        return _export_onnx(model, output, args.fp16, None if args.no_check else sizes)
    return _export_weights(model, args.format, output, written)


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CLIError(f"this export needs {', '.join(missing)}: pip install {' '.join(missing)} "
                       "(or the package's [export] extra)")


def _export_onnx(model, output: Path, fp16: bool, sizes) -> int:
    from dinov3.export.onnx import FP16_MIN_COSINE, FP32_MIN_COSINE, OPSET, check_onnx, export_onnx

    names = export_onnx(model, output, fp16=fp16)
    print(f"wrote {output}: opset {OPSET}, {'float16' if fp16 else 'float32'}, input pixel_values "
          f"(batch, 3, {model.patch_size}*h, {model.patch_size}*w), outputs {', '.join(names)}")
    if sizes is None:
        return 0
    rows = check_onnx(output, model, sizes)
    threshold = FP16_MIN_COSINE if fp16 else FP32_MIN_COSINE
    print(f"onnxruntime (CPU) vs PyTorch, every output token (pass: finite, cosine >= {threshold}):")
    print(f"{'size':>11} {'batch':>5} {'min cosine':>12} {'max abs err':>12}  ok")
    failed = [r for r in rows if not r.finite or r.min_cosine < threshold]
    for r in rows:
        ok = "NO" if r in failed else "yes"
        print(f"{r.height:>5}x{r.width:<5} {r.batch:>5} {r.min_cosine:>12.7f} {r.max_abs_err:>12.3e}  {ok}")
    if failed:
        print(f"{PROG}: error: the ONNX graph does not match PyTorch at {len(failed)} of {len(rows)} checks "
              f"({output} is kept for inspection)", file=sys.stderr)
        return 1
    return 0


def _export_weights(model, fmt: str, output: Path, written: list[Path]) -> int:
    from dinov3.export import export_hf, export_safetensors, export_timm

    try:
        if fmt == "hf":
            export_hf(model, output)
        elif fmt == "safetensors":
            export_safetensors(model, output)
        else:
            name, kwargs = export_timm(model, output)
    except ValueError as exc:  # a model that the target layout cannot express
        raise CLIError(f"cannot export to {fmt}: {exc}") from None
    print(f"wrote {', '.join(str(p) for p in written)}")
    if fmt == "timm":
        extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        print(f"load with: timm.create_model({name!r}, pretrained=True, "
              f"pretrained_cfg_overlay=dict(file={str(output)!r}){extra})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
