"""Synthetic images (no JPEG loss): the Pillow path is the reference bit for bit, the native path within 1/255.

Covers every dtype and layout, the squash (``resize=None``) and bicubic, pixel arrays of 1, 3 and 4
channels and their PNG encodings, and a Hypothesis property over sizes from 1x1 to 4000x3000 with aspect
ratios up to 1:50.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from reference import reference_output, to_pixels
from speciesclf import PreprocessSpec, preprocess_batch

BACKENDS = ("native", "python")
DTYPES = ("float32", "float16", "uint8")
LAYOUTS = ("NCHW", "NHWC")


def synthetic(height: int, width: int, channels: int | None = 3, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 image with smooth structure (gradients, a disc, stripes) and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    fy, fx = y / max(height - 1, 1), x / max(width - 1, 1)
    disc = ((fx - 0.4) ** 2 + (fy - 0.6) ** 2 < 0.08).astype(np.float64)
    stripes = ((x // 3 + y // 5) % 2).astype(np.float64)
    planes = [
        200 * fx + 40 * disc,
        220 * fy + 20 * stripes,
        128 + 100 * np.sin(7 * fx + 3 * fy) * (1 - disc),
        255 * (0.3 + 0.7 * fx * fy),
    ]
    count = 1 if channels is None else channels
    image = np.stack(planes[:count], axis=-1) + rng.normal(0, 12, (height, width, count))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image[:, :, 0] if channels is None else image


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def run(items, spec: PreprocessSpec, backend: str) -> np.ndarray:
    batch = preprocess_batch(items, spec, backend=backend)
    assert batch.all_ok
    assert batch.array.shape == spec.output_shape(len(items))
    assert batch.array.dtype == spec.numpy_dtype
    return batch.array


def expected(item, spec: PreprocessSpec) -> np.ndarray:
    return reference_output(
        item,
        size=spec.size,
        resize_to=spec.resize,
        interpolation=spec.interpolation,
        mean=spec.mean,
        std=spec.std,
        dtype=spec.dtype,
        layout=spec.layout,
    )


def pixels_of(array: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Exact pixel values behind an output (raises if a value is no normalised pixel value)."""
    return to_pixels(array, spec.mean, spec.std, spec.layout).astype(np.int16)


def assert_native_close(native: np.ndarray, reference: np.ndarray, spec: PreprocessSpec, what: str) -> None:
    diff = np.abs(pixels_of(native, spec) - pixels_of(reference, spec))
    assert diff.max() <= 1, f"{what}: native differs from the reference by {diff.max()}/255 ({(diff > 1).sum()} values)"


SHAPES = [
    (375, 500),  # a typical landscape photo
    (500, 333),  # portrait
    (256, 256),  # already the resize target
    (224, 224),  # already the crop size: upscale to 256, then crop
    (256, 257),  # odd crop offsets
    (300, 299),
    (40, 2000),  # 1:50 landscape
    (1500, 30),  # 1:50 portrait
    (1, 1),
    (7, 3),
    (1200, 1600),  # shrink by more than 4
]

SPECS = [
    PreprocessSpec(),
    PreprocessSpec(resize=None),
    PreprocessSpec(interpolation="bicubic"),
    PreprocessSpec(resize=None, interpolation="bicubic"),
    PreprocessSpec(size=160, resize=182, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.125)),
    PreprocessSpec(size=32, resize=None),
]


def spec_id(spec: PreprocessSpec) -> str:
    return f"s{spec.size}-r{spec.resize}-{spec.interpolation}-std{spec.std[2]}"


