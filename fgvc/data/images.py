"""Decoding image files robustly: eagerly, into 8-bit RGB, with every failure named.

Pillow's defaults lose information quietly: `Image.open` is lazy (a corrupt file fails later, somewhere else),
16-bit images clip when converted, alpha is dropped without compositing, EXIF rotation is ignored, CMYK converts
without the file's colour profile, and a decompression bomb only warns below twice the pixel limit. `read_rgb`
handles each case explicitly and raises ImageReadError, naming the file and the reason, for everything it cannot
decode. `ImageFile.LOAD_TRUNCATED_IMAGES` stays off: a truncated file is an error, never a grey-filled image.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# Transparent pixels are composited over white: cut-out and product images are made to be shown on a white page,
# and their fully transparent pixels often hold arbitrary colours that a plain convert("RGB") would expose.
ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_SRGB = ImageCms.createProfile("sRGB")


class ImageReadError(OSError):
    """An image file that cannot be decoded; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = str(path), reason


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode `path` completely and return it as an H x W x 3 uint8 RGB array, EXIF orientation applied.

    Images above Pillow's pixel limit (PIL.Image.MAX_IMAGE_PIXELS, about 89 MP) are refused as possible
    decompression bombs; Pillow itself only warns between one and two times that limit.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageReadError(path, error.strerror or str(error)) from error
    if not data:
        raise ImageReadError(path, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # decode everything now: truncation and corruption surface here, with the path
            ImageOps.exif_transpose(image, in_place=True)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file Pillow can identify") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(path, f"refused as a possible decompression bomb ({error}); raise "
                                   "PIL.Image.MAX_IMAGE_PIXELS if the image is genuine") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:  # SyntaxError: Pillow's "broken PNG file"
        raise ImageReadError(path, f"corrupt or truncated image data ({error})") from None
    try:
        return to_rgb_array(image)
    except ValueError as error:
        raise ImageReadError(path, f"cannot convert mode {image.mode} to RGB: {error}") from None


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """An H x W x 3 uint8 RGB array of a decoded image in any Pillow mode, converted without losing range."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # 16-bit (and PNG's 16-bit read as "I"): scale 0..65535 to 0..255 rather than clip at 255.
        values = np.asarray(image, dtype=np.float64)
        if mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"32-bit integer image with values {values.min():.0f}..{values.max():.0f}: no known "
                             "range to scale to 8 bits")
        grey = np.rint(values / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        raise ValueError("floating-point image (mode F): no known range to scale to 8 bits")
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(image))
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image if mode == "RGB" else image.convert("RGB"))


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """CMYK through the file's own ICC profile when it has one (press profiles differ a lot), else Pillow's
    formula."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            return ImageCms.profileToProfile(image, ImageCms.ImageCmsProfile(io.BytesIO(profile)), _SRGB,
                                             outputMode="RGB")
        except ImageCms.PyCMSError as error:
            raise ValueError(f"CMYK image with an unusable ICC profile ({error})") from None
    return image.convert("RGB")
