"""Bad inputs fail alone, fast, with a typed error; good neighbours are untouched; ``out=`` is checked.

The corrupt files are generated at test time into a temporary ``corrupt/`` folder (no binaries in git).
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import speciesclf
from speciesclf import (
    DecodeError,
    EmptyInputError,
    ImageError,
    ImageReadError,
    ImageTooLargeError,
    InvalidImageError,
    PreprocessSpec,
    UnsupportedFormatError,
    preprocess_batch,
)

BACKENDS = ("native", "python")
TIME_LIMIT_S = 1.0


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def small_image(height: int = 48, width: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) + rng.integers(0, 30, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def patch_jpeg_size(jpeg: bytes, height: int, width: int) -> bytes:
    """Rewrite the height and width of the SOF segment (SOF0/1/2) in place."""
    data = bytearray(jpeg)
    pos = 2
    while pos + 4 <= len(data):
        assert data[pos] == 0xFF
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in (0xC0, 0xC1, 0xC2):
            data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        pos += 2 + length
    raise AssertionError("no SOF marker")


def png_chunks(png: bytes):
    pos = 8
    while pos + 12 <= len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        yield pos, png[pos + 4 : pos + 8], length
        pos += 12 + length


def patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """New IHDR width and height with the IHDR CRC fixed up, so that the header itself is valid."""
    data = bytearray(png)
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def break_png_crc(png: bytes, kind: bytes) -> bytes:
    data = bytearray(png)
    for pos, chunk, length in png_chunks(png):
        if chunk == kind:
            data[pos + 8 + length] ^= 0x5A  # first byte of the stored CRC
            return bytes(data)
    raise AssertionError(f"no {kind!r} chunk")


def malformed_exif_jpeg(jpeg: bytes) -> bytes:
    """A JPEG whose APP1 EXIF claims an IFD far past its end (and an orientation entry cut in half)."""
    tiff = b"MM\x00\x2a" + struct.pack(">I", 0x7FFFFFF0) + b"\x00\x05\x01\x12\x00\x03"
    payload = b"Exif\x00\x00" + tiff
    # After the JFIF APP0, as cameras and editors write it.
    (app0_length,) = struct.unpack(">H", jpeg[4:6])
    cut = 4 + app0_length
    return jpeg[:cut] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[cut:]


GOOD = small_image()
GOOD_JPEG = encode(GOOD, "JPEG", quality=90)
GOOD_PNG = encode(GOOD, "PNG")  # one IDAT chunk
# Noise does not compress: Pillow splits its IDAT data into several chunks.
NOISY_PNG = encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (160, 160, 3), dtype=np.uint8)), "PNG")


def break_png_crc_nth(png: bytes, kind: bytes, index: int) -> bytes:
    positions = [(pos, length) for pos, chunk, length in png_chunks(png) if chunk == kind]
    assert len(positions) >= 2, f"need several {kind!r} chunks, got {len(positions)}"
    pos, length = positions[index]
    data = bytearray(png)
    data[pos + 8 + length] ^= 0x5A
    return bytes(data)


# name -> (builder(good photo bytes) -> bytes, expected error type, or None: a good image after all)
SYNTHETIC_CASES = {
    "empty": (lambda: b"", EmptyInputError),
    "random-bytes": (lambda: b"\x00" + bytes(np.random.default_rng(1).integers(0, 256, 4095, dtype=np.uint8)), UnsupportedFormatError),
    "wrong-magic-jpeg": (lambda: b"\x00\x00" + GOOD_JPEG[2:], UnsupportedFormatError),
    "wrong-magic-png": (lambda: b"\x89PNX" + GOOD_PNG[4:], UnsupportedFormatError),
    "text-file": (lambda: b"hello, this is not an image\n" * 20, UnsupportedFormatError),
    "jpeg-60000x60000": (lambda: patch_jpeg_size(GOOD_JPEG, 60000, 60000), ImageTooLargeError),
    "png-60000x60000": (lambda: patch_png_size(GOOD_PNG, 60000, 60000), ImageTooLargeError),
    "png-broken-crc-idat": (lambda: break_png_crc(GOOD_PNG, b"IDAT"), DecodeError),
    "png-broken-crc-ihdr": (lambda: break_png_crc(GOOD_PNG, b"IHDR"), DecodeError),
    "png-broken-crc-first-of-several-idat": (lambda: break_png_crc_nth(NOISY_PNG, b"IDAT", 0), DecodeError),
    "png-broken-crc-last-of-several-idat": (lambda: break_png_crc_nth(NOISY_PNG, b"IDAT", -1), DecodeError),
    "png-broken-crc-iend": (lambda: break_png_crc(GOOD_PNG, b"IEND"), DecodeError),
    "jpeg-malformed-exif": (lambda: malformed_exif_jpeg(GOOD_JPEG), None),
    "jpeg-only-soi": (lambda: GOOD_JPEG[:3], DecodeError),
    "png-only-signature": (lambda: GOOD_PNG[:8], DecodeError),
    "webp-truncated": (lambda: encode(GOOD, "WEBP", quality=80)[:60], DecodeError),
}
TRUNCATIONS = [k / 10 for k in range(1, 10)]


@pytest.fixture(scope="session")
def corrupt_dir(tmp_path_factory) -> Path:
    """tests/corrupt/ made at test time: one file per synthetic case."""
    folder = tmp_path_factory.mktemp("corrupt")
    for name, (build, _) in SYNTHETIC_CASES.items():
        (folder / f"{name}.bin").write_bytes(build())
    (folder / "good.jpg").write_bytes(GOOD_JPEG)
    return folder


@pytest.fixture(scope="session")
def truncated_dir(tmp_path_factory, one_photo) -> Path:
    """A real photo cut at each tenth of its length."""
    folder = tmp_path_factory.mktemp("corrupt-truncated")
    for fraction in TRUNCATIONS:
        (folder / f"truncated-{int(fraction * 100)}.jpg").write_bytes(one_photo[: int(len(one_photo) * fraction)])
    return folder


def check_isolated(good, bad, expected: type[ImageError] | None, backend: str, what: str) -> None:
    spec = PreprocessSpec()
    alone = preprocess_batch([good], spec, backend=backend).array[0]
    start = time.perf_counter()
    batch = preprocess_batch([good, bad, good], spec, backend=backend, on_error="skip")
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT_S, f"{what}: {elapsed:.2f} s"
    assert batch.array.shape == (3, 3, 224, 224)
    assert np.array_equal(batch.array[0], alone) and np.array_equal(batch.array[2], alone), what
    assert set(batch.errors) <= {1}, f"{what}: good slots failed: {batch.errors}"
    if expected is None:
        assert batch.all_ok and batch.ok.all(), f"{what}: {batch.errors}"
        assert np.isfinite(batch.array[1]).all()
        return
    assert list(batch.ok) == [True, False, True], what
    error = batch.errors[1]
    assert type(error) is expected, f"{what}: {type(error).__name__}: {error} (expected {expected.__name__})"
    assert str(error), f"{what}: the error carries no message"
    assert np.isnan(batch.array[1]).all(), what
    assert np.array_equal(batch.valid(), np.stack([alone, alone]))
    # The same item with on_error="raise": the typed error itself.
    start = time.perf_counter()
    with pytest.raises(ImageError) as raised:
        preprocess_batch([good, bad, good], spec, backend=backend, on_error="raise")
    assert time.perf_counter() - start < TIME_LIMIT_S
    assert type(raised.value) is expected, f"{what}: raised {type(raised.value).__name__}: {raised.value}"
    # decode() agrees on the kind of failure.
    if isinstance(bad, (bytes, Path)):
        with pytest.raises(expected):
            speciesclf.decode(bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SYNTHETIC_CASES))
def test_corrupt_item_fails_alone(name, backend, corrupt_dir):
    expected = SYNTHETIC_CASES[name][1]
    path = corrupt_dir / f"{name}.bin"
    check_isolated(GOOD_JPEG, path.read_bytes(), expected, backend, f"{name} (bytes)")
    check_isolated(corrupt_dir / "good.jpg", path, expected, backend, f"{name} (path)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fraction", TRUNCATIONS, ids=lambda f: f"{int(f * 100)}pct")
def test_truncated_photo_fails_alone(fraction, backend, truncated_dir, one_photo):
    bad = (truncated_dir / f"truncated-{int(fraction * 100)}.jpg").read_bytes()
    check_isolated(one_photo, bad, DecodeError, backend, f"truncated at {fraction:.0%}")


def test_too_large_by_limits():
    """max_pixels and max_bytes are the spec's, checked before decoding."""
    for backend in BACKENDS:
        batch = preprocess_batch([GOOD_JPEG, GOOD_PNG], PreprocessSpec(max_pixels=64 * 48 - 1), backend=backend, on_error="skip")
        assert set(batch.errors) == {0, 1}
        assert all(type(e) is ImageTooLargeError for e in batch.errors.values())
        batch = preprocess_batch([GOOD_JPEG, GOOD_PNG], PreprocessSpec(max_pixels=64 * 48), backend=backend)
        assert batch.all_ok
        batch = preprocess_batch([GOOD_JPEG], PreprocessSpec(max_bytes=len(GOOD_JPEG) - 1), backend=backend, on_error="skip")
        assert type(batch.errors[0]) is ImageTooLargeError


