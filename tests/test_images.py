"""Robust decoding: every image mode converts to RGB without losing range, every bad file is named with a reason."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from fgvc.data.images import ImageReadError, read_rgb


def gradient(height: int = 12, width: int = 16) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 15, y * 20, (x + y) * 7], axis=-1).astype(np.uint8)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_rgb_png_is_returned_exactly(tmp_path: Path) -> None:
    pixels = gradient()
    result = read_rgb(save(Image.fromarray(pixels), tmp_path / "a.png"))
    assert result.dtype == np.uint8 and result.shape == (12, 16, 3)
    np.testing.assert_array_equal(result, pixels)


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_greyscale_bilevel_and_palette_become_rgb(tmp_path: Path, mode: str) -> None:
    source = Image.fromarray(gradient()).convert(mode)
    result = read_rgb(save(source, tmp_path / "a.png"))
    np.testing.assert_array_equal(result, np.asarray(source.convert("RGB")))


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)  # opaque: unchanged
    rgba[0, 1] = (7, 99, 3, 0)  # transparent: white, not the hidden colour
    rgba[1, 0] = (255, 0, 0, 128)  # half: halfway to white
    rgba[1, 1] = (0, 0, 0, 255)
    result = read_rgb(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")).astype(int)
    np.testing.assert_array_equal(result[0, 0], (200, 10, 10))
    np.testing.assert_array_equal(result[0, 1], (255, 255, 255))
    np.testing.assert_allclose(result[1, 0], (255, 127, 127), atol=1)
    np.testing.assert_array_equal(result[1, 1], (0, 0, 0))


def test_grey_with_alpha_and_palette_transparency(tmp_path: Path) -> None:
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(read_rgb(save(la, tmp_path / "la.png"))[0], [[255] * 3, [50] * 3])
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    result = read_rgb(save(palette, tmp_path / "p.png", transparency=0))
    np.testing.assert_array_equal(result[0], [[255, 255, 255], [40, 50, 60]])


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    result = read_rgb(save(image, tmp_path / "a.png"))
    np.testing.assert_array_equal(result[0, :, 0], [0, 1, 128, 255])  # clipping would give 0, 255, 255, 255
    assert (result == result[..., :1]).all()


def write_png_rgb16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_16_bit_rgb_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    pixels = np.array([[[0, 32768, 65535], [4096, 512, 60000]]], dtype=np.uint16)
    result = read_rgb(write_png_rgb16(tmp_path / "a.png", pixels)).astype(int)
    np.testing.assert_allclose(result, pixels / 257.0, atol=1)


def test_cmyk_jpeg_converts(tmp_path: Path) -> None:
    cmyk = Image.fromarray(gradient()).convert("CMYK")
    path = save(cmyk, tmp_path / "a.jpg", quality=95)
    with Image.open(path) as image:
        assert image.mode == "CMYK"
        expected = np.asarray(image.convert("RGB"))  # no profile: Pillow's formula
    np.testing.assert_array_equal(read_rgb(path), expected)


def test_cmyk_with_a_profile_for_another_colour_space_is_an_error(tmp_path: Path) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = save(Image.new("CMYK", (4, 4), (0, 255, 0, 0)), tmp_path / "a.jpg", icc_profile=srgb)
    with pytest.raises(ImageReadError, match="cannot convert mode CMYK.*ICC profile"):
        read_rgb(path)


def test_floating_point_images_are_refused_not_guessed(tmp_path: Path) -> None:
    path = save(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), tmp_path / "a.tiff")
    with pytest.raises(ImageReadError, match="cannot convert mode F"):
        read_rgb(path)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = gradient(12, 16)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    path = save(Image.fromarray(pixels), tmp_path / "a.png", exif=exif)
    result = read_rgb(path)
    assert result.shape == (16, 12, 3)
    np.testing.assert_array_equal(result, np.rot90(pixels, k=-1))


def jpeg_bytes() -> bytes:
    path_bytes = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    from io import BytesIO

    buffer = BytesIO()
    path_bytes.save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "empty"),
    (b"just some notes, not an image\n", "not an image"),
    ("truncated", "truncated"),
    ("corrupt", "corrupt"),
])
def test_bad_files_are_named_with_a_reason(tmp_path: Path, content, reason: str) -> None:
    data = jpeg_bytes()
    if content == "truncated":
        content = data[: len(data) // 2]
    elif content == "corrupt":
        content = data[:200] + bytes(len(data) - 200)  # header intact, scan data destroyed
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=re.escape(str(path))) as caught:
        read_rgb(path)
    assert reason in caught.value.reason and caught.value.path == str(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="No such file"):
        read_rgb(tmp_path / "absent.jpg")


def test_decompression_bombs_are_refused(tmp_path: Path, monkeypatch) -> None:
    path = save(Image.fromarray(gradient(40, 50)), tmp_path / "a.png")
    for limit in (900, 1500):  # beyond twice Pillow's limit it raises; between once and twice it only warns
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ImageReadError, match="decompression bomb"):
            read_rgb(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    assert read_rgb(path).shape == (40, 50, 3)


def test_truncated_images_stay_errors_globally() -> None:
    from PIL import ImageFile

    assert not ImageFile.LOAD_TRUNCATED_IMAGES
