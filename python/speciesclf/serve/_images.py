"""Cheap checks of one encoded image before it is queued: format (sniffed), size from the header."""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import re
import struct
import warnings

from .._formats import jpeg_markers, sniff_format

__all__ = ["ApiError", "decode_base64", "check_image", "image_dimensions"]


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*(?P<b64>;base64)?,", re.I)
_B64_STD = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")
_B64_URL = re.compile(rb"^[A-Za-z0-9_-]*={0,2}$")


def decode_base64(value: object, field: str = "image") -> bytes:
    """A base64 string or a ``data:`` URI -> bytes. Strict: anything else is ``invalid_base64``."""
    if not isinstance(value, str):
        raise ApiError(422, "invalid_request", f"{field!r} must be a base64 string or a data: URI")
    text = value
    if text[:5].lower() == "data:":
        match = _DATA_URI.match(text)
        if not match:
            raise ApiError(400, "invalid_base64", f"{field}: malformed data: URI")
        if not match.group("b64"):
            raise ApiError(400, "invalid_base64", f"{field}: data: URIs must be base64-encoded (;base64,)")
        text = text[match.end():]
    compact = re.sub(r"\s+", "", text).encode("ascii", "replace")
    if not compact:
        raise ApiError(400, "empty_input", f"{field}: the image is empty")
    try:
        if _B64_STD.match(compact):
            return base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
        if _B64_URL.match(compact):
            return base64.urlsafe_b64decode(compact + b"=" * (-len(compact) % 4))
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "invalid_base64", f"{field}: invalid base64 ({e})") from None
    raise ApiError(400, "invalid_base64", f"{field}: invalid base64 (characters outside the base64 alphabet)")


# Real files have a dozen markers before the frame header; a hostile one may hold millions of empty ones,
# and this runs on the event loop: past this many the decoder decides (in C).
_JPEG_MAX_MARKERS = 256


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    for marker, start, end in itertools.islice(jpeg_markers(data), _JPEG_MAX_MARKERS):
        if marker == 0xDA:  # the first scan: no frame header came before it
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if end - start < 9:
                return None
            height, width = struct.unpack_from(">HH", data, start + 5)
            return width, height
    return None


def _size_from_pillow(data: bytes) -> tuple[int, int] | None:
    """For formats without a parser above (TIFF): Pillow reads only the header until pixels are asked for."""
    try:
        from PIL import Image

        with warnings.catch_warnings():  # "corrupt EXIF" and the like: the decoder's business, not the log's
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception:  # any header Pillow cannot read: the decoder reports it properly
        return None


def image_dimensions(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header, or None when it cannot be read cheaply (the decoder decides)."""
    try:
        if fmt == "JPEG":
            return _jpeg_size(data)
        if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
            return struct.unpack_from(">II", data, 16)
        if fmt == "GIF" and len(data) >= 10:
            return struct.unpack_from("<HH", data, 6)
        if fmt == "BMP" and len(data) >= 26:
            (header,) = struct.unpack_from("<I", data, 14)
            if header == 12:
                return struct.unpack_from("<HH", data, 18)
            width, height = struct.unpack_from("<ii", data, 18)
            return abs(width), abs(height)
        if fmt == "WEBP" and len(data) >= 30:
            chunk = data[12:16]
            if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                w, h = struct.unpack_from("<HH", data, 26)
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L" and data[20] == 0x2F:
                (bits,) = struct.unpack_from("<I", data, 21)
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return w, h
        if fmt == "TIFF":
            return _size_from_pillow(data)
    except struct.error:
        return None
    return None


def check_image(data: bytes, *, min_side: int, max_pixels: int, field: str = "image") -> None:
    """Raise :class:`ApiError` for what can be refused before decoding."""
    if not data:
        raise ApiError(400, "empty_input", f"{field}: the image is empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(415, "unsupported_format",
                       f"{field}: not a supported image format (JPEG, PNG, WebP, GIF, BMP, TIFF; sniffed from the bytes)")
    size = image_dimensions(data, fmt)
    if size is None:
        return
    width, height = size
    if width * height > max_pixels:
        raise ApiError(422, "image_too_large",
                       f"{field}: {width}x{height} is {width * height} pixels, more than max_pixels={max_pixels}")
    if min(width, height) < min_side:
        raise ApiError(422, "image_too_small", f"{field}: {width}x{height} is smaller than min_side={min_side}")


_ERROR_CODES = {
    "EmptyInputError": (400, "empty_input"),
    "UnsupportedFormatError": (415, "unsupported_format"),
    "DecodeError": (422, "decode_error"),
    "ImageTooLargeError": (422, "image_too_large"),
    "InvalidImageError": (422, "decode_error"),
    "ImageReadError": (422, "decode_error"),
    # Not the client's fault: a model whose scores are NaN is broken (counted as a server error).
    "ModelOutputError": (500, "model_error"),
}


def error_for_prediction(error: Exception, field: str = "image") -> ApiError:
    status, code = _ERROR_CODES.get(type(error).__name__, (422, "decode_error"))
    return ApiError(status, code, f"{field}: {error}")
