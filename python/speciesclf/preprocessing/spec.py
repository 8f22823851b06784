"""PreprocessSpec: what a model expects of its input, and the geometry both backends derive from it."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

import numpy as np

from ..errors import ImageTooLargeError

__all__ = ["PreprocessSpec", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_BYTES", "MAX_SIZE", "MAX_RESIZED_SIDE"]

# Pillow's decompression-bomb threshold (Image.MAX_IMAGE_PIXELS), kept as our default.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MAX_BYTES = 64 * 2**20
# Upper bound of ``size`` and ``resize``: a batch buffer holds batch x 3 x size x size values, so a
# manifest's size=10**6 would ask for hundreds of TiB. 8192 is far beyond any classifier's input.
MAX_SIZE = 8192
# The longest side an image may have after the shorter-side resize (kMaxResizedSide in csrc/pipeline.h);
# the resized image also has at most max(max_pixels, DEFAULT_MAX_PIXELS) pixels (a lower max_pixels, meant
# to refuse large uploads, does not stop small images being upscaled). Beyond either the image is refused
# (ImageTooLargeError): 1 x 16 million pixels is one flipped header byte away from a 1 x 30 PNG.
MAX_RESIZED_SIDE = 1 << 24

_FILTERS = ("bilinear", "bicubic")
_DTYPES = ("float32", "float16", "bfloat16", "uint8")
_LAYOUTS = ("NCHW", "NHWC")


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a model input.

    The defaults are torchvision's ImageNet recipe: ``Resize(256)`` (shorter side), ``CenterCrop(224)``,
    ``ToTensor()``, ``Normalize(mean, std)``. ``resize=None`` squashes the whole image to ``size`` x ``size``.
    With ``dtype="uint8"`` the output holds the resized pixels and ``mean``/``std`` are not applied.
    ``dtype="bfloat16"`` gives torch.bfloat16 tensors (NumPy has no such type): the float32 values rounded
    to nearest even, as ``tensor.to(torch.bfloat16)`` does.

    ``jpeg_reduce_margin``: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, so the
    discarded pixels cost almost nothing) while the decoded image stays at least this multiple of the
    resize target in both dimensions. At 1.0 a decode that lands right on the target is sharper than
    the reference's antialiasing (up to 3.9/255 mean difference measured on the shared photos); 1.25
    keeps every photo within 1.4/255 and still decodes 12 MP photos at 1/8. ``None`` always decodes at
    full size, which makes the result bit-exact with the torchvision reference.

    ``size`` and ``resize`` are at most ``MAX_SIZE`` (8192). ``mean`` and ``std`` are three finite real
    numbers each (``std`` > 0); strings are not converted.
    """

    size: int = 224
    resize: int | None = 256
    crop: Literal["center"] = "center"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    dtype: Literal["float32", "float16", "bfloat16", "uint8"] = "float32"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    jpeg_reduce_margin: float | None = 1.25

    def __post_init__(self) -> None:
        def positive_int(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PreprocessSpec.{name} must be a positive int, got {value!r}")

        positive_int("size", self.size)
        positive_int("max_pixels", self.max_pixels)
        positive_int("max_bytes", self.max_bytes)
        if self.size > MAX_SIZE:
            raise ValueError(f"PreprocessSpec.size must be <= {MAX_SIZE}, got {self.size}")
        if self.resize is not None:
            positive_int("resize", self.resize)
            if self.resize > MAX_SIZE:
                raise ValueError(f"PreprocessSpec.resize must be <= {MAX_SIZE} or None, got {self.resize}")
            if self.resize < self.size:
                raise ValueError(f"PreprocessSpec.resize ({self.resize}) must be >= size ({self.size})")
        if self.crop != "center":
            raise ValueError(f"PreprocessSpec.crop must be 'center', got {self.crop!r}")
        if self.interpolation not in _FILTERS:
            raise ValueError(f"PreprocessSpec.interpolation must be one of {_FILTERS}, got {self.interpolation!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"PreprocessSpec.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.layout not in _LAYOUTS:
            raise ValueError(f"PreprocessSpec.layout must be one of {_LAYOUTS}, got {self.layout!r}")
        for name in ("mean", "std"):
            raw = getattr(self, name)
            # NaN or inf would turn every pixel into NaN (silently: the model still answers), and a string
            # is a manifest typo rather than a number to convert.
            if isinstance(raw, (str, bytes)) or not hasattr(raw, "__iter__"):
                raise ValueError(f"PreprocessSpec.{name} must be 3 finite numbers (R, G, B), got {raw!r}")
            raw = tuple(raw)
            if len(raw) != 3:
                raise ValueError(f"PreprocessSpec.{name} needs 3 values (R, G, B), got {len(raw)}")
            if not all(_is_finite_real(v) for v in raw):
                raise ValueError(f"PreprocessSpec.{name} must be 3 finite numbers (R, G, B), got {list(raw)!r}")
            object.__setattr__(self, name, tuple(float(v) for v in raw))
        margin = self.jpeg_reduce_margin
        if margin is not None and not (_is_finite_real(margin) and float(margin) >= 1.0):
            raise ValueError(f"PreprocessSpec.jpeg_reduce_margin must be a finite number >= 1 or None, got {margin!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"PreprocessSpec.std values must be positive, got {self.std}")

    @property
    def numpy_dtype(self) -> np.dtype:
        """The NumPy dtype of the output's storage: uint16 bit patterns for bfloat16."""
        return np.dtype(np.uint16) if self.dtype == "bfloat16" else np.dtype(self.dtype)

    def output_shape(self, n: int) -> tuple[int, int, int, int]:
        if self.layout == "NCHW":
            return (n, 3, self.size, self.size)
        return (n, self.size, self.size, 3)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PreprocessSpec field(s): {sorted(unknown)}")
        values = dict(data)
        for name in ("mean", "std"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


def _is_finite_real(value: object) -> bool:
    """A real number (NumPy's included), not a bool or a string, and neither NaN nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def plan_geometry(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """(resized_width, resized_height, crop_x, crop_y) as torchvision's Resize + CenterCrop compute them.

    The twin of plan_geometry in csrc/pipeline.cpp.
    """
    if spec.resize is None:
        return spec.size, spec.size, 0, 0
    refused = f"resizing {width}x{height} to a shorter side of {spec.resize}"
    if spec.resize * max(width, height) / min(width, height) > MAX_RESIZED_SIDE:
        raise ImageTooLargeError(f"{refused} gives a longer side over {MAX_RESIZED_SIDE} pixels (an aspect ratio "
                                 "too extreme for this spec)")
    if width <= height:
        new_w, new_h = spec.resize, int(spec.resize * height / width)
    else:
        new_w, new_h = int(spec.resize * width / height), spec.resize
    limit = max(spec.max_pixels, DEFAULT_MAX_PIXELS)  # Pillow would allocate all of it (native: only the crop)
    if new_w * new_h > limit:
        raise ImageTooLargeError(f"{refused} gives {new_w}x{new_h} = {new_w * new_h} pixels, more than {limit} "
                                 "(an aspect ratio too extreme for this spec)")
    return new_w, new_h, int(round((new_w - spec.size) / 2.0)), int(round((new_h - spec.size) / 2.0))


def normalization_lut(spec: PreprocessSpec) -> np.ndarray:
    """(3, 256) table: pixel value -> normalised value, in float32 and torchvision's order of operations."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None]
    table = (values[None, :] - mean) / std
    if spec.dtype == "bfloat16":
        return bfloat16_bits(table)
    return table.astype(spec.numpy_dtype)


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays a quiet NaN.

    The twin of float_to_bfloat16 in csrc/output_format.h.
    """
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    nan = ((bits & 0x7F800000) == 0x7F800000) & ((bits & 0x7FFFFF) != 0)
    return np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)


BFLOAT16_NAN = 0x7FC0  # the bits of a quiet NaN, for failed slots
