"""decode(): one encoded image to an upright HxWx3 uint8 RGB array."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np

from . import _backend, _formats
from ._pillow_backend import open_upright
from ..errors import CODEC_UNAVAILABLE, error_from_status
from .inputs import read_file
from .spec import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

__all__ = ["decode", "image_size"]


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


# How much of a file image_size() hands the native header reader: real files have their frame header in the
# first few kilobytes; a hostile one may hold millions of empty markers before it. Past this, the decoder
# decides (with the same header reader and the same limits).
_HEADER_BYTES = 256 * 1024


def image_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """The stored (width, height) of an encoded image, read from its header by the decoder that would decode
    it (the native core's probe; Pillow for the formats it leaves to Pillow), without decoding a pixel.

    None when the header cannot be read cheaply (not an image, a damaged header, a JPEG whose frame header
    lies past the first 256 KiB, a JPEG without the native core): the decoder then decides, under the same
    limits. Width and height are as stored, before EXIF orientation (which swaps them, never their product).
    """
    fmt = _formats.sniff_format(data)
    if fmt is None:
        return None
    native = _backend._native
    if native is not None:
        status, _, width, height = native.probe(memoryview(data)[:_HEADER_BYTES])
        if status == 0:
            return width, height
        if status != CODEC_UNAVAILABLE:
            return None
    if fmt == _formats.JPEG:
        return None  # Pillow's JPEG header reader steps through markers byte by byte, in Python
    try:
        from PIL import Image

        with warnings.catch_warnings():  # "corrupt EXIF" and the like: the decoder's business, not the log's
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=[fmt]) as image:  # reads the header only
                return image.size
    except Exception:  # any header Pillow cannot read: the decoder reports it properly
        return None
