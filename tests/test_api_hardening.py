"""Regression tests for API hardening: bad items fail alone with a typed error, bad arguments fail up front,
predict_iter keeps what it computed, and the classifier's resources (buffers, threads) stay bounded."""

from __future__ import annotations

import pathlib
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import speciesclf.sources.sources
from speciesclf import (
    Classifier,
    ImageReadError,
    ImageTooLargeError,
    InvalidImageError,
    PreprocessSpec,
    preprocess_batch,
)


@pytest.fixture()
def own_classifier(shared_dir, tmp_path, monkeypatch):
    """A species100 classifier of the test's own, for tests that close, reload or inspect it."""
    monkeypatch.setenv("SPECIESCLF_WEIGHTS", str(shared_dir / "models"))
    monkeypatch.setenv("SPECIESCLF_HOME", str(tmp_path / "home"))

    def load(**options):
        classifier = Classifier.load("species100", threads=1, **options)
        made.append(classifier)
        return classifier

    made: list[Classifier] = []
    yield load
    for classifier in made:
        classifier.close()


def errors_of(predictions) -> list[type | None]:
    return [None if p.error is None else type(p.error) for p in predictions]


# --- 1. out= over read-only memory ------------------------------------------------------------------------


def test_torch_out_over_read_only_mmap_is_refused(tmp_path, one_photo):
    path = tmp_path / "ro.bin"
    np.zeros((1, 3, 224, 224), np.float32).tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=(1, 3, 224, 224))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "the given NumPy array is not writable"
        out = torch.from_numpy(mapped)
    with pytest.raises(ValueError, match="read-only"):  # before: a segfault
        preprocess_batch([one_photo], PreprocessSpec(), out=out, threads=1)
    assert not mapped.any()


def test_writable_torch_out_is_still_filled(one_photo):
    out = torch.zeros((2, 3, 224, 224))
    batch = preprocess_batch([one_photo], PreprocessSpec(), out=out, threads=1)
    assert batch.array.data_ptr() == out.data_ptr() and out[0].abs().sum() > 0


# --- 2-6. one bad item, the rest of the batch proceeds ----------------------------------------------------


class _NoSizeRead:
    def read(self):  # a file-like object whose read() takes no size
        return b""


class _FailingRead:
    def read(self, size=-1):
        raise OSError("device gone")


def test_failing_file_objects_fail_alone(species100, sample_photos):
    with open(sample_photos[0], "rb") as closed:
        pass
    predictions = species100.predict_batch([sample_photos[1], closed, _NoSizeRead(), _FailingRead()])
    assert errors_of(predictions) == [None, ImageReadError, InvalidImageError, ImageReadError]


