"""The GPU kernels' per-pixel math, run on the CPU, against the CPU path.

csrc/fused_resize.h holds the __host__ __device__ functions the CUDA kernels call (filter tables, the
two-pass fixed-point resample recomputed per output pixel, EXIF orientation applied while reading,
normalisation, dtype and layout). `_native._fused_resize_cpu` runs exactly those functions in loops, so
these tests check the GPU path's arithmetic here, without a GPU: bit for bit against the row-by-row CPU
path, for every orientation, pass order, filter, dtype and layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

import speciesclf
from speciesclf import PreprocessSpec, preprocess_batch
from speciesclf.preprocessing._backend import _native
from speciesclf.preprocessing.preprocess import _DTYPE_CODES, _FILTER_CODES, _LAYOUT_CODES
from speciesclf.preprocessing.spec import bfloat16_bits

pytestmark = pytest.mark.skipif(_native is None, reason="the native module is not built")


def stored_for(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels that EXIF `orientation` turns into `upright` (checked through Pillow)."""
    inverse = {
        2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    image = Image.fromarray(upright)
    stored = image if orientation == 1 else image.transpose(inverse[orientation])
    check = stored.copy()
    check.getexif()[0x0112] = orientation
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(check)), upright)
    return np.ascontiguousarray(np.asarray(stored))


def twin(stored: np.ndarray, orientation: int, spec: PreprocessSpec) -> np.ndarray:
    raw = _native._fused_resize_cpu(
        stored, orientation, size=spec.size, resize=spec.resize or 0, filter=_FILTER_CODES[spec.interpolation],
        dtype=_DTYPE_CODES[spec.dtype], layout=_LAYOUT_CODES[spec.layout], mean=list(spec.mean), std=list(spec.std),
    )
    return np.frombuffer(raw, dtype=spec.numpy_dtype).reshape(spec.output_shape(1)[1:])


def cpu_path(upright: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    array = preprocess_batch([upright], spec, backend="native").array
    if spec.dtype == "bfloat16":
        array = array.view(torch.int16).numpy().view(np.uint16)
    return np.asarray(array)[0]


def photo_pixels(photo: bytes) -> np.ndarray:
    return speciesclf.decode(photo)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_the_cpu_path(one_photo: bytes, orientation: int) -> None:
    upright = photo_pixels(one_photo)
    spec = PreprocessSpec()
    assert np.array_equal(twin(stored_for(upright, orientation), orientation, spec), cpu_path(upright, spec))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "uint8"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_dtypes_layouts_and_filters(one_photo: bytes, dtype: str, layout: str, interpolation: str) -> None:
    upright = photo_pixels(one_photo)
    spec = PreprocessSpec(dtype=dtype, layout=layout, interpolation=interpolation)
    assert np.array_equal(twin(stored_for(upright, 6), 6, spec), cpu_path(upright, spec))


def test_shared_photos_bit_exact(photo_bytes: list[bytes]) -> None:
    # Every 7th photo keeps the test short; both pass orders, squash and crop are covered elsewhere.
    spec = PreprocessSpec()
    for photo in photo_bytes[::7]:
        upright = photo_pixels(photo)
        assert np.array_equal(twin(upright, 1, spec), cpu_path(upright, spec))


@pytest.mark.parametrize("shape", [(900, 120), (120, 900), (40, 30), (2000, 90), (7, 3000)])
@pytest.mark.parametrize("resize", [256, None])
def test_both_pass_orders_and_upscaling(shape: tuple[int, int], resize: int | None) -> None:
    # Tall images shrink vertically first (Pillow 13's rule); tiny ones are upscaled.
    rng = np.random.default_rng(sum(shape))
    upright = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    spec = PreprocessSpec(resize=resize)
    for orientation in (1, 5, 8):
        assert np.array_equal(twin(stored_for(upright, orientation), orientation, spec), cpu_path(upright, spec))


@pytest.mark.parametrize("channels", [1, 4])
def test_gray_and_rgba_sources(channels: int) -> None:
    rng = np.random.default_rng(channels)
    shape = (333, 517) if channels == 1 else (333, 517, 4)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    spec = PreprocessSpec()
    assert np.array_equal(twin(pixels, 1, spec), cpu_path(pixels, spec))


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 400), width=st.integers(1, 400), orientation=st.integers(1, 8),
    size=st.integers(1, 64), extra=st.integers(0, 64), squash=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_twin_equals_cpu_path(height, width, orientation, size, extra, squash, seed) -> None:
    upright = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    spec = PreprocessSpec(size=size, resize=None if squash else size + extra, dtype="uint8")
    assert np.array_equal(twin(stored_for(upright, orientation), orientation, spec), cpu_path(upright, spec))


def test_bfloat16_bits_match_torch() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.normal(0, 3, 20000).astype(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.4e38], dtype=np.float32),
        # exact halfway cases: the low 16 bits are 0x8000, so round-to-even decides
        (np.arange(1000, dtype=np.uint32) << 16 | 0x8000).view(np.float32),
    ])
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = bfloat16_bits(values)
    finite = ~np.isnan(values)
    assert np.array_equal(got[finite], expected[finite])
    assert np.isnan(torch.from_numpy(got.view(np.int16)).view(torch.bfloat16).float().numpy()[~finite]).all()


def test_bfloat16_output_is_the_rounded_float32_output(one_photo: bytes) -> None:
    f32 = preprocess_batch([one_photo], PreprocessSpec(), backend="native").array
    for backend in ("native", "python"):
        bf16 = preprocess_batch([one_photo], PreprocessSpec(dtype="bfloat16"), backend=backend).array
        assert bf16.dtype == torch.bfloat16
        assert torch.equal(bf16, torch.from_numpy(f32).to(torch.bfloat16)), backend
