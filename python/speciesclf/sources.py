"""What a Classifier accepts as one image, turned into what preprocess_batch takes (bytes or pixels).

Paths, bytes, binary file objects, base64 strings and data URIs, PIL images, HxWxC uint8 arrays, CHW torch
tensors, and http(s) URLs when the caller allows them.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import os
import re
import urllib.request
from typing import Any

import numpy as np

from ._formats import sniff_format
from .errors import ImageReadError, ImageTooLargeError, InvalidImageError
from .inputs import read_file

__all__ = ["to_image_source"]

_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)
_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")


def to_image_source(item: Any, *, max_bytes: int, allow_urls: bool = False, url_timeout: float = 10.0) -> Any:
    """One input as bytes / a pixel array / a PIL image (left to preprocess_batch). Raises ImageError."""
    if isinstance(item, str):
        return _from_string(item, max_bytes=max_bytes, allow_urls=allow_urls, url_timeout=url_timeout)
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
        return _from_tensor(item)
    return item  # bytes, PathLike, arrays, PIL images: preprocess_batch checks them


def _from_string(text: str, *, max_bytes: int, allow_urls: bool, url_timeout: float) -> Any:
    lowered = text[:16].lower()
    if lowered.startswith(("http://", "https://")):
        if not allow_urls:
            raise InvalidImageError("URL inputs are off: pass allow_urls=True to fetch them")
        return _fetch(text, max_bytes=max_bytes, timeout=url_timeout)
    if lowered.startswith("data:"):
        match = _DATA_URI.match(text)
        if not match:
            raise InvalidImageError("malformed data URI")
        payload = text[match.end():]
        if not match.group("b64"):
            raise InvalidImageError("data URIs must be base64-encoded")
        return _b64decode(payload, max_bytes)
    if os.path.exists(text):
        return read_file(text, max_bytes)
    # Long, no dot, all in the base64 alphabet: an encoded image, not a missing file name.
    if len(text) >= 64 and _BASE64.match(text):
        if "/" not in text and os.sep not in text:
            return _b64decode(text, max_bytes)
        # "/" is a base64 digit too (a JPEG's base64 starts "/9j/"): with separators in it, the text is an
        # image only when it decodes to one; otherwise it is a missing path, reported as such.
        try:
            data = _b64decode(text, max_bytes)
        except InvalidImageError:
            data = b""
        if sniff_format(data):
            return data
    raise ImageReadError(f"no such file: {text[:200]!r}")


def _b64decode(payload: str, max_bytes: int) -> bytes:
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageTooLargeError(f"base64 payload decodes to more than max_bytes={max_bytes} bytes")
    compact = re.sub(r"\s+", "", payload)
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImageError(f"invalid base64: {e}") from None


def _fetch(url: str, *, max_bytes: int, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "speciesclf"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (caller opted in)
            length = response.headers.get("Content-Length")
            if length and int(length) > max_bytes:
                raise ImageTooLargeError(f"{url}: {length} bytes exceeds max_bytes={max_bytes}")
            data = response.read(max_bytes + 1)
    except ImageTooLargeError:
        raise
    # HTTPException (InvalidURL, BadStatusLine, IncompleteRead...) is not an OSError.
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise ImageReadError(f"cannot fetch {url}: {e}") from None
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{url}: more than max_bytes={max_bytes} bytes")
    return data


def _from_tensor(tensor: Any) -> np.ndarray:
    """A CHW (or HW) torch tensor: uint8 as is, floats in [0, 1] scaled to 0..255."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise InvalidImageError(f"unsupported input type {type(tensor).__name__}")
    # Meta tensors have no data and sparse ones no dense pixels: torch would raise NotImplementedError.
    if tensor.device.type == "meta" or tensor.layout != torch.strided:
        raise InvalidImageError(f"tensors must be dense with data, got layout {tensor.layout} on {tensor.device}")
    t = tensor.detach().cpu()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)
    elif t.ndim != 2:
        raise InvalidImageError(f"tensors must be CHW (C in 1, 3, 4) or HW, got shape {tuple(tensor.shape)}")
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
