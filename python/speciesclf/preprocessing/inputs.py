"""Turning what users pass (bytes, paths, arrays, PIL images) into encoded bytes or RGB-able pixel arrays."""

from __future__ import annotations

import os
import stat
from typing import Union

import numpy as np
from PIL import Image

from ..errors import ImageReadError, ImageTooLargeError, InvalidImageError
from .spec import DEFAULT_MAX_PIXELS

ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", np.ndarray, Image.Image]

__all__ = ["ImageInput", "as_source", "check_pixel_count"]


def read_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ImageReadError / ImageTooLargeError otherwise."""
    name = repr(os.fspath(path))
    if "\0" in os.fsdecode(path):
        # os.stat would raise ValueError ("embedded null byte"): no file can have such a name.
        raise ImageReadError(f"cannot read {name}: the path contains a NUL byte")
    try:
        # Devices, FIFOs and sockets are refused before they are opened: st_size says nothing about them
        # (/dev/zero never ends, a FIFO blocks until a writer comes).
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageReadError(f"cannot read {name}: not a regular file")
        # O_NONBLOCK: should the path be swapped for a FIFO after the check, opening it cannot hang either.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageReadError(f"cannot read {name}: not a regular file")
            if st.st_size > max_bytes:
                raise ImageTooLargeError(f"{name}: {st.st_size} bytes exceeds max_bytes={max_bytes}")
            data = f.read(max_bytes + 1)
    except OSError as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(f"cannot read {name}: {e.strerror or e}") from None
    # The file may have grown since fstat: what was read is what counts.
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{name}: more than max_bytes={max_bytes} bytes")
    return data


def as_source(item: object, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes | memoryview | np.ndarray:
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
        return _as_pixels(item, max_pixels)
    if isinstance(item, Image.Image):
        from ._pillow_backend import to_rgb

        try:
            pixels = np.asarray(to_rgb(item))
        except (OSError, ValueError) as e:
            raise InvalidImageError(f"cannot convert PIL image of mode {item.mode!r} to RGB: {e}") from None
        # The same shape and empty checks as arrays: a 0x0 image would crash the Pillow backend's resize.
        return _as_pixels(pixels, max_pixels)
    raise InvalidImageError(
        f"unsupported input type {type(item).__name__}: pass bytes, a path, a uint8 array or a PIL image"
    )


def check_pixel_count(height: int, width: int, max_pixels: int) -> None:
    """In-memory pixels are held to the same ``max_pixels`` as decoded images: a broadcast array or an
    expanded tensor costs nothing until it is copied, and the copy would fail the whole batch."""
    if height * width > max_pixels:
        raise ImageTooLargeError(f"{width}x{height} pixels exceeds max_pixels={max_pixels}")


def _as_pixels(array: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InvalidImageError(f"pixel arrays must be uint8, got {array.dtype}")
    if array.ndim == 1:
        return np.ascontiguousarray(array)  # encoded bytes, e.g. from numpy.fromfile
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InvalidImageError(f"pixel arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidImageError(f"pixel array has no pixels: shape {array.shape}")
    check_pixel_count(array.shape[0], array.shape[1], max_pixels)
    return np.ascontiguousarray(array)
