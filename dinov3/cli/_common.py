"""Shared pieces of the console scripts: error reporting, argument types, device and output checks, image discovery
and preprocessing, model loading.

A user error (a bad argument, a missing input, an output that cannot be written, weights that do not fit the model)
is raised as ``CLIError`` and printed by ``run_cli`` as ``PROG: error: MESSAGE`` with exit status 2, like argparse's
own errors; anything else is a bug and keeps its traceback. Checks that need no compute (device, outputs, inputs,
model arguments) run before the model is loaded. A file that cannot be used as an image is not an error: it is
skipped, reported and counted (``Report``), as the trainer does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from dinov3.images import IMAGE_EXTENSIONS, UnreadableImage, load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Without an explicit size, images are downscaled to this longer side: a 12 MP photo at patch 16 would be ~47k tokens.
DEFAULT_MAX_SIDE = 1024


# ------------------------------------------------------------------------------------------ errors and reporting
class CLIError(Exception):
    """A user error: ``run_cli`` prints it as ``PROG: error: MESSAGE`` and exits with status 2, without traceback."""


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None, prog: str) -> int:
    """Run ``main(argv)``; turn CLIError into a message on stderr and exit status 2, Ctrl-C into status 130."""
    try:
        return main(argv)
    except CLIError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


class Report:
    """Warnings and notes of one run, on stderr, prefixed by the program name and printed above any progress bar.
    Keeps the skipped files (path, reason) for the summary and the outputs."""

    def __init__(self, prog: str):
        self.prog = prog
        self.skipped: list[tuple[str, str]] = []
        self.downscaled = 0
        self.max_side = 0

    def say(self, kind: str, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"{self.prog}: {kind}: {message}", file=sys.stderr)

    def skip(self, path, reason: str) -> None:
        self.skipped.append((str(path), reason))
        self.say("warning", f"skipping {path}: {reason}")

    def note_downscaled(self, path, before: tuple[int, int], after: tuple[int, int], max_side: int) -> None:
        """Said in full for the first image, counted for the others (see ``summary``)."""
        self.downscaled += 1
        self.max_side = max_side
        if self.downscaled == 1:
            self.say("note", f"{path} is {before[0]}x{before[1]} pixels: downscaled to {after[0]}x{after[1]} "
                             f"(longer side {max_side}; --max-side sets the limit, 0 removes it)")

    def summary(self, n_inputs: int) -> None:
        if self.downscaled > 1:
            self.say("note", f"{self.downscaled} images were downscaled to a longer side of {self.max_side} pixels")
        if self.skipped:
            self.say("warning", f"{len(self.skipped)} of {n_inputs} input files skipped (reasons above)")


# ------------------------------------------------------------------------------------------------ argument types
def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def add_max_side_arg(parser: argparse.ArgumentParser, applies: str) -> None:
    parser.add_argument("--max-side", type=nonnegative_int, default=DEFAULT_MAX_SIDE,
                        help=f"{applies}, images whose longer side exceeds this many pixels are downscaled to it, "
                             f"with a note (default {DEFAULT_MAX_SIDE}; 0 = no limit)")


# ------------------------------------------------------------------------------------------- device and outputs
_DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """``name`` as a usable torch.device ("auto": cuda when available, else cpu); CLIError if it cannot be used."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"{option} {name!r} is not a device; use {_DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible to PyTorch")
            raise CLIError(f"{option} {name}: {why}; use {option} cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise CLIError(f"{option} {name}: there are {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"{option} {name}: MPS (Apple GPU) is not available here; use {option} cpu")
        return dev
    raise CLIError(f"{option} {name}: device type {dev.type!r} is not supported; use {_DEVICE_CHOICES}")


def check_output_file(path: Path, option: str) -> None:
    """CLIError unless ``path`` can be written as a file (its missing folders created). Creates nothing."""
    if path.is_dir():
        raise CLIError(f"{option} {path} is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise CLIError(f"{option} {path} exists and is not writable")
    _check_can_create_in(path.parent, option)


def check_output_dir(path: Path, option: str) -> None:
    """CLIError unless files can be written in folder ``path`` (created if missing). Creates nothing."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {path} is a file, not a folder")
    _check_can_create_in(path, option)


def _check_can_create_in(folder: Path, option: str) -> None:
    # The nearest existing ancestor must be a folder we can write in: try it (permission bits say nothing for root
    # and nothing about read-only file systems).
    existing = folder if str(folder) else Path(".")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"{option}: cannot create {folder}: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dinov3-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CLIError(f"{option}: cannot write in {existing}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------------- images
def find_images(inputs: list[str], report: Report) -> list[Path]:
    """Files as given, plus the image files under folders (recursive, sorted, hidden files left out).

    CLIError for a path that does not exist, a file written as a folder ("photo.jpg/"), or no image at all; a folder
    without images is a warning when other inputs have some. Files given by name are kept whatever their extension:
    ``load_rgb`` decides.
    """
    found: list[Path] = []
    empty: list[str] = []
    for item in inputs:
        p = Path(item)
        if item.endswith(("/", os.sep)) and p.is_file():
            raise CLIError(f"{item} is a file, not a folder")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
            if not images:
                others = f" ({len(files)} other files, e.g. {files[0].name})" if files else " (it is empty)"
                empty.append(f"{item}{others}")
            found += images
        elif p.is_file():
            found.append(p)
        else:
            raise CLIError(f"no such file or folder: {item}")
    unique: dict[str, Path] = {}
    for f in found:  # each file once, where it first appears
        unique.setdefault(os.path.realpath(f), f)
    found = list(unique.values())
    extensions = " ".join(IMAGE_EXTENSIONS)
    if not found:
        raise CLIError(f"no image files ({extensions}) in {'; '.join(empty)}")
    for item in empty:
        report.say("warning", f"no image files in {item}")
    return found


def check_size_args(size: int | None, max_side: int, patch: int) -> None:
    """--size and --max-side against the model's patch size (known once the model is loaded, before any image)."""
    if size is not None and size < patch:
        raise CLIError(f"--size {size} is smaller than the patch size {patch}")
    if 0 < max_side < patch:
        raise CLIError(f"--max-side {max_side} is smaller than the patch size {patch}")


def downscale_to(img, max_side: int):
    """``img`` resized (bicubic, antialiased) so that its longer side is ``max_side``, aspect kept."""
    from PIL import Image

    w, h = img.size
    s = max_side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=3.0)


def resize_to_patch_multiple(img, patch: int, size: int | None, square: bool):
    """Resize (bicubic) then centre-crop so both sides are multiples of ``patch``.

    size None: keep the resolution (crop only). square: resize to size x size. Otherwise the shorter side becomes
    ``size`` (aspect kept). The caller makes sure size >= patch and that the image holds one patch.
    """
    from PIL import Image

    w, h = img.size
    if size is not None:
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
    left, top = (w - cw) // 2, (h - ch) // 2
    if (cw, ch) != (w, h):
        img = img.crop((left, top, left + cw, top + ch))
    return img


def prepare_image(path: Path, report: Report, *, patch: int, size: int | None, square: bool, max_side: int):
    """Load, bound and resize one input for the model: the PIL image, or None when it was skipped (reported)."""
    try:
        img = load_rgb(path)
    except UnreadableImage as exc:
        report.skip(exc.path, exc.reason)
        return None
    if size is None and max_side and max(img.size) > max_side:
        before = img.size
        img = downscale_to(img, max_side)
        report.note_downscaled(path, before, img.size, max_side)
    if size is None and min(img.size) < patch:
        report.skip(path, f"{img.size[0]}x{img.size[1]} pixels is smaller than one {patch}x{patch} patch")
        return None
    return resize_to_patch_multiple(img, patch, size, square)


def to_normalized_tensor(img) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 with ImageNet mean/std normalisation."""
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# ------------------------------------------------------------------------------------------------------- model
def add_model_args(parser: argparse.ArgumentParser, *, compute: bool = True) -> None:
    """--checkpoint, --arch, --model-kwargs; with ``compute``, also --device and --dtype."""
    parser.add_argument("--checkpoint", required=True,
                        help="backbone weights: a backbone.pth written by dinov3-train (its backbone.json beside it "
                             "says the model), a dinov3-train checkpoint (checkpoints/checkpoint_*.pth: the EMA "
                             "teacher), a file or folder written by dinov3-export, or official .pth/.safetensors "
                             "weights (with --arch)")
    parser.add_argument("--arch", default=None,
                        help="model size, needed when the checkpoint does not say it: vit_small, vit_small_plus, "
                             "vit_base, vit_large, vit_large_plus, vit_huge_plus, vit_7b (or vits16, vitb16, ...), or "
                             "a size dinov3-train builds (vit_tiny, vit_nano); with a checkpoint that says its model, "
                             "it must agree with the weights")
    parser.add_argument("--model-kwargs", default=None,
                        help='JSON of DinoVisionTransformer keyword overrides, e.g. \'{"attn_backend": "reference"}\'')
    if compute:
        parser.add_argument("--device", default="auto", help=f"{_DEVICE_CHOICES} (auto: cuda when available)")
        parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                            help="autocast dtype on CUDA (features are stored in fp32)")


def check_model_kwargs(kwargs: Mapping, source: str) -> None:
    from dinov3.models.vision_transformer import check_model_kwargs as check

    try:
        check(kwargs, source)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def parse_model_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--model-kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise CLIError("--model-kwargs must be a JSON object, e.g. '{\"patch_size\": 8}'")
    check_model_kwargs(kwargs, "--model-kwargs")
    return kwargs


def read_weights(path: Path):
    """Read ``--checkpoint`` (``dinov3.models.checkpoint.read_backbone``): its backbone tensors and, where the files
    say it, its model."""
    from dinov3.models.checkpoint import WeightsFileError, read_backbone

    try:
        return read_backbone(path)
    except WeightsFileError as exc:
        # Messages about the weights file start with its path; others (a JSON beside it) name their own file.
        message = str(exc)
        raise CLIError(f"--checkpoint {message}" if message.startswith(str(path)) else message) from None


def load_model(args, device: torch.device) -> torch.nn.Module:
    """The backbone of ``--checkpoint`` on ``device``, in eval mode.

    Model arguments, later ones winning: what the checkpoint says (backbone.json, training config, export metadata,
    Hugging Face config), else the released defaults plus the untie flags read off the weights; the size entries of
    ``--arch``; ``--model-kwargs``. The weights must then fit exactly (a mismatch lists the differing keys and shapes).
    """
    from dinov3.models.checkpoint import CheckpointMismatchError
    from dinov3.models.pretrained import build_from_weights

    overrides = parse_model_kwargs(args.model_kwargs)
    path = Path(args.checkpoint)
    weights = read_weights(path)
    try:
        model = build_from_weights(weights, path, args.arch, overrides, option="--arch")
    except CheckpointMismatchError as exc:
        raise CLIError(f"--checkpoint {exc}") from None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return model.to(device).eval()


def autocast_context(device: torch.device, dtype: str):
    if dtype == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
