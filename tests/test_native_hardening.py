"""Hostile inputs the native core once crashed on or mishandled, found by a review and pinned here, each on
both backends: extreme aspect ratios (an int overflow in the resize geometry wrote out of bounds), damaged
PNG headers, non-UTF-8 codec messages, a decoder left mid-decode by an allocation failure, and scratch
memory kept after a huge decode."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
import speciesclf
from forking import exit_code_in_child
from PIL import Image
from speciesclf import DecodeError, ImageError, ImageTooLargeError, PreprocessSpec

BACKENDS = ["native", "python"]


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def with_ihdr_size(data: bytes, width: int, height: int, fix_crc: bool) -> bytes:
    b = bytearray(data)
    assert b[12:16] == b"IHDR"
    b[16:24] = struct.pack(">II", width, height)
    if fix_crc:
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


@pytest.fixture(scope="module")
def photo(sample_photos) -> bytes:
    return sample_photos[0].read_bytes()


def outcome(items, backend: str, spec: PreprocessSpec = PreprocessSpec()) -> tuple[list[bool], dict]:
    batch = speciesclf.preprocess_batch(items, spec, backend=backend, on_error="skip")
    return batch.ok.tolist(), {i: (type(e), str(e)) for i, e in batch.errors.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_damaged_ihdr_is_a_crc_error_not_a_size_to_plan_with(photo: bytes, backend: str) -> None:
    # a 1 x 30 PNG whose height byte flipped to 16,777,246 rows, CRC left as it was
    hostile = with_ihdr_size(png(1, 30), 1, 16_777_246, fix_crc=False)
    ok, errors = outcome([photo, hostile], backend)
    assert ok == [True, False]
    assert errors[1] == (DecodeError, "PNG data: CRC mismatch in 'IHDR' chunk")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width, height", [(1, 16_777_246), (16_000_000, 1), (1, 60_000), (60_000, 3)])
def test_extreme_aspect_ratios_are_refused_before_resizing(photo: bytes, backend: str, width: int, height: int) -> None:
    # a valid header (CRC fixed) with no pixel data behind it: refused from the geometry, never decoded
    hostile = with_ihdr_size(png(1, 30), width, height, fix_crc=True)
    ok, errors = outcome([photo, hostile], backend)
    assert ok == [True, False]
    kind, message = errors[1]
    assert kind is ImageTooLargeError and "aspect ratio too extreme" in message, message


@pytest.mark.parametrize("shape", [(9_000_000, 1), (1, 9_000_000), (60_000, 1, 3)])
def test_extreme_pixel_arrays_get_the_same_error_from_both_backends(shape) -> None:
    array = np.zeros(shape, np.uint8)
    outcomes = {backend: outcome([array], backend) for backend in BACKENDS}
    assert outcomes["native"] == outcomes["python"]
    ok, errors = outcomes["native"]
    assert ok == [False] and errors[0][0] is ImageTooLargeError


def test_long_panoramas_within_the_limits_still_work() -> None:
    panorama = np.tile(np.arange(500, dtype=np.uint8)[None, :, None], (10, 1, 3))  # 1:50
    results = [speciesclf.preprocess_batch([panorama], backend=b).array for b in BACKENDS]
    assert np.abs(results[0] - results[1]).max() < 0.02


def test_a_lying_webp_canvas_is_a_typed_error(photo: bytes) -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    buffer = io.BytesIO()
    Image.new("RGB", (1, 30)).save(buffer, "WEBP", lossless=True, exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"VP8X"
    data[27:30] = (9_000_000 - 1).to_bytes(3, "little")  # canvas height, the frame stays 30 rows
    for backend in BACKENDS:
        ok, errors = outcome([photo, bytes(data)], backend)
        assert ok == [True, False] and issubclass(errors[1][0], ImageError)


def test_a_codec_message_quoting_non_utf8_bytes_loses_nothing(photo: bytes) -> None:
    good = png(8, 8)
    chunk = b"\x00\x00\x00\x01" + b"\x85\x86\x87\x88" + b"x" + b"\x00\x00\x00\x00"  # wrong CRC
    bad = good[:33] + chunk + good[33:]
    expected = "PNG data: CRC mismatch in '\\x85\\x86\\x87\\x88' chunk"
    for backend in BACKENDS:
        assert outcome([photo, bad], backend) == ([True, False], {1: (DecodeError, expected)})
        with pytest.raises(DecodeError) as e:
            speciesclf.decode(bad, backend=backend)
        assert str(e.value) == expected


def test_an_allocation_failure_mid_decode_does_not_spill_into_the_next_image(sample_photos) -> None:
    # In a child with a 2.5 GB address-space limit, a 30000 x 30000 decode fails to allocate; the same
    # thread's decompressor must be usable for the next photo at once.
    script = textwrap.dedent(f"""
        import resource, struct
        resource.setrlimit(resource.RLIMIT_AS, (2_500_000_000, 2_500_000_000))
        import speciesclf
        photo = open({str(sample_photos[0])!r}, "rb").read()
        b, i = bytearray(photo), 2
        while b[i + 1] not in (0xC0, 0xC1, 0xC2):
            i += 2 + struct.unpack(">H", b[i + 2:i + 4])[0]
        b[i + 5:i + 9] = struct.pack(">HH", 30000, 30000)
        try:
            speciesclf.decode(bytes(b), max_pixels=10**10, backend="native")
            print("big: decoded")
        except speciesclf.ImageError as e:
            print("big:", e)
        print("next:", speciesclf.decode(photo, backend="native").shape)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "big: out of memory", lines
    assert lines[1].startswith("next: (") and lines[1] != "next: (30000, 30000, 3)", lines


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_decode_does_not_keep_a_huge_images_scratch_memory() -> None:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: decode() needs a second, oriented buffer
    Image.new("RGB", (6000, 5000), (90, 90, 200)).save(buffer, "JPEG", quality=50, exif=exif.tobytes())
    data = buffer.getvalue()
    speciesclf.decode(png(64, 64), backend="native")  # the thread's small buffers exist already
    before = _rss_mib()
    array = speciesclf.decode(data, backend="native")
    assert array.shape == (6000, 5000, 3)
    del array
    assert _rss_mib() - before < 40  # 2 x 90 MB of scratch would stay without the trim


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forked_child_can_preprocess_while_the_parent_was_busy(backend: str) -> None:
    # Two threads keep the pools' locks busy (tiny images) while the main thread forks: a child must
    # neither hang on a mutex copied while held nor wait for worker threads that exist only in the parent.
    import threading

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    items = [buffer.getvalue()] * 4
    spec = PreprocessSpec(size=8, resize=None, dtype="uint8")
    expected = speciesclf.preprocess_batch(items, spec, backend=backend, threads=4).array
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            speciesclf.preprocess_batch(items, spec, backend=backend, threads=4)

    workers = [threading.Thread(target=busy) for _ in range(2)]
    for t in workers:
        t.start()
    outcomes = []
    try:
        for _ in range(20):
            outcomes.append(exit_code_in_child(
                lambda: np.array_equal(speciesclf.preprocess_batch(items, spec, backend=backend, threads=4).array,
                                       expected), timeout_s=3))
    finally:
        stop.set()
        for t in workers:
            t.join()
    assert outcomes == [0] * 20, outcomes


