"""An independent implementation of the torchvision preprocessing recipe speciesclf reproduces.

``Resize(resize)`` (shorter side to ``resize``, the long side ``int(resize * long / short)``),
``CenterCrop(size)`` (offsets ``int(round((H - size) / 2.0))``), ``ToTensor()`` and ``Normalize(mean, std)``
on ``PIL.Image.open(f).convert("RGB")``, written out step by step from torchvision's definitions rather
than imported from speciesclf, so that a mistake shared by both backends still shows up here.

``resize=None`` is ``Resize((size, size))``: the whole image squashed to size x size (no crop needed).
"""

from __future__ import annotations

import io
import os
from typing import Iterable

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def open_rgb(source) -> Image.Image:
    """``Image.open(f).convert("RGB")`` for bytes or a path; arrays and PIL images are converted to RGB too."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim == 3 and array.shape[2] == 4:
            return Image.fromarray(np.ascontiguousarray(array), "RGBA").convert("RGB")
        if array.ndim == 2:
            return Image.fromarray(np.ascontiguousarray(array), "L").convert("RGB")
        return Image.fromarray(np.ascontiguousarray(array), "RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            source = io.BytesIO(f.read())
    with Image.open(source) as image:
        return image.convert("RGB")


def resized_size(width: int, height: int, resize: int | None, size: int) -> tuple[int, int]:
    """torchvision's _compute_resized_output_size for an int (shorter side) or the (size, size) squash."""
    if resize is None:
        return size, size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize(image: Image.Image, resize_to: int | None, size: int, interpolation: str = "bilinear") -> Image.Image:
    """``transforms.Resize(resize_to, interpolation)`` on a PIL image (PIL resize antialiases)."""
    return image.resize(resized_size(*image.size, resize_to, size), FILTERS[interpolation])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """``transforms.CenterCrop(size)`` on a PIL image at least size x size."""
    width, height = image.size
    assert width >= size and height >= size, "the recipe never crops an image smaller than the crop"
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """``transforms.ToTensor()`` for an RGB image: CHW float32 in [0, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().float().div(255)


def normalize(tensor: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``transforms.Normalize(mean, std)``: in place, float32, torchvision's order of operations."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)
    return tensor.sub_(mean_t[:, None, None]).div_(std_t[:, None, None])


def reference_pixels(source, *, size: int = 224, resize_to: int | None = 256, interpolation: str = "bilinear") -> np.ndarray:
    """The resized and cropped RGB pixels, (size, size, 3) uint8: what ``dtype="uint8"`` outputs (NHWC)."""
    image = resize(open_rgb(source), resize_to, size, interpolation)
    if resize_to is not None:
        image = center_crop(image, size)
    array = np.array(image)
    assert array.shape == (size, size, 3)
    return array


def reference_tensor(
    source,
    *,
    size: int = 224,
    resize_to: int | None = 256,
    interpolation: str = "bilinear",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> torch.Tensor:
    """The full recipe: (3, size, size) float32, normalised."""
    pixels = reference_pixels(source, size=size, resize_to=resize_to, interpolation=interpolation)
    return normalize(to_tensor(Image.fromarray(pixels, "RGB")), mean, std)


def reference_output(
    source,
    *,
    size: int = 224,
    resize_to: int | None = 256,
    interpolation: str = "bilinear",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    dtype: str = "float32",
    layout: str = "NCHW",
) -> np.ndarray:
    """One slot of speciesclf's output for ``source`` as the reference computes it, in any dtype and layout.

    float16 is the float32 result rounded once (``Tensor.half()``); uint8 is the un-normalised pixels.
    """
    if dtype == "uint8":
        chw = torch.from_numpy(reference_pixels(source, size=size, resize_to=resize_to, interpolation=interpolation))
        chw = chw.permute(2, 0, 1)
    else:
        chw = reference_tensor(source, size=size, resize_to=resize_to, interpolation=interpolation, mean=mean, std=std)
        if dtype == "float16":
            chw = chw.half()
        else:
            assert dtype == "float32"
    if layout == "NHWC":
        chw = chw.permute(1, 2, 0)
    return chw.contiguous().numpy()


def reference_batch(sources: Iterable, **kwargs) -> np.ndarray:
    return np.stack([reference_output(s, **kwargs) for s in sources])


def reference_lut(mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype: str = "float32") -> np.ndarray:
    """(3, 256): the normalised value of every pixel value per channel, computed with the ops above."""
    values = torch.arange(256, dtype=torch.uint8)[None, :].expand(3, 256)
    table = normalize(values.contiguous().float().div(255)[:, :, None], mean, std)[:, :, 0]
    return (table.half() if dtype == "float16" else table).numpy()


def unnormalize(array: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD, layout: str = "NCHW") -> np.ndarray:
    """Undo Normalize and ToTensor's /255: model input back to the 0-255 pixel scale (float64).

    Works on one slot or a batch; ``layout`` says where the channel axis is (-3 for NCHW, -1 for NHWC).
    A uint8 output (already pixels) is returned as float64 unchanged.
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    m = np.asarray(mean, dtype=np.float64)
    s = np.asarray(std, dtype=np.float64)
    if layout == "NCHW":
        m, s = m[:, None, None], s[:, None, None]
    return (array.astype(np.float64) * s + m) * 255.0


def to_pixels(array: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD, layout: str = "NCHW") -> np.ndarray:
    """Recover the exact uint8 pixel values behind a normalised output by lookup in :func:`reference_lut`.

    Stricter than :func:`unnormalize`: every value must be exactly one of the reference's 256 normalised
    values for its channel (so the dtype conversion and the LUT are checked bit for bit too); raises
    AssertionError otherwise. Returns the same shape as ``array``, uint8.
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array.copy()
    dtype = "float16" if array.dtype == np.float16 else "float32"
    assert array.dtype == np.dtype(dtype), array.dtype
    lut = reference_lut(mean, std, dtype)
    axis = array.ndim - 3 if layout == "NCHW" else array.ndim - 1
    moved = np.moveaxis(array, axis, 0)  # channel first
    out = np.empty(moved.shape, dtype=np.uint8)
    for c in range(3):
        table = lut[c]
        assert np.all(np.diff(table.astype(np.float64)) > 0), "the LUT must be strictly increasing"
        values = moved[c]
        index = np.clip(np.searchsorted(table, values), 0, 255)
        exact = table[index] == values
        if not np.all(exact):
            bad = values[~exact]
            raise AssertionError(
                f"{bad.size} output value(s) of channel {c} are no normalised pixel value, e.g. {bad.ravel()[:5]}"
            )
        out[c] = index
    return np.moveaxis(out, 0, axis)
