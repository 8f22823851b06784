"""decode(): one encoded image to an upright HxWx3 uint8 RGB array."""

from __future__ import annotations

import os

import numpy as np

from . import _backend
from ._pillow_backend import open_upright
from .errors import CODEC_UNAVAILABLE, error_from_status
from .inputs import read_file
from .spec import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

__all__ = ["decode"]


def decode(
    data: bytes | bytearray | memoryview | str | os.PathLike,
    *,
    min_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backend: str = "auto",
) -> np.ndarray:
    """Decode JPEG, PNG, WebP (natively) or GIF, BMP, TIFF (via Pillow) to (H, W, 3) uint8 RGB.

    EXIF orientation is applied. ``min_size=(width, height)`` allows a reduced-size JPEG decode (1/2, 1/4
    or 1/8) as long as the result stays at least that large. Raises an :class:`~speciesclf.ImageError`
    subclass for anything that is not a usable image.
    """
    if isinstance(data, (str, os.PathLike)):
        data = read_file(data, max_bytes)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode() takes bytes or a path, got {type(data).__name__}")
    min_w, min_h = min_size or (0, 0)
    if _backend.resolve(backend) == "native":
        status, message, array = _backend._native.decode(data, min_w, min_h, max_pixels, max_bytes)
        if status == 0:
            return array
        if status != CODEC_UNAVAILABLE:
            raise error_from_status(status, message)
    image, _, _ = open_upright(
        bytes(data), max_pixels=max_pixels, max_bytes=max_bytes, min_size=(lambda _: min_size) if min_size else None
    )
    return np.array(image)
