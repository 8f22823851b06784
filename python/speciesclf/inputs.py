"""Turning what users pass (bytes, paths, arrays, PIL images) into encoded bytes or RGB-able pixel arrays."""

from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image

from .errors import ImageReadError, ImageTooLargeError, InvalidImageError

ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", np.ndarray, Image.Image]

__all__ = ["ImageInput", "as_source"]


def read_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise ImageTooLargeError(f"{os.fspath(path)!r}: {size} bytes exceeds max_bytes={max_bytes}")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as e:
        raise ImageReadError(f"cannot read {os.fspath(path)!r}: {e.strerror or e}") from None


def as_source(item: object, max_bytes: int) -> bytes | memoryview | np.ndarray:
    """Encoded bytes (a 1-D byte buffer) or an HxW[xC] uint8 array; raises ImageError for anything else."""
    if isinstance(item, (bytes, bytearray)):
        return item
    if isinstance(item, memoryview):
        if item.ndim != 1 or item.itemsize != 1 or not item.c_contiguous:
            raise InvalidImageError("a memoryview input must be contiguous bytes")
        return item
    if isinstance(item, (str, os.PathLike)):
        return read_file(item, max_bytes)
    if isinstance(item, np.ndarray):
        return _as_pixels(item)
    if isinstance(item, Image.Image):
        from ._pillow_backend import to_rgb

        try:
            return np.asarray(to_rgb(item))
        except (OSError, ValueError) as e:
            raise InvalidImageError(f"cannot convert PIL image of mode {item.mode!r} to RGB: {e}") from None
    raise InvalidImageError(
        f"unsupported input type {type(item).__name__}: pass bytes, a path, a uint8 array or a PIL image"
    )


def _as_pixels(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InvalidImageError(f"pixel arrays must be uint8, got {array.dtype}")
    if array.ndim == 1:
        return np.ascontiguousarray(array)  # encoded bytes, e.g. from numpy.fromfile
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InvalidImageError(f"pixel arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidImageError(f"pixel array has no pixels: shape {array.shape}")
    return np.ascontiguousarray(array)
