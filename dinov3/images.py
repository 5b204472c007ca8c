"""Reading image files as 8-bit RGB, shared by the trainer and the console scripts.

``load_rgb(path)`` returns a ``PIL.Image`` in mode "RGB", upright (EXIF orientation applied, first frame of an
animation or multi-page file), or raises ``UnreadableImage`` with a one-line reason. Callers decide what a bad file
means: the trainer and the console scripts skip it and count it.

Pixel values are scaled, never clipped at 255:

- 8-bit modes (L, P, PA, LA, RGBA, CMYK, YCbCr, 1, ...) go through ``Image.convert("RGB")`` (alpha dropped).
- 16-bit grayscale (modes I;16, I;16L, I;16B) spans 0..65535: value / 257, rounded. ``convert("RGB")`` would clip
  everything above 255, which turns a full-range 16-bit PNG ~99.6 % white.
- 16-bit RGB and RGBA (48/64-bit PNG or TIFF) are reduced by Pillow itself to their high byte while decoding: within
  one level of value / 257, nothing to correct.
- 32-bit integer (mode I) and float (mode F) carry no nominal range, so it is read from the data: the smallest of
  1 (float only), 255 and 65535 that holds the brightest pixel. Floats may exceed it by up to a factor 2 (resampling
  overshoot, clipped): a float TIFF in [0, 1] and one in [0, 255] both come out right. Brighter data than
  65535 (x2 for floats) has no known range and is refused. Values below 0 (and NaN) become 0: signed data such as
  [-1, 1] is not recognised.
- More pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's decompression-bomb limit, ~89 MP; raise it to accept
  larger files) is refused before decoding.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImage", "center_square", "load_rgb", "to_rgb8"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

# Nominal ranges tried in order for modes I and F (see the module docstring), and the overshoot allowed for floats.
_FLOAT_RANGES = (1.0, 255.0, 65535.0)
_INT_RANGES = (255.0, 65535.0)
_FLOAT_OVERSHOOT = 2.0


class UnreadableImage(Exception):
    """``path`` cannot be used as an image; ``reason`` says why in a few words."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _nominal_range(values: np.ndarray, is_float: bool) -> float:
    finite = values[np.isfinite(values)] if is_float else values
    if finite.size == 0:
        raise ValueError("no finite pixel values")
    top = float(finite.max())
    slack = _FLOAT_OVERSHOOT if is_float else 1.0
    for nominal in _FLOAT_RANGES if is_float else _INT_RANGES:
        if top <= nominal * slack:
            return nominal
    kind = "float" if is_float else "32-bit integer"
    raise ValueError(f"{kind} pixel values up to {top:g} have no known range (at most 1, 255 or 65535 expected)")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB, scaling high bit depths as the module docstring says (ValueError if unknown)."""
    mode = img.mode
    if mode.startswith("I;16"):
        values, nominal = np.asarray(img).astype(np.float64), 65535.0
    elif mode in ("I", "F"):
        values = np.asarray(img).astype(np.float64)
        nominal = _nominal_range(values, is_float=mode == "F")
    else:
        return img if img.mode == "RGB" else img.convert("RGB")
    values = np.nan_to_num(values, nan=0.0, posinf=nominal, neginf=0.0)
    gray = np.clip(np.rint(values * (255.0 / nominal)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_AXES = (5, 6, 7, 8)


def _request_draft(img: Image.Image, reduce_for) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when ``reduce_for(upright size)`` says how much is needed."""
    if img.format != "JPEG":
        return
    swap = img.getexif().get(0x0112, 1) in _SWAPS_AXES
    w, h = img.size
    need = reduce_for((h, w) if swap else (w, h))
    if need is not None:
        img.draft(img.mode, (need[1], need[0]) if swap else tuple(need))


def load_rgb(path: str | os.PathLike, *, reduce_for=None) -> Image.Image:
    """The image at ``path`` as upright 8-bit RGB; ``UnreadableImage`` if it is missing, empty, not an image,
    truncated or corrupt, too large, or of an unknown value range.

    ``reduce_for``: called with the upright (width, height) before decoding a JPEG; it returns the smallest upright
    size the caller needs (or None: full size). The JPEG is then decoded at the smallest of the scales 1/2, 1/4, 1/8
    (DCT scaling) that keeps at least that size, so the image returned is that integer factor smaller than the
    file (each side rounded up)."""
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file (0 bytes)")
    except OSError as exc:
        raise UnreadableImage(path, exc.strerror or str(exc)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF, palette and TIFF-tag warnings are noise here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Opened from our own file object, so closing the file leaves the decoded pixels valid (closing a
            # Pillow image frees them): no copy of a large image is needed.
            with open(path, "rb") as f:
                upright = Image.open(f)
                if reduce_for is not None:
                    _request_draft(upright, reduce_for)
                upright.load()  # decode now: a truncated file fails here, inside the try
                ImageOps.exif_transpose(upright, in_place=True)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(path, f"too many pixels ({exc})") from None
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not an image file Pillow can decode") from None
    except OSError as exc:
        if exc.errno is not None:  # the file system, not the decoder
            raise UnreadableImage(path, exc.strerror or str(exc)) from None
        raise UnreadableImage(path, f"truncated or corrupt ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise ValueError, SyntaxError, struct.error, EOFError, ...
        raise UnreadableImage(path, f"cannot decode ({type(exc).__name__}: {exc})") from None
    try:
        return to_rgb8(upright)
    except ValueError as exc:  # values of unknown range
        raise UnreadableImage(path, str(exc)) from None


def center_square(img: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """The largest centred square of ``img``, resized to size x size (``Image.NEAREST`` for label masks)."""
    return ImageOps.fit(img, (size, size), resample)
