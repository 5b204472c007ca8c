"""dinov3/images.py: every image file as 8-bit RGB with its brightness kept, or UnreadableImage with a reason."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dinov3 import images
from dinov3.images import UnreadableImage, load_rgb
from dinov3.train import data

# Both readers the package uses: the trainer's must be the shared one.
LOADERS = [pytest.param(images.load_rgb, id="images"), pytest.param(data.load_rgb, id="train.data")]


def write_png16(path, values: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 48/64-bit ones): color_type 0 gray, 2 RGB, 6 RGBA."""
    h, w = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    _write_png(path, struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0), zlib.compress(rows))


def _write_png(path, ihdr: bytes, idat: bytes) -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def png_header_only(path, width: int, height: int) -> None:
    """A few bytes that claim width x height 8-bit RGB pixels: a decompression bomb's header."""
    _write_png(path, struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0), zlib.compress(b""))


def gradient16(h=24, w=40) -> np.ndarray:
    return np.linspace(0, 65535, h * w).round().reshape(h, w).astype(np.uint16)


@pytest.mark.parametrize("load", LOADERS)
def test_16bit_gray_png_keeps_its_brightness(tmp_path, load):
    values = gradient16()
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"  # what the fix is about: convert("RGB") clips this at 255
    rgb = np.asarray(load(path)).astype(np.float64)
    assert rgb.shape == (24, 40, 3) and (rgb == 255).mean() < 0.01
    np.testing.assert_allclose(rgb[..., 0], values / 257.0, atol=0.5)
    assert abs(rgb.mean() - 127.5) < 0.5


def test_16bit_big_endian_tiff(tmp_path):
    values = gradient16()
    path = tmp_path / "g16b.tif"
    Image.frombytes("I;16B", (40, 24), values.astype(">u2").tobytes()).save(path)
    assert Image.open(path).mode == "I;16B"
    np.testing.assert_allclose(np.asarray(load_rgb(path))[..., 1], values / 257.0, atol=0.5)


@pytest.mark.parametrize("color_type, channels", [(2, 3), (6, 4)], ids=["rgb48", "rgba64"])
def test_16bit_color_png(tmp_path, color_type, channels):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (8, 12, channels), dtype=np.uint16)
    path = tmp_path / "c.png"
    write_png16(path, values, color_type)
    rgb = np.asarray(load_rgb(path)).astype(np.float64)
    # Pillow keeps the high byte while decoding: within one level of value / 257
    assert np.abs(rgb - values[..., :3] / 257.0).max() <= 1.0


@pytest.mark.parametrize("scale", [1.0, 255.0, 65535.0])
def test_float_tiff_range_read_from_the_data(tmp_path, scale):
    rng = np.random.default_rng(1)
    unit = rng.random((16, 20)).astype(np.float32)
    path = tmp_path / "f.tif"
    Image.fromarray(unit * np.float32(scale)).save(path)
    assert Image.open(path).mode == "F"
    np.testing.assert_allclose(np.asarray(load_rgb(path))[..., 2], unit * 255.0, atol=0.51)


def test_float_overshoot_clipped_nan_black_and_unknown_range_refused(tmp_path):
    values = np.array([[0.0, 0.5, 1.3, np.nan, -0.2]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "over.tif")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "over.tif"))[0, :, 0], [0, 128, 255, 0, 0])
    Image.fromarray(np.array([[0.0, 2.0e5]], dtype=np.float32)).save(tmp_path / "huge.tif")
    with pytest.raises(UnreadableImage, match="no known range"):
        load_rgb(tmp_path / "huge.tif")


def test_32bit_integer(tmp_path):
    Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32)).save(tmp_path / "i16.tif")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "i16.tif"))[0, :, 0], [0, 1, 255])
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32)).save(tmp_path / "i8.tif")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "i8.tif"))[0, :, 0], [0, 100, 255])
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(UnreadableImage, match="32-bit integer pixel values up to 70000"):
        load_rgb(tmp_path / "i32.tif")


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "YCbCr"])
def test_8bit_modes(tmp_path, mode):
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (10, 14, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("m.tif" if mode in ("CMYK", "YCbCr") else "m.png")
    img.save(path)
    assert Image.open(path).mode == mode
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (14, 10)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(Image.open(path).convert("RGB")))


def test_exif_orientation(tmp_path):
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, 16:] = 255  # dark left half, bright right half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after a 90 degree clockwise turn
    Image.fromarray(pixels).save(tmp_path / "o.jpg", exif=exif)
    out = np.asarray(load_rgb(tmp_path / "o.jpg")).mean(-1)
    assert out.shape == (32, 16) and out[:14].max() < 30 and out[18:].min() > 225


def _truncated(path, fmt):
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BROKEN = {
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "text.jpg": (lambda p: p.write_text("not a picture"), "not an image"),
    "cut.png": (lambda p: _truncated(p, "PNG"), "truncated"),
    "cut.jpg": (lambda p: _truncated(p, "JPEG"), "truncated"),
    "bomb.png": (lambda p: png_header_only(p, 20000, 20000), "too many pixels"),  # > 2x the limit: Pillow's error
    "big.png": (lambda p: png_header_only(p, 10000, 10000), "too many pixels"),  # over the limit: Pillow warns
    "folder.png": (lambda p: p.mkdir(), "directory"),
    "missing.png": (lambda p: None, "No such file"),
}


@pytest.mark.parametrize("name", list(BROKEN))
@pytest.mark.parametrize("load", LOADERS)
def test_unreadable_files_raise_with_a_reason(tmp_path, name, load):
    make, reason = BROKEN[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(UnreadableImage) as info:
        load(path)
    assert info.value.path == str(path) and reason in info.value.reason
    assert str(info.value).startswith(f"{path}: ")
