"""The pure-Python path: Pillow + NumPy with the native path's semantics, step for step.

It is the reference the native core is tested against, the fallback for formats a build does not decode
natively, and what runs when the extension is missing or SPECIESCLF_BACKEND=python.
"""

from __future__ import annotations

import io
import struct
import time
from typing import Callable

import numpy as np
from PIL import Image

from . import _formats
from ..errors import DecodeError, EmptyInputError, ImageError, ImageTooLargeError, UnsupportedFormatError
from .spec import PreprocessSpec, normalization_lut, plan_geometry

_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

# PIL.ImageOps.exif_transpose's table: EXIF orientation -> the transpose that makes the image upright.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_SIXTEEN_BIT_GRAY = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def reduction_for(fmt: str, upright: tuple[int, int], min_size: tuple[int, int] | None, margin: float) -> int:
    """Largest JPEG DCT reduction keeping the upright image >= margin * min_size; twin of csrc/decoder.cpp."""
    if fmt != _formats.JPEG or not min_size or min_size[0] <= 0 or min_size[1] <= 0 or not margin > 0:
        return 1
    for r in (8, 4, 2):
        if upright[0] >= float(r) * margin * min_size[0] and upright[1] >= float(r) * margin * min_size[1]:
            return r
    return 1


def upright_box(
    stored: tuple[int, int], reduction: int, decoded: tuple[int, int], orientation: int
) -> tuple[float, float, float, float]:
    """The source rectangle to resize from after a reduced decode; twin of upright_box in csrc/pipeline.cpp."""
    bw, bh = stored[0] / reduction, stored[1] / reduction
    dw, dh = float(decoded[0]), float(decoded[1])
    boxes = {
        2: (dw - bw, 0.0, dw, bh),
        3: (dw - bw, dh - bh, dw, dh),
        4: (0.0, dh - bh, bw, dh),
        5: (0.0, 0.0, bh, bw),
        6: (dh - bh, 0.0, dh, bw),
        7: (dh - bh, dw - bw, dh, dw),
        8: (0.0, dw - bw, bh, dw),
    }
    return boxes.get(orientation, (0.0, 0.0, bw, bh))


