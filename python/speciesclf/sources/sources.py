"""What a Classifier accepts as one image, turned into what preprocess_batch takes (bytes or pixels).

Paths, bytes, binary file objects, base64 strings and data URIs, PIL images, HxWxC uint8 arrays, CHW torch
tensors, and http(s) URLs when the caller allows them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..preprocessing._formats import sniff_format
from ..errors import (
    EmptyInputError,
    ImageReadError,
    ImageTooLargeError,
    InvalidBase64Error,
    InvalidImageError,
    UrlNotAllowedError,
)
from .fetch import UrlPolicy, fetch_bytes
from ..preprocessing.inputs import check_pixel_count, read_file
from ..preprocessing.spec import DEFAULT_MAX_PIXELS

__all__ = ["decode_base64", "to_image_source"]

_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*(?P<b64>;base64)?,", re.I)
_B64_STANDARD = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_B64_URLSAFE = re.compile(rb"[A-Za-z0-9_-]*={0,2}")
_SPACE = re.compile(r"\s+")
# What a string must look like to be taken for base64 rather than a file name (see _from_string).
_LOOKS_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")


def decode_base64(text: str, *, max_bytes: int | None = None) -> bytes:
    """A base64 string or a ``data:`` URI (``data:image/jpeg;base64,...``) to bytes: the one base64 parser
    of speciesclf (the Classifier's string inputs and the HTTP service's JSON images alike).

    Strict: one alphabet (standard ``+/`` or URL-safe ``-_``, never both), at most two ``=`` at the end
    (missing padding is restored), white space (line breaks of MIME base64) ignored, anything else refused
    with :class:`~speciesclf.InvalidBase64Error`. Nothing decodes to :class:`~speciesclf.EmptyInputError`;
    more than ``max_bytes`` decoded bytes to :class:`~speciesclf.ImageTooLargeError`, checked before decoding.
    """
    if not isinstance(text, str):
        raise InvalidImageError(f"base64 input must be a str, got {type(text).__name__}")
    if text[:5].lower() == "data:":
        match = _DATA_URI.match(text)
        if not match:
            raise InvalidBase64Error("malformed data: URI")
        if not match.group("b64"):
            raise InvalidBase64Error("data: URIs must be base64-encoded (;base64,)")
        text = text[match.end():]
    try:
        compact = _SPACE.sub("", text).encode("ascii")
    except UnicodeEncodeError:
        raise InvalidBase64Error("invalid base64 (characters outside the base64 alphabet)") from None
    if not compact:
        raise EmptyInputError("the image is empty")
    if max_bytes is not None and len(compact.rstrip(b"=")) * 3 // 4 > max_bytes:
        raise ImageTooLargeError(f"base64 payload decodes to more than max_bytes={max_bytes} bytes")
    padded = compact + b"=" * (-len(compact) % 4)
    try:
        if _B64_STANDARD.fullmatch(compact):
            return base64.b64decode(padded, validate=True)
        if _B64_URLSAFE.fullmatch(compact):
            return base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError) as e:
        raise InvalidBase64Error(f"invalid base64 ({e})") from None
    raise InvalidBase64Error("invalid base64 (characters outside the base64 alphabet, or both alphabets mixed)")


def to_image_source(item: Any, *, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                    allow_urls: bool | UrlPolicy | Iterable[str] = False) -> Any:
    """One input as bytes / a pixel array / a PIL image (left to preprocess_batch). Raises ImageError.

    ``allow_urls`` says which http(s) URLs may be fetched (see :meth:`speciesclf.sources.fetch.UrlPolicy.of`)."""
    if isinstance(item, str):
        return _from_string(item, max_bytes=max_bytes, allow_urls=allow_urls)
    if hasattr(item, "read") and callable(item.read):
        # A failing read is this item's error, not the batch's: a closed file raises ValueError, a read()
        # without a size argument TypeError.
        try:
            data = item.read(max_bytes + 1)
        except TypeError as e:
            raise InvalidImageError(f"file objects need read(size): {e}") from None
        except (OSError, ValueError) as e:
            raise ImageReadError(f"cannot read file object: {e}") from None
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidImageError("file objects must be opened in binary mode")
        if len(data) > max_bytes:
            raise ImageTooLargeError(f"more than max_bytes={max_bytes} bytes")
        return bytes(data)
    if type(item).__module__.startswith("torch"):
        return _from_tensor(item, max_pixels)
    return item  # bytes, PathLike, arrays, PIL images: preprocess_batch checks them


def _from_string(text: str, *, max_bytes: int, allow_urls: bool | UrlPolicy | Iterable[str]) -> Any:
    lowered = text[:16].lower()
    if lowered.startswith(("http://", "https://")):
        policy = UrlPolicy.of(allow_urls)
        if policy is None:
            raise UrlNotAllowedError("URL inputs are off: pass allow_urls=True (public hosts) or a UrlPolicy "
                                     "to fetch them")
        if policy.max_bytes > max_bytes:
            policy = dataclasses.replace(policy, max_bytes=max_bytes)
        return fetch_bytes(text, policy, accept="image/*")
    if lowered.startswith("data:"):
        return decode_base64(text, max_bytes=max_bytes)
    if os.path.exists(text):
        return read_file(text, max_bytes)
    # Long, no dot, all in the base64 alphabet: an encoded image, not a missing file name.
    if len(text) >= 64 and _LOOKS_BASE64.match(text):
        if "/" not in text and os.sep not in text:
            return decode_base64(text, max_bytes=max_bytes)
        # "/" is a base64 digit too (a JPEG's base64 starts "/9j/"): with separators in it, the text is an
        # image only when it decodes to one; otherwise it is a missing path, reported as such.
        try:
            data = decode_base64(text, max_bytes=max_bytes)
        except (InvalidImageError, EmptyInputError):
            data = b""
        if sniff_format(data):
            return data
    raise ImageReadError(f"no such file: {text[:200]!r}")


def _from_tensor(tensor: Any, max_pixels: int) -> np.ndarray:
    """A CHW (or HW) torch tensor: uint8 as is, floats in [0, 1] scaled to 0..255."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise InvalidImageError(f"unsupported input type {type(tensor).__name__}")
    # Meta tensors have no data and sparse ones no dense pixels: torch would raise NotImplementedError.
    if tensor.device.type == "meta" or tensor.layout != torch.strided:
        raise InvalidImageError(f"tensors must be dense with data, got layout {tensor.layout} on {tensor.device}")
    chw = tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4)
    if not chw and tensor.ndim != 2:
        raise InvalidImageError(f"tensors must be CHW (C in 1, 3, 4) or HW, got shape {tuple(tensor.shape)}")
    check_pixel_count(tensor.shape[-2], tensor.shape[-1], max_pixels)  # before the copy to the CPU
    t = tensor.detach().cpu()
    if chw:
        t = t.permute(1, 2, 0)
    if t.dtype == torch.uint8:
        return t.contiguous().numpy()
    if t.is_floating_point():
        # NaN fails both comparisons below: without this check it would become some arbitrary pixel value.
        if not bool(torch.isfinite(t).all()):
            raise InvalidImageError("float tensors must hold finite pixel values (found NaN or inf)")
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise InvalidImageError("float tensors must hold pixel values in [0, 1] (not normalised ones)")
        return (t * 255).round().to(torch.uint8).contiguous().numpy()
    raise InvalidImageError(f"tensors must be uint8 or float, got {t.dtype}")
