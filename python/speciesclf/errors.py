"""Typed errors for images that cannot be used, and the one table that maps native status codes to them."""

from __future__ import annotations

__all__ = [
    "ImageError",
    "EmptyInputError",
    "UnsupportedFormatError",
    "DecodeError",
    "ImageTooLargeError",
    "InvalidImageError",
    "ImageReadError",
    "CudaUnavailableError",
    "GpuError",
    "ModelOutputError",
]


class ImageError(Exception):
    """An input that is not a usable image. Raised for one item; the rest of a batch is unaffected."""


class EmptyInputError(ImageError, ValueError):
    """The input has no bytes (or no pixels)."""


class UnsupportedFormatError(ImageError, ValueError):
    """The bytes are not an image format speciesclf reads (the format is sniffed from the bytes)."""


class DecodeError(ImageError, ValueError):
    """The format is known but the data is corrupt or truncated. The message carries the codec's own words."""


class ImageTooLargeError(ImageError, ValueError):
    """More pixels (``max_pixels``, a decompression-bomb guard) or bytes (``max_bytes``) than allowed."""


class InvalidImageError(ImageError, TypeError):
    """An input of the wrong type or shape (e.g. a float array, or 2 channels)."""


class ImageReadError(ImageError, OSError):
    """A path that could not be read."""


class CudaUnavailableError(RuntimeError):
    """GPU work was asked for where it cannot run: a build without CUDA, no driver, or no GPU."""


class GpuError(RuntimeError):
    """The GPU failed a whole batch (a CUDA error, out of device memory). Image errors stay per item."""


class ModelOutputError(RuntimeError):
    """The model's scores for one item are not finite numbers (NaN or infinity): a broken model or runtime,
    not a bad image. Reported on that item's prediction; the rest of the batch is unaffected."""


# Status codes of csrc/status.h. kCodecUnavailable (3) never reaches users: Pillow decodes those items.
CODEC_UNAVAILABLE = 3
_STATUS_TO_ERROR: dict[int, type[ImageError]] = {
    1: EmptyInputError,
    2: UnsupportedFormatError,
    4: DecodeError,
    5: ImageTooLargeError,
    6: InvalidImageError,
    7: ImageError,  # out of memory while decoding one image
    8: ImageError,  # internal error: a bug, reported per image rather than taking the batch down
}


def error_from_status(status: int, message: str) -> ImageError:
    return _STATUS_TO_ERROR.get(status, ImageError)(message)
