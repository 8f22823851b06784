"""Typed errors, and the two tables about them: native status codes to error classes, and error classes to
the stable ``code`` (and HTTP status) every user of errors reports them by.

``error_code`` / ``error_status`` / ``error_body`` walk the exception's class hierarchy (its MRO), so a
subclass answers as its nearest listed ancestor; nothing is matched by class name. ``error_body`` is the one
error shape, ``{"code": ..., "message": ...}``: ``Prediction.to_dict()["error"]``, the CLI's JSON output
and the HTTP service's ``{"error": ...}`` bodies all use it.
"""

from __future__ import annotations

__all__ = [
    "ImageError",
    "EmptyInputError",
    "UnsupportedFormatError",
    "DecodeError",
    "ImageTooLargeError",
    "PayloadTooLargeError",
    "ImageTooSmallError",
    "InvalidImageError",
    "InvalidBase64Error",
    "ImageReadError",
    "UrlNotAllowedError",
    "UrlFetchError",
    "CudaUnavailableError",
    "GpuError",
    "ModelOutputError",
    "ModelRuntimeError",
    "CodedError",
    "error_code",
    "error_status",
    "error_body",
    "error_table",
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


class PayloadTooLargeError(ImageTooLargeError):
    """More bytes than a transfer may carry: a URL's body over its size cap (answered 413, like an HTTP
    request body over the service's limit), as opposed to an image with too many pixels."""


class ImageTooSmallError(ImageError, ValueError):
    """An image with a side shorter than allowed (the HTTP service's ``min_side``)."""


class InvalidImageError(ImageError, TypeError):
    """An input of the wrong type or shape (e.g. a float array, or 2 channels)."""


class InvalidBase64Error(InvalidImageError, ValueError):
    """A base64 string or ``data:`` URI that does not decode (strictly: one alphabet, valid padding)."""


class ImageReadError(ImageError, OSError):
    """A path that could not be read."""


class UrlNotAllowedError(ImageError, ValueError):
    """A URL refused before anything was fetched from it: URL inputs are off, or its scheme, host,
    credentials, or an address it (or a redirect) resolves to is not allowed by the
    :class:`~speciesclf.sources.fetch.UrlPolicy`. Nothing was connected to."""


class UrlFetchError(ImageReadError):
    """A URL that was allowed but could not be fetched: no such name, connection refused, a timeout, an
    HTTP status other than 200, too many redirects, a malformed answer."""


class CudaUnavailableError(RuntimeError):
    """GPU work was asked for where it cannot run: a build without CUDA, no driver, or no GPU."""


class GpuError(RuntimeError):
    """The GPU failed a whole batch (a CUDA error, out of device memory). Image errors stay per item."""


class ModelRuntimeError(RuntimeError):
    """The model's runtime failed a whole batch with an error of its own (for example onnxruntime refusing a
    batch size the graph cannot take). The runtime's message is kept; no prediction is made up."""


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


class CodedError(Exception):
    """An error that names its own ``code`` and ``status``: for answers about a request itself (malformed
    JSON, a full queue, ...) that no exception class of the library stands for. Use one of the documented
    codes (docs/serve.md, "Errors")."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


# Exception class -> (code, HTTP status); the nearest class in an exception's MRO wins. Image problems are
# the caller's (4xx); a model whose scores are NaN, a GPU failure or a model that cannot load are ours (5xx).
# The codes are a public contract (HTTP clients, CLI JSON): never rename one.
_CODES: dict[type[BaseException], tuple[str, int]] = {
    ImageError: ("decode_error", 422),
    EmptyInputError: ("empty_input", 400),
    UnsupportedFormatError: ("unsupported_format", 415),
    DecodeError: ("decode_error", 422),
    ImageTooLargeError: ("image_too_large", 422),
    PayloadTooLargeError: ("image_too_large", 413),
    ImageTooSmallError: ("image_too_small", 422),
    InvalidImageError: ("decode_error", 422),
    InvalidBase64Error: ("invalid_base64", 400),
    ImageReadError: ("decode_error", 422),
    UrlNotAllowedError: ("url_not_allowed", 400),
    UrlFetchError: ("url_fetch_failed", 400),
    ModelOutputError: ("model_error", 500),
    ModelRuntimeError: ("model_error", 500),
    CudaUnavailableError: ("cuda_unavailable", 500),
    GpuError: ("gpu_error", 500),
}
_INTERNAL = ("internal", 500)
_OTHER_MODULES_LISTED = False


def _table() -> dict[type[BaseException], tuple[str, int]]:
    # The errors of modules that import this one are listed on first use, not at import (no import cycle).
    global _OTHER_MODULES_LISTED
    if not _OTHER_MODULES_LISTED:
        from .bundles.bundle import BundleError
        from .model.weights import WeightsError
        from .bundles.registry import RegistryError
        from .model.runtimes import ModelLoadError
        from .rollout.controller import RolloutError
        from .rollout.deployment import CandidateRefused
        from .rollout.policy import RolloutSpecError
        from .capture.store import CaptureError, FeedbackNotFound, InvalidFeedbackLabel

        _CODES.update({
            BundleError: ("bundle_error", 500),
            RegistryError: ("registry_error", 500),
            ModelLoadError: ("model_load_failed", 500),
            WeightsError: ("weights_unavailable", 500),
            # A rollout operation the rollout's state does not allow now, or a candidate that cannot be used.
            RolloutError: ("rollout_conflict", 409),
            CandidateRefused: ("candidate_refused", 409),
            RolloutSpecError: ("invalid_rollout", 422),
            FeedbackNotFound: ("prediction_not_found", 404),
            InvalidFeedbackLabel: ("invalid_label", 422),
            CaptureError: ("capture_error", 500),
        })
        _OTHER_MODULES_LISTED = True
    return _CODES


def _lookup(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, CodedError):
        return exc.code, exc.status
    table = _table()
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return _INTERNAL


def error_code(exc: BaseException) -> str:
    """The stable code of ``exc`` (``"decode_error"``, ``"url_not_allowed"``, ...); ``"internal"`` for an
    exception the table does not list (a bug, not a bad input)."""
    return _lookup(exc)[0]


def error_status(exc: BaseException) -> int:
    """The HTTP status the service answers ``exc`` with (4xx: the input's fault; 5xx: the service's)."""
    return _lookup(exc)[1]


def error_body(exc: BaseException) -> dict[str, str]:
    """The one error shape: ``{"code": error_code(exc), "message": str(exc)}``."""
    return {"code": error_code(exc), "message": str(exc)}


def error_table() -> dict[type[BaseException], tuple[str, int]]:
    """A copy of the table: exception class -> (code, HTTP status)."""
    return dict(_table())
