"""Shared pieces of the console scripts: image discovery and preprocessing, model loading."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def find_images(inputs: list[str]) -> list[Path]:
    """Files as given, plus image files under folders (recursive, sorted); raises if none."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    if not found:
        raise ValueError(f"no images found in {inputs}")
    return found


def load_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def resize_to_patch_multiple(img, patch: int, size: int | None, square: bool):
    """Resize (bicubic) then centre-crop so both sides are multiples of ``patch``.

    size None: keep the native resolution (crop only). square: resize to size x size.
    Otherwise the shorter side becomes ``size`` (aspect kept).
    """
    from PIL import Image

    w, h = img.size
    if size is not None:
        if size < patch:
            raise ValueError(f"--size {size} is smaller than the patch size {patch}")
        if square:
            new_w = new_h = size
        elif w <= h:
            new_w, new_h = size, max(patch, round(h * size / w))
        else:
            new_w, new_h = max(patch, round(w * size / h)), size
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.BICUBIC)
        w, h = new_w, new_h
    cw, ch = w // patch * patch, h // patch * patch
    if cw == 0 or ch == 0:
        raise ValueError(f"image of {w}x{h} pixels is smaller than one {patch}x{patch} patch")
    left, top = (w - cw) // 2, (h - ch) // 2
    if (cw, ch) != (w, h):
        img = img.crop((left, top, left + cw, top + ch))
    return img


def to_normalized_tensor(img) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 with ImageNet mean/std normalisation."""
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="official .pth or .safetensors backbone weights")
    parser.add_argument("--arch", required=True,
                        help="vit_small, vit_small_plus, vit_base, vit_large, vit_large_plus, vit_huge_plus, vit_7b "
                             "(or vits16, vitb16, ...)")
    parser.add_argument("--model-kwargs", default=None,
                        help='JSON of DinoVisionTransformer keyword overrides, e.g. \'{"untie_global_and_local_cls_norm": true}\'')
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast dtype on CUDA (features are stored in fp32)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return dev


def load_model(args) -> torch.nn.Module:
    from dinov3.models import load_pretrained
    from dinov3.models.checkpoint import extract_backbone_state_dict, read_state_dict, untie_flags
    from dinov3.models.vision_transformer import build_model

    overrides = {}
    if args.model_kwargs:
        try:
            overrides = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model-kwargs is not valid JSON: {exc}") from None
        if not isinstance(overrides, dict):
            raise ValueError("--model-kwargs must be a JSON object")
    sd = extract_backbone_state_dict(read_state_dict(args.checkpoint))
    # e.g. the ViT-L SAT-493M weights carry local_cls_norm; explicit --model-kwargs win
    overrides = {**untie_flags(sd), **overrides}
    # Built on the meta device and materialised from the checkpoint: no wasted random init (7B).
    model = build_model(args.arch, device="meta", **overrides)
    load_pretrained(model, sd)
    return model.to(resolve_device(args.device)).eval()


def autocast_context(device: torch.device, dtype: str):
    if dtype == "fp32" or device.type != "cuda":
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def default_output_dir(image: Path, output_dir: str | None) -> Path:
    out = Path(output_dir) if output_dir else image.parent
    os.makedirs(out, exist_ok=True)
    return out
