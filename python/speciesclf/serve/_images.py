"""The service's errors and image checks: :class:`ApiError` (answered as ``{"error": {"code", "message"}}``),
library errors turned into it through the one error table (:mod:`speciesclf.errors`), and the cheap checks of
one encoded image before it is queued (format sniffed, size from the header)."""

from __future__ import annotations

from ..preprocessing._formats import sniff_format
from ..preprocessing.decoding import image_size
from ..errors import (
    CodedError,
    EmptyInputError,
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    UnsupportedFormatError,
    error_body,
    error_status,
)
from ..sources.sources import decode_base64 as _decode_base64

__all__ = ["ApiError", "decode_base64", "check_image", "error_for_prediction"]


class ApiError(CodedError):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status`` (and ``headers``)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status, code, message)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": error_body(self)}


def error_for_prediction(error: BaseException, field: str = "image") -> ApiError:
    """A library error (an image's, a URL's, a prediction's) as the service answers it: code and status
    from the one error table, the message naming the request field it came from."""
    body = error_body(error)
    return ApiError(error_status(error), body["code"], f"{field}: {body['message']}")


def decode_base64(value: object, field: str = "image") -> bytes:
    """A JSON image (base64 or a ``data:`` URI) to bytes, by the library's one strict base64 parser."""
    if not isinstance(value, str):
        raise ApiError(422, "invalid_request", f"{field!r} must be a base64 string or a data: URI")
    try:
        return _decode_base64(value)
    except ImageError as e:
        raise error_for_prediction(e, field) from None


def check_image(data: bytes, *, min_side: int, max_pixels: int, field: str = "image") -> None:
    """Raise :class:`ApiError` for what can be refused before decoding: no bytes, an unknown format, more
    pixels than ``max_pixels`` or a side shorter than ``min_side`` (read from the header by the decoder's
    own header reader; a header it cannot read cheaply is left to the decoder)."""
    try:
        _check(data, min_side, max_pixels)
    except ImageError as e:
        raise error_for_prediction(e, field) from None


def _check(data: bytes, min_side: int, max_pixels: int) -> None:
    if not data:
        raise EmptyInputError("the image is empty")
    if sniff_format(data) is None:
        raise UnsupportedFormatError(
            "not a supported image format (JPEG, PNG, WebP, GIF, BMP, TIFF; sniffed from the bytes)")
    size = image_size(data)
    if size is None:
        return
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{width}x{height} is {width * height} pixels, more than max_pixels={max_pixels}")
    if min(width, height) < min_side:
        raise ImageTooSmallError(f"{width}x{height} is smaller than min_side={min_side}")