def test_too_large_file_on_disk(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(GOOD_JPEG)
    for backend in BACKENDS:
        batch = preprocess_batch([path], PreprocessSpec(max_bytes=100), backend=backend, on_error="skip")
        assert type(batch.errors[0]) is ImageTooLargeError


# --- wrong inputs --------------------------------------------------------------------------------------

WRONG_INPUTS = {
    "int": 5,
    "none": None,
    "float": 3.5,
    "list": [1, 2, 3],
    "dict": {"a": 1},
    "float-array": np.zeros((32, 32, 3), dtype=np.float32),
    "int64-array": np.zeros((32, 32, 3), dtype=np.int64),
    "5-channel-array": np.zeros((32, 32, 5), dtype=np.uint8),
    "2-channel-array": np.zeros((32, 32, 2), dtype=np.uint8),
    "4d-array": np.zeros((2, 32, 32, 3), dtype=np.uint8),
    "empty-array": np.zeros((0, 32, 3), dtype=np.uint8),
    "2d-memoryview": memoryview(np.zeros((8, 8), dtype=np.uint8)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(WRONG_INPUTS))
def test_wrong_input_types(name, backend):
    bad = WRONG_INPUTS[name]
    batch = preprocess_batch([GOOD_JPEG, bad, GOOD_JPEG], backend=backend, on_error="skip")
    assert list(batch.ok) == [True, False, True]
    assert type(batch.errors[1]) is InvalidImageError, f"{type(batch.errors[1]).__name__}: {batch.errors[1]}"
    assert isinstance(batch.errors[1], TypeError)  # InvalidImageError is also a TypeError
    with pytest.raises(InvalidImageError):
        preprocess_batch([bad], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_path(backend, tmp_path):
    missing = tmp_path / "does-not-exist.jpg"
    for item in (missing, str(missing), tmp_path):  # a folder is not readable as a file either
        batch = preprocess_batch([GOOD_JPEG, item], backend=backend, on_error="skip")
        assert list(batch.ok) == [True, False]
        assert type(batch.errors[1]) is ImageReadError
        assert isinstance(batch.errors[1], OSError)
        with pytest.raises(ImageReadError):
            preprocess_batch([item], backend=backend)
    with pytest.raises(ImageReadError):
        speciesclf.decode(missing, backend=backend)


def test_raise_reports_the_first_failed_item():
    for backend in BACKENDS:
        with pytest.raises(ImageError) as raised:
            preprocess_batch([GOOD_JPEG, None, b"", GOOD_JPEG], backend=backend)
        assert type(raised.value) is InvalidImageError
        assert any("item 1 of a batch of 4" in note for note in getattr(raised.value, "__notes__", []))


def test_on_error_and_threads_are_validated():
    with pytest.raises(ValueError):
        preprocess_batch([GOOD_JPEG], on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        preprocess_batch([GOOD_JPEG], threads=0)
    with pytest.raises(TypeError):
        preprocess_batch([GOOD_JPEG], spec={"size": 224})  # type: ignore[arg-type]


def test_empty_batch():
    for backend in BACKENDS:
        batch = preprocess_batch([], backend=backend)
        assert batch.array.shape == (0, 3, 224, 224) and len(batch) == 0 and batch.all_ok


# --- out= ----------------------------------------------------------------------------------------------

def test_out_rejected():
    spec = PreprocessSpec()
    read_only = np.zeros((2, 3, 224, 224), dtype=np.float32)
    read_only.flags.writeable = False
    bad_outs = {
        "wrong dtype": np.zeros((2, 3, 224, 224), dtype=np.float64),
        "float16 for float32": np.zeros((2, 3, 224, 224), dtype=np.float16),
        "wrong shape": np.zeros((2, 3, 224, 223), dtype=np.float32),
        "NHWC for NCHW": np.zeros((2, 224, 224, 3), dtype=np.float32),
        "3-d": np.zeros((3, 224, 224), dtype=np.float32),
        "non-contiguous": np.zeros((4, 3, 224, 224), dtype=np.float32)[::2],
        "fortran order": np.asfortranarray(np.zeros((2, 3, 224, 224), dtype=np.float32)),
        "read-only": read_only,
        "too few rows": np.zeros((1, 3, 224, 224), dtype=np.float32),
        "torch wrong dtype": torch.zeros((2, 3, 224, 224), dtype=torch.float64),
        "torch wrong shape": torch.zeros((2, 3, 224, 225)),
        "torch non-contiguous": torch.zeros((2, 224, 224, 3)).permute(0, 3, 1, 2),
        "torch too few rows": torch.zeros((1, 3, 224, 224)),
    }
    for backend in BACKENDS:
        for what, out in bad_outs.items():
            before = out.clone() if isinstance(out, torch.Tensor) else out.copy()
            with pytest.raises(ValueError):
                preprocess_batch([GOOD_JPEG, GOOD_JPEG], spec, backend=backend, out=out)
            unchanged = torch.equal(out, before) if isinstance(out, torch.Tensor) else np.array_equal(out, before)
            assert unchanged, f"{what}: out was written although it was rejected"
        with pytest.raises(TypeError):
            preprocess_batch([GOOD_JPEG], spec, backend=backend, out=[0.0] * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_out_numpy_written_in_place(backend, dtype):
    spec = PreprocessSpec(dtype=dtype)
    expected = preprocess_batch([GOOD_JPEG, GOOD_PNG], spec, backend=backend).array
    out = np.full((5, 3, 224, 224), 7, dtype=spec.numpy_dtype)  # more rows than items
    batch = preprocess_batch([GOOD_JPEG, GOOD_PNG], spec, backend=backend, out=out)
    assert np.shares_memory(batch.array, out) and batch.array.shape[0] == 2
    assert np.array_equal(out[:2], expected)
    assert (out[2:] == 7).all(), "rows past the batch must be left alone"


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_torch_tensor_written_in_place(backend):
    spec = PreprocessSpec()
    expected = preprocess_batch([GOOD_JPEG, GOOD_PNG], spec, backend=backend).array
    tensors = [torch.full((2, 3, 224, 224), 7.0), torch.full((4, 3, 224, 224), 7.0)]
    if torch.cuda.is_available():
        tensors.append(torch.full((3, 3, 224, 224), 7.0).pin_memory())
    for out in tensors:
        pointer = out.data_ptr()
        batch = preprocess_batch([GOOD_JPEG, GOOD_PNG], spec, backend=backend, out=out)
        assert out.data_ptr() == pointer
        assert isinstance(batch.array, torch.Tensor) and batch.array.data_ptr() == pointer
        assert tuple(batch.array.shape) == (2, 3, 224, 224)
        assert np.array_equal(out[:2].numpy(), expected)
        assert bool((out[2:] == 7.0).all())


def test_out_torch_failed_slot_is_nan():
    out = torch.zeros((3, 3, 224, 224))
    for backend in BACKENDS:
        batch = preprocess_batch([GOOD_JPEG, b"", GOOD_JPEG], backend=backend, out=out, on_error="skip")
        assert batch.array.data_ptr() == out.data_ptr()
        assert bool(torch.isnan(out[1]).all()) and bool(torch.isfinite(out[0]).all())


def test_uint8_failed_slot_is_zero():
    for backend in BACKENDS:
        batch = preprocess_batch([GOOD_JPEG, b"xx"], PreprocessSpec(dtype="uint8"), backend=backend, on_error="skip")
        assert (batch.array[1] == 0).all() and batch.array[0].any()


# --- fuzz ----------------------------------------------------------------------------------------------

def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = rng.integers(0, 6)
    if kind == 0:  # bit flips
        for _ in range(int(rng.integers(1, 12))):
            i = int(rng.integers(0, len(buf)))
            buf[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # a run of one byte value
        start = int(rng.integers(0, len(buf)))
        length = int(rng.integers(1, 64))
        buf[start : start + length] = bytes([int(rng.choice([0x00, 0xFF, int(rng.integers(0, 256))]))]) * length
    elif kind == 2:  # truncation
        buf = buf[: int(rng.integers(1, len(buf)))]
    elif kind == 3:  # chunk duplication
        start = int(rng.integers(0, len(buf)))
        length = int(rng.integers(1, 512))
        at = int(rng.integers(0, len(buf)))
        buf[at:at] = buf[start : start + length]
    elif kind == 4:  # random bytes over the header region
        start = int(rng.integers(0, min(len(buf), 200)))
        length = int(rng.integers(1, 16))
        buf[start : start + length] = bytes(rng.integers(0, 256, length, dtype=np.uint8))
    else:  # a chunk deleted
        start = int(rng.integers(0, len(buf)))
        del buf[start : start + int(rng.integers(1, 256))]
    return bytes(buf)


@pytest.mark.slow
def test_fuzz_mutated_files(one_photo):
    photo = Image.open(io.BytesIO(one_photo)).convert("RGB")
    small = photo.resize((photo.width // 3, photo.height // 3), Image.BILINEAR)
    seeds = {
        "photo.jpeg": one_photo,
        "progressive.jpeg": encode(small, "JPEG", quality=85, progressive=True),
        "photo.png": encode(small, "PNG"),
        "interlaced-palette.png": encode(small.quantize(64), "PNG", optimize=True),
        "photo.webp": encode(small, "WEBP", quality=80),
        "lossless.webp": encode(small, "WEBP", lossless=True),
        "photo.gif": encode(small.quantize(64), "GIF"),
    }
    rng = np.random.default_rng(20240611)
    names = sorted(seeds)
    spec = PreprocessSpec(size=64, resize=72)
    outcomes = {"ok": 0, "error": 0}
    disagreements = []
    for i in range(300):
        name = names[i % len(names)]
        data = mutate(seeds[name], rng)
        results = {}
        for backend in BACKENDS:
            try:
                batch = preprocess_batch([data], spec, backend=backend, on_error="skip")
            except Exception as e:  # anything escaping on_error="skip" is a bug
                pytest.fail(f"mutation {i} of {name} ({len(data)} bytes), {backend}: {type(e).__name__}: {e}")
            if batch.all_ok:
                assert np.isfinite(batch.array).all()
                outcomes["ok"] += 1
            else:
                assert isinstance(batch.errors[0], ImageError)
                assert np.isnan(batch.array).all()
                outcomes["error"] += 1
            try:
                speciesclf.decode(data, backend=backend)
                results[backend] = "ok"
            except ImageError as e:
                results[backend] = type(e).__name__
            except Exception as e:
                pytest.fail(f"decode of mutation {i} of {name}, {backend}: {type(e).__name__}: {e}")
        if results["native"] != results["python"]:
            disagreements.append((i, name, results))
    print(f"\n[fuzz] 300 mutations x 2 backends: {outcomes}; decode disagreements: {len(disagreements)}")
    for item in disagreements[:10]:
        print("  ", item)