def to_rgb(image: Image.Image) -> Image.Image:
    """Pillow's convert("RGB"), except that 16-bit gray keeps its high byte instead of saturating."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        # The palette's colours are what we keep; going through RGBA is how Pillow wants a palette
        # with transparency converted (it warns otherwise). Alpha is then dropped, as convert("RGB") does.
        return image.convert("RGBA").convert("RGB")
    if image.mode in _SIXTEEN_BIT_GRAY:
        gray = np.asarray(image).astype(np.int64) >> 8
        return Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def open_upright(
    data: bytes,
    *,
    max_pixels: int,
    max_bytes: int,
    min_size: Callable[[tuple[int, int]], tuple[int, int] | None] | None = None,
    margin: float = 1.0,
) -> tuple[Image.Image, tuple[float, float, float, float], tuple[int, int]]:
    """Decode to an upright RGB image.

    ``min_size`` maps the full upright size to the smallest size the caller needs, which allows a
    reduced-size JPEG decode. Returns the image, the box to resize from (a reduced decode carries a
    fractional padding column) and the full-resolution upright size.
    """
    if len(data) == 0:
        raise EmptyInputError("empty input: 0 bytes")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{len(data)} bytes exceeds max_bytes={max_bytes}")
    fmt = _formats.sniff_format(data)
    if fmt is None:
        raise UnsupportedFormatError("unrecognised image format")
    if fmt == _formats.PNG:
        problem = _formats.png_crc_problem(data)
        if problem:
            raise DecodeError(f"PNG data: {problem}")
    orientation = _formats.exif_orientation(data, fmt)
    # We read the orientation ourselves; Pillow would parse the metadata again and warn about (JPEG's
    # EXIF) or refuse (PNG text past its limits) damage in it, which is no concern of the pixels.
    if fmt == _formats.JPEG:
        data = _formats.without_jpeg_exif(data)
    elif fmt == _formats.PNG:
        data = _formats.png_critical_chunks(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(str(e)) from None
    except Image.UnidentifiedImageError:
        raise DecodeError(f"{fmt} header: Pillow cannot read it (corrupt or truncated)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise DecodeError(f"{fmt} header: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{width}x{height} pixels exceeds max_pixels={max_pixels}")
    upright = (height, width) if orientation >= 5 else (width, height)
    reduction = reduction_for(fmt, upright, min_size(upright) if min_size else None, margin)
    if reduction > 1:
        image.draft(None, (width // reduction, height // reduction))
        if image.size != (-(-width // reduction), -(-height // reduction)):
            reduction = 1  # Pillow declined the draft: resize from the full image instead
    if fmt == _formats.JPEG:
        limit = _formats.jpeg_scan_limit(width * height)
        if _formats.jpeg_progressive_scans(data) > limit:
            raise DecodeError(f"JPEG: more than {limit} progressive scans")
    try:
        image.load()
        image = to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as e:
        raise DecodeError(f"{fmt}: {e}") from None
    box = upright_box((width, height), reduction, image.size, orientation)
    return apply_orientation(image, orientation), box, upright


def apply_orientation(image: Image.Image, orientation: int | None) -> Image.Image:
    """``image`` turned the way an EXIF ``orientation`` (1..8; None or 1: as it is) says it is shown."""
    transpose = _TRANSPOSE.get(orientation or 1)
    return image if transpose is None else image.transpose(transpose)


def pixels_to_image(pixels: np.ndarray) -> Image.Image:
    """An HxW, HxWx1, HxWx3 or HxWx4 uint8 array as RGB (gray replicated, alpha dropped)."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    if pixels.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(pixels), "L").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def write_output(rgb: np.ndarray, spec: PreprocessSpec, out: np.ndarray, lut: np.ndarray | None) -> None:
    """Normalise an (S, S, 3) uint8 image into one slot of the batch in the spec's dtype and layout."""
    if spec.dtype == "uint8":
        out[...] = rgb.transpose(2, 0, 1) if spec.layout == "NCHW" else rgb
        return
    assert lut is not None
    if spec.layout == "NCHW":
        for c in range(3):
            np.take(lut[c], rgb[:, :, c], out=out[c])
    else:
        for c in range(3):
            out[:, :, c] = lut[c][rgb[:, :, c]]


class PillowPreprocessor:
    """Preprocesses one input (encoded bytes or a pixel array) into a slot; raises ImageError."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        self.lut = None if spec.dtype == "uint8" else normalization_lut(spec)

    def __call__(self, item: bytes | np.ndarray, out: np.ndarray, seconds: np.ndarray | None = None) -> None:
        spec = self.spec
        start = time.perf_counter()
        if isinstance(item, np.ndarray) and item.ndim >= 2:
            image = pixels_to_image(item)
            upright = image.size
            box = (0.0, 0.0, float(upright[0]), float(upright[1]))
        else:
            image, box, upright = open_upright(
                bytes(item),
                max_pixels=spec.max_pixels,
                max_bytes=spec.max_bytes,
                min_size=lambda size: plan_geometry(*size, spec)[:2],
                margin=spec.jpeg_reduce_margin or 0.0,
            )
        decoded = time.perf_counter()
        new_w, new_h, left, top = plan_geometry(*upright, spec)
        try:
            resized = image.resize((new_w, new_h), _PIL_FILTERS[spec.interpolation], box=box)
        except MemoryError as e:
            raise ImageError(f"out of memory: {e}") from None
        except (OverflowError, ValueError) as e:  # Pillow's own size limits; plan_geometry refuses first
            raise ImageTooLargeError(f"cannot resize {upright[0]}x{upright[1]}: {e}") from None
        if spec.resize is not None:
            resized = resized.crop((left, top, left + spec.size, top + spec.size))
        write_output(np.asarray(resized), spec, out, self.lut)
        if seconds is not None:
            seconds[0], seconds[1] = decoded - start, time.perf_counter() - decoded
