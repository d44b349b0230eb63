"""Decoding 2-D image files: images as float32 (C, H, W) in [0, 1], masks as integer label maps.

Images may be PNG, JPEG or TIFF (grey, RGB or RGBA; 8 or 16 bit); a mask is a grey label map
(0 = background, other integers = labels), lossless. How labels become mask channels is
:mod:`.labels`; which files of a folder are images and masks is :mod:`.layouts`.

Every problem with a file raises :class:`~medsegdiff_core.errors.DataError` with a one-line
message that starts with the offending path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

__all__ = ["IMAGE_SUFFIXES", "read_display_image", "read_image", "read_label_map"]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
"""Image file suffixes recognised in ``images/`` (case-insensitive)."""


def _open_fully(path: Path) -> Image.Image:
    """Open and fully decode an image, so a truncated file fails here rather than later."""
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy()
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except UnidentifiedImageError:
        # PIL's own message repeats the path; say what it means instead.
        what = "file is empty" if path.stat().st_size == 0 else "not an image in a known format"
        raise DataError(f"{path}: cannot read image ({what})") from None
    except Exception as error:  # PIL's decoders raise many exception types for bad data
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: cannot read image ({reason})") from error


_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _as_8bit(image: Image.Image) -> Image.Image:
    """An 8-bit image as grey ("L") or RGB; alpha, palettes and other colour spaces converted."""
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def _to_float(image: Image.Image) -> np.ndarray:
    """A decoded image as float32 (C, H, W) in [0, 1], never through float64: a float64 copy of
    an 8000 x 8000 photo is 1.5 GB, and the model works in float32 anyway."""
    mode = image.mode
    if mode in _HIGH_DEPTH_MODES:
        array = np.divide(np.asarray(image), np.float32(65535.0), dtype=np.float32)
        return np.clip(array, 0.0, 1.0, out=array)[None]
    if mode == "F":
        array = np.asarray(image, dtype=np.float32).copy()
        low, high = float(array.min()), float(array.max())
        if high > low:
            array -= low
            array /= high - low
        else:
            array[...] = 0.0
        return np.clip(array, 0.0, 1.0, out=array)[None]
    pixels = np.asarray(_as_8bit(image))
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    # One float32 plane per channel, written in place: (C, H, W) without a transposed copy.
    out = np.empty((pixels.shape[2], *pixels.shape[:2]), np.float32)
    for channel in range(pixels.shape[2]):
        np.divide(pixels[..., channel], np.float32(255.0), out=out[channel])
    return out


def read_image(path: Path) -> np.ndarray:
    """Read an image as float32 (C, H, W) scaled to [0, 1].

    Grey images give C = 1 and colour images C = 3 (an alpha channel is dropped); 16-bit images
    are scaled by 65535, 8-bit by 255. Floating-point TIFFs are min-max scaled.

    Raises:
        DataError: The file is missing, truncated, corrupt or not an image.
    """
    return _to_float(_open_fully(Path(path)))


def read_display_image(path: Path) -> np.ndarray:
    """Read an image as it is drawn under an overlay: uint8 (H, W) grey or (H, W, 3) RGB for
    8-bit files, whose pixels need no arithmetic (a fifth of float32's memory); 16-bit and
    floating-point files as :func:`read_image` scales them.

    Raises:
        DataError: As :func:`read_image`.
    """
    image = _open_fully(Path(path))
    if image.mode in _HIGH_DEPTH_MODES or image.mode == "F":
        return _to_float(image)
    return np.asarray(_as_8bit(image))


def read_label_map(path: Path) -> np.ndarray:
    """Read a mask as an int64 (H, W) label map.

    Grey PNGs (8 or 16 bit) are read as is, palette PNGs by palette index. An RGB(A) mask is
    accepted only when its three channels are equal (a grey map saved as colour).

    Raises:
        DataError: The file is unreadable, or is a colour or non-integer image.
    """
    path = Path(path)
    image = _open_fully(path)
    mode = image.mode
    if mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(image)[..., :3]
        if not (rgb == rgb[..., :1]).all():
            raise DataError(
                f"{path}: mask is a colour image; save masks as grey label maps "
                "(0 = background, 1, 2, ... = labels)"
            )
        return rgb[..., 0].astype(np.int64)
    if mode in ("LA", "La"):
        return np.asarray(image.getchannel(0)).astype(np.int64)
    if mode in ("1", "L", "P") or mode.startswith("I"):
        return np.asarray(image).astype(np.int64)
    if mode == "F":
        values = np.asarray(image)
        if np.all(np.isfinite(values)) and np.array_equal(values, np.round(values)):
            return values.astype(np.int64)
    raise DataError(f"{path}: mask must be an integer grey label map, got image mode {mode}")