@pytest.fixture(scope="module")
def images():
    return {shape: synthetic(*shape, seed=i) for i, shape in enumerate(SHAPES)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", SPECS, ids=spec_id)
def test_arrays_every_dtype_and_layout(base, dtype, layout, images):
    spec = PreprocessSpec.from_dict({**base.to_dict(), "dtype": dtype, "layout": layout})
    items = list(images.values())
    reference = np.stack([expected(a, spec) for a in items])
    python = run(items, spec, "python")
    native = run(items, spec, "native")
    for i, shape in enumerate(images):
        assert np.array_equal(python[i], reference[i]), f"python path differs from the reference for {shape}"
        assert_native_close(native[i], reference[i], spec, f"{shape}")
    if dtype != "uint8":
        assert np.isfinite(native).all() and np.isfinite(python).all()


@pytest.mark.parametrize("base", SPECS[:4], ids=spec_id)
def test_png_encoded(base, images):
    """PNG-encoded: lossless, so the decoded pixels are the array's and the results match exactly."""
    for dtype, layout in (("float32", "NCHW"), ("uint8", "NHWC"), ("float16", "NHWC")):
        spec = PreprocessSpec.from_dict({**base.to_dict(), "dtype": dtype, "layout": layout})
        arrays = list(images.values())
        encoded = [png_bytes(a) for a in arrays]
        reference = np.stack([expected(a, spec) for a in arrays])
        python = run(encoded, spec, "python")
        native = run(encoded, spec, "native")
        for i, shape in enumerate(images):
            assert np.array_equal(python[i], reference[i]), f"python path differs from the reference for PNG {shape}"
            assert_native_close(native[i], reference[i], spec, f"PNG {shape}")
        # The encoded bytes and the pixel array are the same image to both backends.
        assert np.array_equal(run(arrays, spec, "python"), python)
        assert np.array_equal(run(arrays, spec, "native"), native)


@pytest.mark.parametrize("channels", [None, 1, 4])
@pytest.mark.parametrize("encode", [False, True], ids=["array", "png"])
def test_gray_and_alpha(channels, encode):
    """HxW and HxWx1 arrays are gray (replicated), HxWx4 drops alpha, as Pillow's convert("RGB")."""
    array = synthetic(321, 234, channels, seed=5)
    item = png_bytes(array) if encode else array
    spec = PreprocessSpec(dtype="uint8", layout="NHWC")
    reference = expected(array, spec)
    if channels in (None, 1):
        assert np.array_equal(reference[..., 0], reference[..., 1]) and np.array_equal(reference[..., 1], reference[..., 2])
    python = run([item], spec, "python")[0]
    native = run([item], spec, "native")[0]
    assert np.array_equal(python, reference)
    assert np.abs(native.astype(np.int16) - reference).max() <= 1


def test_pil_image_input():
    array = synthetic(200, 300, seed=11)
    spec = PreprocessSpec(resize=None, size=64)
    for mode in ("RGB", "L", "RGBA", "P"):
        image = Image.fromarray(array).convert(mode)
        reference = expected(image, spec)
        assert np.array_equal(run([image], spec, "python")[0], reference), mode
        assert_native_close(run([image], spec, "native")[0], reference, spec, mode)


def test_non_contiguous_array_input():
    base = synthetic(400, 600, seed=3)
    views = [base[::2, ::3], base[:, ::-1], base[50:250, 100:500], np.asfortranarray(base)]
    spec = PreprocessSpec(size=96, resize=110)
    for view in views:
        reference = expected(np.ascontiguousarray(view), spec)
        assert np.array_equal(run([view], spec, "python")[0], reference)
        assert_native_close(run([view], spec, "native")[0], reference, spec, "view")


def test_uint8_is_raw_pixels_without_normalization():
    """uint8 is the resized pixels: mean/std do not apply, and a constant image stays that constant."""
    array = np.full((90, 120, 3), (12, 130, 250), dtype=np.uint8)
    for backend in BACKENDS:
        out = run([array], PreprocessSpec(dtype="uint8", mean=(0.9, 0.9, 0.9), std=(9.0, 9.0, 9.0)), backend)[0]
        assert out.shape == (3, 224, 224)
        assert (out[0] == 12).all() and (out[1] == 130).all() and (out[2] == 250).all()


def test_float_outputs_are_the_normalised_pixels():
    """float32 and float16 outputs hold exactly the normalised uint8 output, value for value."""
    array = synthetic(333, 444, seed=8)
    for backend in BACKENDS:
        for layout in LAYOUTS:
            raw = run([array], PreprocessSpec(dtype="uint8", layout=layout), backend)
            for dtype in ("float32", "float16"):
                spec = PreprocessSpec(dtype=dtype, layout=layout)
                assert np.array_equal(pixels_of(run([array], spec, backend), spec), raw), (backend, layout, dtype)


# --- property: any size, any aspect ratio up to 1:50, every dtype and layout, both backends -------------

MAX_LONG, MAX_SHORT, MAX_ASPECT = 4000, 3000, 50


@st.composite
def image_shapes(draw):
    # Mostly small images, some medium, rarely a big one: the property needs sizes, not megapixels.
    limit = draw(st.sampled_from([48, 48, 48, 48, 300, 300, 300, 1200, 1200, MAX_LONG]))
    long = draw(st.integers(1, limit))
    short = draw(st.integers(max(1, -(-long // MAX_ASPECT)), min(long, MAX_SHORT)))
    portrait = draw(st.booleans())
    return (long, short) if portrait else (short, long)  # (height, width)


@given(
    shape=image_shapes(),
    channels=st.sampled_from([3, 3, None, 1, 4]),
    seed=st.integers(0, 2**32 - 1),
    resize=st.sampled_from([256, 256, None, 300]),
    interpolation=st.sampled_from(["bilinear", "bilinear", "bicubic"]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    size=st.sampled_from([224, 224, 1, 17, 256]),
)
# The corners of the domain run every time, whatever Hypothesis draws.
@example(shape=(3000, 4000), channels=3, seed=1, resize=256, interpolation="bilinear", dtype="float32", layout="NCHW", size=224)
@example(shape=(4000, 3000), channels=4, seed=2, resize=None, interpolation="bicubic", dtype="uint8", layout="NHWC", size=224)
@example(shape=(80, 4000), channels=3, seed=3, resize=256, interpolation="bilinear", dtype="float16", layout="NHWC", size=224)
@example(shape=(3000, 60), channels=None, seed=4, resize=256, interpolation="bicubic", dtype="float32", layout="NCHW", size=224)
@example(shape=(1, 1), channels=3, seed=5, resize=256, interpolation="bilinear", dtype="float32", layout="NCHW", size=224)
@example(shape=(1, 50), channels=1, seed=6, resize=256, interpolation="bilinear", dtype="uint8", layout="NCHW", size=224)
@example(shape=(50, 1), channels=3, seed=7, resize=None, interpolation="bilinear", dtype="float16", layout="NCHW", size=17)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_any_size(shape, channels, seed, resize, interpolation, dtype, layout, size):
    height, width = shape
    if resize is not None and resize < size:
        resize = size
    spec = PreprocessSpec(size=size, resize=resize, interpolation=interpolation, dtype=dtype, layout=layout)
    rng = np.random.default_rng(seed)
    full = (height, width) if channels is None else (height, width, channels)
    array = rng.integers(0, 256, full, dtype=np.uint8)  # noise: the hardest content for rounding

    outputs = {backend: run([array, array], spec, backend) for backend in BACKENDS}
    for backend, out in outputs.items():
        assert out.shape == spec.output_shape(2), backend
        assert out.dtype == spec.numpy_dtype, backend
        if out.dtype.kind == "f":
            assert np.isfinite(out).all(), backend
        assert np.array_equal(out[0], out[1]), f"{backend}: the same image twice gave two results"
    native = pixels_of(outputs["native"], spec)
    python = pixels_of(outputs["python"], spec)
    diff = np.abs(native - python)
    assert diff.max() <= 1, f"{shape} {spec}: native vs python differ by {diff.max()}/255"