def progressive_with_repeated_scans(photo: bytes, repeats: int, size: tuple[int, int] | None = None) -> bytes:
    """A real progressive JPEG whose last scan is repeated (a valid refinement of nothing new), optionally
    with its frame header claiming another size."""
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", progressive=True, quality=80)
    data = bytearray(buffer.getvalue())
    i, scans = 2, []
    while data[i + 1] != 0xD9:
        marker, (length,) = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])
        if marker == 0xC2 and size is not None:
            data[i + 5:i + 9] = struct.pack(">HH", size[1], size[0])
        if marker == 0xDA:
            j = i + 2 + length
            while not (data[j] == 0xFF and data[j + 1] != 0 and not 0xD0 <= data[j + 1] <= 0xD7):
                j += 1
            scans.append((i, j))
            i = j
            continue
        i += 2 + length
    start, end = scans[-1]
    return bytes(data[:end]) + bytes(data[start:end]) * repeats + b"\xff\xd9"


def test_progressive_scans_are_budgeted_by_image_size(photo: bytes) -> None:
    huge = progressive_with_repeated_scans(photo, 100, size=(9400, 9400))  # 88 MP: at most 24 scans
    for backend in BACKENDS:
        start = time.perf_counter()
        ok, errors = outcome([photo, huge], backend)
        assert time.perf_counter() - start < 1.0
        assert ok == [True, False]
        assert errors[1] == (DecodeError, "JPEG: more than 24 progressive scans")


def test_many_scans_of_a_small_image_are_decoded_alike_and_too_many_refused(photo: bytes) -> None:
    allowed = progressive_with_repeated_scans(photo, 300)  # about 310 scans of a 0.2 MP photo
    results = [speciesclf.preprocess_batch([allowed], backend=b).array for b in BACKENDS]
    assert np.array_equal(results[0], results[1])
    refused = progressive_with_repeated_scans(photo, 600)
    for backend in BACKENDS:
        assert outcome([refused], backend)[1][0] == (DecodeError, "JPEG: more than 500 progressive scans")