@pytest.mark.parametrize("answer", [b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"])
def test_broken_http_answers_are_read_errors(answer):
    # A bad status line, an incomplete body: the URL's failure (ImageReadError), never another exception.
    import socket

    listener = socket.create_server(("127.0.0.1", 0))

    def answer_once():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.jpg"
    try:
        with pytest.raises(ImageReadError, match="cannot fetch"):
            speciesclf.sources.sources.to_image_source(url, max_bytes=1000,
                                               allow_urls=speciesclf.UrlPolicy(allow_networks=("127.0.0.1/32",)))
    finally:
        thread.join(5)
        listener.close()


@pytest.mark.parametrize("tensor", [
    torch.full((3, 8, 8), float("nan")),
    torch.full((3, 8, 8), float("inf")),
    torch.empty((3, 8, 8), device="meta"),
    torch.ones((3, 8, 8)).to_sparse(),
], ids=["nan", "inf", "meta", "sparse"])
def test_unusable_tensors_fail_alone(species100, sample_photos, tensor):
    predictions = species100.predict_batch([sample_photos[0], tensor])
    assert errors_of(predictions) == [None, InvalidImageError]


def test_path_with_nul_byte_fails_alone(species100, sample_photos):
    predictions = species100.predict_batch([sample_photos[0], pathlib.Path("a\0b"), "a\0b"])
    assert errors_of(predictions) == [None, ImageReadError, ImageReadError]


@pytest.mark.parametrize("backend", ["native", "python"])
def test_empty_pil_image_same_error_on_both_backends(backend, one_photo):
    batch = preprocess_batch([one_photo, Image.new("RGB", (0, 0)), Image.new("L", (5, 0))], PreprocessSpec(),
                             backend=backend, on_error="skip", threads=1)
    assert batch.ok.tolist() == [True, False, False]
    assert all(type(e) is InvalidImageError for e in batch.errors.values())


def test_long_missing_path_is_not_taken_for_base64(species100):
    for path in ["photos/2024/camera_trap/site_07/IMG_000123_fox_morning_batch_a_cam2",
                 "/data/trap/site07/IMG000123foxmorningbatchacam2xxxxxxxxxxxxxxxxxxxxxxx"]:
        assert len(path) >= 64
        error = species100.predict(path).error
        assert type(error) is ImageReadError and "no such file" in str(error)


def test_base64_with_slashes_still_decodes(species100, one_photo):
    import base64

    text = base64.b64encode(one_photo).decode()
    assert "/" in text
    assert species100.predict(text).ok


# --- 7-8, 11. predict_iter and argument checks --------------------------------------------------------------


def test_predict_iter_delivers_predictions_before_the_source_fails(species100, sample_photos):
    def source(n):
        yield from sample_photos[:n]
        raise RuntimeError("source failed")

    for n, batch_size in [(3, 2), (4, 2), (1, 4)]:
        got = []
        with pytest.raises(RuntimeError, match="source failed"):
            for prediction in species100.predict_iter(source(n), batch_size=batch_size):
                got.append(prediction)
        assert len(got) == n and all(p.ok for p in got)


def test_predict_iter_still_prepares_the_next_batch_ahead(species100, sample_photos):
    pulled = []

    def source():
        for i, photo in enumerate(sample_photos[:8]):
            pulled.append(i)
            yield photo

    stream = species100.predict_iter(source(), batch_size=2)
    next(stream)
    assert len(pulled) == 4  # the first batch and the one prepared during its inference
    assert len(list(stream)) == 7


@pytest.mark.parametrize("batch_size, error", [(0, ValueError), (-1, ValueError), (2.5, TypeError),
                                               ("2", TypeError), (True, TypeError)])
def test_predict_iter_batch_size_is_checked_when_called(species100, batch_size, error):
    with pytest.raises(error, match="batch_size"):
        species100.predict_iter(iter([]), batch_size=batch_size)


@pytest.mark.parametrize("top_k, error", [(2.0, TypeError), (None, TypeError), ("3", TypeError),
                                          (True, TypeError), (0, ValueError)])
def test_top_k_is_checked_before_any_work(species100, top_k, error):
    seen = []

    def source():
        seen.append(1)
        yield b""

    with pytest.raises(error, match="top_k"):
        species100.predict_batch(source(), top_k=top_k)
    with pytest.raises(error, match="top_k"):
        species100.predict_iter(source(), top_k=top_k)  # not iterated: checked when called
    assert not seen


def test_predict_iter_on_error_is_checked_when_called(species100):
    with pytest.raises(ValueError, match="on_error"):
        species100.predict_iter([], on_error="ignore")


def test_numpy_integers_are_accepted(species100, sample_photos):
    predictions = list(species100.predict_iter(sample_photos[:2], batch_size=np.int64(1), top_k=np.int32(2)))
    assert [len(p.top_k) for p in predictions] == [2, 2]


@pytest.mark.parametrize("single", ["/some/photo.JPEG", b"\xff\xd8\xff", bytearray(b"x"), memoryview(b"x"),
                                    pathlib.Path("photo.JPEG")], ids=["str", "bytes", "bytearray", "memoryview", "path"])
def test_predict_batch_refuses_a_single_image(species100, single):
    with pytest.raises(TypeError, match="use predict"):
        species100.predict_batch(single)


# --- 9, 12. bounded resources --------------------------------------------------------------------------------


def test_buffer_pool_stays_bounded(own_classifier):
    classifier = own_classifier(batch_size=1)
    image = np.zeros((32, 32, 3), np.uint8)
    for n in range(1, 9):
        list(classifier.predict_iter([image] * n, batch_size=8))  # one batch of n rows each time
    for batch_size in (2, 3, 4, 5):
        list(classifier.predict_iter([image] * 3, batch_size=batch_size))
    assert len(classifier._free_buffers) <= 2
    assert sum(len(free) for free in classifier._free_buffers.values()) <= 4


def test_pillow_pool_is_shared_across_thread_counts():
    def live() -> int:
        return sum(t.name.startswith("speciesclf-pillow") for t in threading.enumerate())

    bound = max(live(), 8)  # earlier tests may have grown the shared pool already
    image = np.zeros((16, 16, 3), np.uint8)
    for threads in range(2, 9):
        batch = preprocess_batch([image] * threads, PreprocessSpec(size=16, resize=16), threads=threads,
                                 backend="python")
        assert batch.all_ok
    deadline = time.monotonic() + 5
    while live() > bound and time.monotonic() < deadline:  # replaced pools' threads exit once idle
        time.sleep(0.01)
    assert live() <= bound  # before: a pool (and its threads) per threads= value, 35 here


# --- 10, close. lifecycle ----------------------------------------------------------------------------------


def test_reload_keeps_the_old_version_when_on_load_raises(own_classifier, sample_photos):
    seen = []

    def on_load(classifier):
        seen.append(classifier.model)
        if len(seen) > 1:
            raise RuntimeError("hook failed")

    classifier = own_classifier(hooks={"on_load": on_load})
    with pytest.raises(RuntimeError, match="hook failed"):
        classifier.reload("imagenet1k")
    assert seen == ["species100@1.0.0", "imagenet1k@1.0.0"]  # the hook saw the version it was checking
    assert classifier.model == "species100@1.0.0" and len(classifier.labels) == 100
    assert classifier.predict(sample_photos[0]).model == "species100@1.0.0"


def test_closed_classifier_refuses_every_prediction(own_classifier, sample_photos):
    classifier = own_classifier()
    classifier.close()
    classifier.close()
    for call in (lambda: classifier.predict(sample_photos[0]), lambda: classifier.predict_batch([]),
                 lambda: classifier.predict_iter([]), lambda: classifier.reload("species100")):
        with pytest.raises(RuntimeError, match="Classifier is closed"):
            call()



_HUGE = (100_000, 100_000, 3)  # 30 GB once materialised


@pytest.mark.parametrize("make", [
    lambda: np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), _HUGE, (0, 0, 0)),
    lambda: torch.zeros(1, dtype=torch.uint8).expand(_HUGE[2], *_HUGE[:2]),
    lambda: torch.zeros(1).expand(_HUGE[2], *_HUGE[:2]),
], ids=["broadcast-array", "expanded-uint8-tensor", "expanded-float-tensor"])
def test_pixels_beyond_max_pixels_fail_alone_before_any_copy(species100, sample_photos, make):
    """A broadcast view costs nothing until it is copied: the pixel limit must come before the copy, or
    the whole batch dies of MemoryError (found in review)."""
    good, huge = species100.predict_batch([sample_photos[0], make()])
    assert good.ok
    assert isinstance(huge.error, ImageTooLargeError) and "max_pixels" in str(huge.error)
