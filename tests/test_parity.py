"""Both backends against the torchvision reference on every shared photo, and against each other."""

from __future__ import annotations

import numpy as np
import pytest

import speciesclf
from reference import IMAGENET_MEAN, IMAGENET_STD, reference_batch, unnormalize
from speciesclf import PreprocessSpec, preprocess_batch

pytestmark = pytest.mark.shared

# Tolerances on the 0-255 pixel scale (see PreprocessSpec.jpeg_reduce_margin for where they come from).
MAX_IMAGE_MEAN_DIFF = 2.0  # any one photo, reduced-size JPEG decode allowed
MAX_AVERAGE_MEAN_DIFF = 1.0  # averaged over all photos
BACKEND_MAX_DIFF = 1.0 + 1e-3  # native vs python, any element
BACKEND_MAX_IMAGE_MEAN_DIFF = 0.1  # native vs python, mean over one image


@pytest.fixture(scope="module")
def reference(photo_bytes):
    """The torchvision reference of every photo, (N, 3, 224, 224) float32."""
    return reference_batch(photo_bytes)


@pytest.fixture(scope="module")
def default_outputs(photo_bytes):
    outputs = {}
    for backend in ("native", "python"):
        batch = preprocess_batch(photo_bytes, PreprocessSpec(), backend=backend, on_error="skip")
        assert batch.all_ok, {i: repr(e) for i, e in batch.errors.items()}
        outputs[backend] = batch.array
    return outputs


def per_image_mean_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(unnormalize(a) - unnormalize(b)).mean(axis=(1, 2, 3))


def test_all_photos_present(sample_photos):
    assert len(sample_photos) == 419


@pytest.mark.parametrize("backend", ["native", "python"])
def test_backend_matches_reference(backend, default_outputs, reference, sample_photos):
    out = default_outputs[backend]
    assert out.shape == reference.shape == (len(sample_photos), 3, 224, 224)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    diff = per_image_mean_diff(out, reference)
    worst = int(np.argmax(diff))
    max_elem = float(np.abs(unnormalize(out) - unnormalize(reference)).max())
    print(
        f"\n[parity] {backend} vs reference on {len(diff)} photos (0-255 scale): "
        f"max per-image mean {diff.max():.4f} ({sample_photos[worst].name}), "
        f"average {diff.mean():.4f}, max element {max_elem:.3f}"
    )
    over = {sample_photos[i].name: round(float(diff[i]), 3) for i in np.flatnonzero(diff > MAX_IMAGE_MEAN_DIFF)}
    assert not over, f"photos over {MAX_IMAGE_MEAN_DIFF}/255 mean difference: {over}"
    assert diff.mean() <= MAX_AVERAGE_MEAN_DIFF


def test_python_full_decode_is_bit_exact(photo_bytes, reference, sample_photos):
    """jpeg_reduce_margin=None always decodes at full size: the Pillow path is then the reference, bit for bit."""
    batch = preprocess_batch(photo_bytes, PreprocessSpec(jpeg_reduce_margin=None), backend="python")
    assert batch.all_ok
    differing = [sample_photos[i].name for i in range(len(photo_bytes)) if not np.array_equal(batch.array[i], reference[i])]
    print(f"\n[parity] python (jpeg_reduce_margin=None) differs from the reference on {len(differing)} photos")
    assert not differing, f"{len(differing)} photos differ, e.g. {differing[:5]}"


def test_native_full_decode_close_to_reference(photo_bytes, reference, sample_photos):
    batch = preprocess_batch(photo_bytes, PreprocessSpec(jpeg_reduce_margin=None), backend="native")
    assert batch.all_ok
    diff = np.abs(unnormalize(batch.array) - unnormalize(reference))
    per_image = diff.mean(axis=(1, 2, 3))
    print(
        f"\n[parity] native (jpeg_reduce_margin=None) vs reference: max element {diff.max():.4f}, "
        f"max per-image mean {per_image.max():.4f}, average {per_image.mean():.4f}"
    )
    assert diff.max() <= BACKEND_MAX_DIFF
    assert per_image.max() <= BACKEND_MAX_IMAGE_MEAN_DIFF


def test_native_matches_python(default_outputs, sample_photos):
    diff = np.abs(unnormalize(default_outputs["native"]) - unnormalize(default_outputs["python"]))
    per_image = diff.mean(axis=(1, 2, 3))
    worst = int(np.argmax(per_image))
    print(
        f"\n[parity] native vs python: max element {diff.max():.4f}, max per-image mean {per_image.max():.4f} "
        f"({sample_photos[worst].name}), average {per_image.mean():.4f}"
    )
    over = [sample_photos[i].name for i in np.flatnonzero(diff.max(axis=(1, 2, 3)) > BACKEND_MAX_DIFF)]
    assert not over, f"elements more than 1/255 apart in {over[:5]}"
    assert per_image.max() <= BACKEND_MAX_IMAGE_MEAN_DIFF


def test_backends_agree_on_decode(photo_bytes, sample_photos):
    """The decoded photos themselves: the same libjpeg semantics on both paths (every 7th photo)."""
    for path, data in list(zip(sample_photos, photo_bytes))[::7]:
        native = speciesclf.decode(data, backend="native")
        python = speciesclf.decode(data, backend="python")
        assert native.shape == python.shape, path.name
        assert np.abs(native.astype(np.int16) - python).max() <= 1, path.name


def test_unnormalize_roundtrip():
    """The helper the tolerances rely on: pixel values come back from the normalised reference."""
    values = np.arange(256, dtype=np.float32)
    chw = np.broadcast_to(values, (3, 1, 256)).copy()
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    normalised = (chw / np.float32(255) - mean) / std
    assert np.abs(unnormalize(normalised) - chw).max() < 1e-3


@pytest.mark.skipif(
    int(__import__("PIL").__version__.split(".")[0]) < 13,
    reason="the native core follows Pillow 13's resize pass order; older Pillow differs by up to 1/255",
)
def test_native_is_bit_exact_with_python_on_pillow_13(default_outputs, sample_photos):
    """Same decoder library behaviour, same weights, same rounding, same pass order: the same bits."""
    differing = [
        sample_photos[i].name
        for i in range(len(sample_photos))
        if not np.array_equal(default_outputs["native"][i], default_outputs["python"][i])
    ]
    assert not differing, f"{len(differing)} photos differ, e.g. {differing[:5]}"
