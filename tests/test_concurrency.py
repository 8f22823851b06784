"""Concurrent callers, thread counts, and memory that stays flat over many calls."""

from __future__ import annotations

import gc
import io
import threading
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from speciesclf import PreprocessSpec, preprocess_batch

BACKENDS = ("native", "python")


@pytest.fixture(scope="module")
def photos(photo_bytes) -> list[bytes]:
    """24 real photos of assorted sizes (every 17th sample), plus a pixel array and a PNG."""
    chosen = photo_bytes[::17][:24]
    image = Image.open(io.BytesIO(chosen[0])).convert("RGB")
    png = io.BytesIO()
    image.resize((320, 200)).save(png, "PNG")
    return chosen + [np.asarray(image), png.getvalue()]


def run_in_threads(count: int, target) -> list:
    results: list = [None] * count
    errors: list = []
    barrier = threading.Barrier(count)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]
    return results


@pytest.mark.shared
@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_callers_get_identical_results(backend, photos):
    spec = PreprocessSpec()
    expected = preprocess_batch(photos, spec, backend=backend, threads=1).array

    def call(i: int):
        # Each caller sees the photos in its own order, so callers overlap on different images.
        order = np.roll(np.arange(len(photos)), 5 * i)
        outputs = []
        for _ in range(3):
            batch = preprocess_batch([photos[j] for j in order], spec, backend=backend, threads=2)
            assert batch.all_ok
            outputs.append(batch.array[np.argsort(order)])
        return outputs

    for outputs in run_in_threads(4, call):
        for out in outputs:
            assert np.array_equal(out, expected)


@pytest.mark.shared
@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_callers_with_mixed_specs_and_failures(backend, photos):
    """Callers with different specs and bad items at once: per-call state never leaks between calls."""
    specs = [
        PreprocessSpec(),
        PreprocessSpec(dtype="uint8", layout="NHWC"),
        PreprocessSpec(size=96, resize=None, interpolation="bicubic"),
        PreprocessSpec(dtype="float16", size=128, resize=160),
    ]
    items = photos[:10] + [b"", b"garbage"]
    expected = [preprocess_batch(items, s, backend=backend, threads=1, on_error="skip") for s in specs]

    def call(i: int):
        return [preprocess_batch(items, specs[i], backend=backend, threads=2, on_error="skip") for _ in range(3)]

    for i, batches in enumerate(run_in_threads(4, call)):
        for batch in batches:
            np.testing.assert_array_equal(batch.array, expected[i].array)
            assert sorted(batch.errors) == sorted(expected[i].errors) == [10, 11]


@pytest.mark.shared
@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_counts_give_identical_results(backend, photos):
    spec = PreprocessSpec()
    single = preprocess_batch(photos, spec, backend=backend, threads=1).array
    for threads in (2, 3, 8):
        assert np.array_equal(preprocess_batch(photos, spec, backend=backend, threads=threads).array, single), threads


def test_thread_counts_synthetic():
    """The same check without the shared photos: many small images of assorted sizes."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(16):
        h, w = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG" if i % 2 else "PNG")
        items.append(buffer.getvalue())
    for backend in BACKENDS:
        single = preprocess_batch(items, backend=backend, threads=1).array
        for threads in (2, 4):
            assert np.array_equal(preprocess_batch(items, backend=backend, threads=threads).array, single)


@pytest.mark.slow
def test_rss_flat_over_many_calls():
    """20,000 native calls on one small JPEG: after warm-up, resident memory does not grow."""
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    spec = PreprocessSpec()
    process = psutil.Process()

    def calls(n: int) -> None:
        for _ in range(n):
            batch = preprocess_batch([data], spec, backend="native", threads=1)
            assert batch.ok[0]

    calls(2_000)
    gc.collect()
    warm = process.memory_info().rss
    calls(18_000)
    gc.collect()
    end = process.memory_info().rss
    growth = (end - warm) / 2**20
    print(f"\n[rss] after 2,000 warm-up calls {warm / 2**20:.1f} MiB, after 20,000 {end / 2**20:.1f} MiB, growth {growth:+.2f} MiB")
    assert growth < 20, f"RSS grew by {growth:.1f} MiB over 18,000 calls"


def _mean_colour_model(path) -> str:
    """(N, 3, H, W) -> (N, 3): channel means, a model fast enough that close() lands amid many calls."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["output"], axes=[2, 3], keepdims=0)], "means",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def test_close_while_threads_predict_says_closed(tmp_path):
    """Issue 12 item 9: close() amid predicts leaked 'cannot schedule new futures after shutdown'."""
    from speciesclf import Classifier

    model = _mean_colour_model(tmp_path / "means.onnx")
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0] = 200
    unexpected: list[BaseException] = []
    answered = closed = 0
    before = set(threading.enumerate())  # other modules' classifiers may still run theirs
    lock = threading.Lock()
    for round_ in range(12):
        clf = Classifier.load(model, labels=["r", "g", "b"], preprocess=PreprocessSpec(size=16, resize=None),
                              batch_size=2, threads=1)
        started = threading.Barrier(7)

        def caller(kind: int) -> None:
            nonlocal answered, closed
            started.wait()
            while True:
                try:
                    if kind == 0:
                        results = [clf.predict(image)]
                    elif kind == 1:
                        results = clf.predict_batch([image] * 5)
                    else:
                        results = list(clf.predict_iter(iter([image] * 5), batch_size=2))
                except RuntimeError as e:
                    with lock:
                        if str(e) == "Classifier is closed":
                            closed += 1
                        else:
                            unexpected.append(e)
                    return
                except BaseException as e:  # noqa: BLE001 - collected and reported below
                    with lock:
                        unexpected.append(e)
                    return
                assert all(p.ok and p.label == "r" for p in results)
                with lock:
                    answered += 1

        threads = [threading.Thread(target=caller, args=(i % 3,)) for i in range(6)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.002 * (round_ % 4))
        clf.close()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a caller hung after close()"
    assert not unexpected, [f"{type(e).__name__}: {e}" for e in unexpected[:5]]
    assert closed == 12 * 6 and answered > 0
    assert not [t.name for t in set(threading.enumerate()) - before if t.name.startswith("speciesclf-")]
