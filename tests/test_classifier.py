"""Classifier: loading, every input kind, errors per item, post-processing, hot swap, hooks, display."""

from __future__ import annotations

import base64
import csv
import http.server
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from speciesclf import Classifier, Prediction
from speciesclf.errors import ImageReadError, InvalidImageError, UnsupportedFormatError, UrlNotAllowedError
from speciesclf.sources.fetch import UrlPolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from speciesclf.model.postprocess import PostProcessor, top_k_indices

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def model_file(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "mobilenetv2-12-int8.onnx"
    if not path.is_file():
        pytest.fail(f"missing {path}")
    return path


@pytest.fixture(scope="module")
def imagenet(model_file: Path) -> Classifier:
    return Classifier.load(model_file, labels="imagenet1k", batch_size=16)


@pytest.fixture(scope="module")
def labels_csv(shared_dir: Path) -> dict[str, int]:
    with open(shared_dir / "images" / "imagenet-samples" / "labels.csv", newline="") as f:
        return {row["file"]: int(row["class_index"]) for row in csv.DictReader(f)}


def test_predict_fields(imagenet: Classifier, sample_photos):
    tench = next(p for p in sample_photos if "tench" in p.name)
    p = imagenet.predict(tench)
    assert isinstance(p, Prediction) and p.ok
    assert p.label == "tench" and p.index == 0
    assert 0 < p.score <= 1 and len(p.top_k) == 5 and p.top_k[0] == (p.label, p.score)
    assert [s for _, s in p.top_k] == sorted((s for _, s in p.top_k), reverse=True)
    assert p.model == "mobilenetv2-12-int8@0.0.0" and not p.unknown
    assert set(p.timings) == {"decode_ms", "preprocess_ms", "inference_ms"} and p.timings["inference_ms"] > 0
    json.dumps(p.to_dict())


def test_every_input_kind_gives_the_same_answer(imagenet: Classifier, sample_photos):
    path = sample_photos[10]
    data = path.read_bytes()
    pixels = np.array(Image.open(path).convert("RGB"))
    inputs = [
        path, str(path), data, io.BytesIO(data), base64.b64encode(data).decode(),
        "data:image/jpeg;base64," + base64.b64encode(data).decode(), Image.open(path),
        pixels, torch.from_numpy(pixels).permute(2, 0, 1), torch.from_numpy(pixels).permute(2, 0, 1) / 255.0,
    ]
    predictions = imagenet.predict_batch(inputs)
    assert all(p.ok for p in predictions), [p.error for p in predictions]
    expected = predictions[0]
    for p in predictions:
        assert p.index == expected.index
        assert abs(p.score - expected.score) < 1e-3


def test_bad_items_do_not_spoil_the_batch(imagenet: Classifier, sample_photos):
    good = sample_photos[3]
    alone = imagenet.predict(good)
    items = [b"", good, "no/such/file.jpg", b"not an image at all", 42, good, "https://example.invalid/x.jpg"]
    predictions = imagenet.predict_batch(items)
    kinds = [type(p.error).__name__ if p.error else None for p in predictions]
    assert kinds == ["EmptyInputError", None, "ImageReadError", "UnsupportedFormatError", "InvalidImageError",
                     None, "UrlNotAllowedError"]
    for i in (1, 5):
        assert predictions[i].index == alone.index and abs(predictions[i].score - alone.score) < 1e-6
    assert predictions[0].to_dict()["error"] == {"code": "empty_input", "message": str(predictions[0].error)}
    with pytest.raises(UnsupportedFormatError):
        imagenet.predict_batch([good, b"not an image at all"], on_error="raise")
    with pytest.raises(ImageReadError):
        imagenet.predict("no/such/file.jpg", on_error="raise")


def test_urls_only_when_allowed(model_file: Path, sample_photos):
    data = sample_photos[0].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/photo.jpg"
        with Classifier.load(model_file, labels="imagenet1k") as closed:
            assert isinstance(closed.predict(url).error, UrlNotAllowedError)
        # The server is on loopback, which URL inputs refuse unless the policy allows it.
        loopback = UrlPolicy(allow_networks=("127.0.0.1/32",))
        with Classifier.load(model_file, labels="imagenet1k", allow_urls=loopback) as open_:
            fetched = open_.predict(url)
            assert fetched.ok and fetched.index == open_.predict(data).index
    finally:
        server.shutdown()
        server.server_close()


def test_predict_iter_streams_in_order(imagenet: Classifier, sample_photos):
    photos = sample_photos[:37]
    one_by_one = [imagenet.predict(p).index for p in photos]
    seen = []
    for p in imagenet.predict_iter(iter(photos), batch_size=8):
        seen.append(p.index)
    assert seen == one_by_one


def test_imagenet_accuracy_matches_pillow_reference(imagenet: Classifier, sample_photos, labels_csv, model_file):
    import onnxruntime as ort

    truth = np.array([labels_csv[p.name] for p in sample_photos])
    ours = np.array([p.index for p in imagenet.predict_batch(sample_photos)])
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    reference = []
    for path in sample_photos:  # the README's recipe with Pillow, one image at a time
        im = Image.open(path).convert("RGB")
        w, h = im.size
        nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = int(round((nw - 224) / 2.0)), int(round((nh - 224) / 2.0))
        x = (np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255 - mean) / std
        reference.append(int(session.run(None, {"input": x.transpose(2, 0, 1)[None]})[0].argmax()))
    ours_top1, ref_top1 = float((ours == truth).mean()), float((np.array(reference) == truth).mean())
    print(f"\n[accuracy] imagenet1k top-1: speciesclf {ours_top1:.4f}, Pillow reference {ref_top1:.4f}")
    assert abs(ours_top1 - ref_top1) <= 0.01
    assert ref_top1 > 0.78


def test_postprocessor_rules():
    logits = np.array([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 5.0]])
    plain = PostProcessor()(logits)
    np.testing.assert_allclose(plain.probabilities.sum(axis=1), 1.0)
    assert plain.probabilities[0].argmax() == 0 and not plain.unknown.any()
    hot = PostProcessor(temperature=0.5)(logits)
    assert hot.probabilities[0, 0] > plain.probabilities[0, 0]
    subset = PostProcessor(label_subset=[0, 1], unknown_method="subset_mass", unknown_threshold=0.5)(logits)
    np.testing.assert_allclose(subset.probabilities.sum(axis=1), 1.0)
    assert subset.unknown.tolist() == [False, True]
    maxp = PostProcessor(unknown_method="max_probability", unknown_threshold=0.6)(logits)
    assert maxp.unknown.tolist() == [False, True]
    probs = PostProcessor(output_kind="probabilities")(np.array([[0.2, 0.8]]))
    np.testing.assert_allclose(probs.probabilities, [[0.2, 0.8]])
    with pytest.raises(ValueError):
        PostProcessor(unknown_method="subset_mass", unknown_threshold=0.5)
    with pytest.raises(ValueError):
        PostProcessor(temperature=0)


# Few distinct values, so that rows are full of ties, at the k-th score too.
@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1e-9, 0.9999]), min_size=1, max_size=300),
       st.integers(1, 320))
def test_top_k_indices_equal_a_stable_full_sort(values, k):
    scores = np.array(values)
    expected = np.argsort(-scores, kind="stable")[:k]
    np.testing.assert_array_equal(top_k_indices(scores, k), expected)


def test_top_k_indices_on_real_probabilities():
    rng = np.random.default_rng(3)
    rows = PostProcessor()(rng.normal(size=(50, 1000)) * 4).probabilities
    rows[7, 10:20] = rows[7].max()  # a tie for first place across ten classes
    for row in rows:
        for k in (1, 5, 250, 1000):
            np.testing.assert_array_equal(top_k_indices(row, k), np.argsort(-row, kind="stable")[:k])


def test_hooks_are_called(model_file: Path, sample_photos):
    calls = []
    hooks = {
        "on_load": lambda clf: calls.append(("load", clf.model)),
        "before_predict": lambda clf, items: calls.append(("before", len(items))),
        "after_predict": lambda clf, preds: calls.append(("after", len(preds))),
    }
    with Classifier.load(model_file, labels="imagenet1k", hooks=hooks) as clf:
        clf.predict_batch(sample_photos[:3])
        assert calls == [("load", "mobilenetv2-12-int8@0.0.0"), ("before", 3), ("after", 3)]
        del calls[:]
        # a stream shows the hooks each batch it forms (the CLI classifies through predict_iter)
        assert len(list(clf.predict_iter(iter(sample_photos[:5]), batch_size=2))) == 5
    assert calls == [("before", 2), ("after", 2), ("before", 2), ("after", 2), ("before", 1), ("after", 1)]


def test_html_repr(model_file: Path, sample_photos):
    with Classifier.load(model_file, labels="imagenet1k", thumbnails=True) as clf:
        page = clf.predict(sample_photos[0])._repr_html_()
        assert "<img src='data:image/jpeg;base64," in page and "<table>" in page
        assert "EmptyInputError" in clf.predict(b"")._repr_html_()


def _thumbnail_pixels(prediction: Prediction) -> np.ndarray:
    page = prediction._repr_html_()
    assert "<img src='data:image/jpeg;base64," in page, page[:200]
    encoded = page.split("base64,", 1)[1].split("'", 1)[0]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"), dtype=np.float32)


def test_predictions_keep_no_input_alive(model_file: Path, photo_bytes):
    """Issue 12 item 4: predict_batch over in-memory JPEGs kept every one of them (Prediction._source)."""
    import pickle

    photos = photo_bytes[:48]
    kept = sum(map(len, photos))
    with Classifier.load(model_file, labels="imagenet1k", batch_size=16) as clf:
        plain = clf.predict_batch(photos)
        clf.thumbnails = True
        shown = clf.predict_batch(photos)
    # Everything a prediction references is in its pickle: neither holds the input bytes.
    plain_size, shown_size = len(pickle.dumps(list(plain))), len(pickle.dumps(list(shown)))
    print(f"\n[display] inputs {kept / 1e6:.1f} MB; predictions {plain_size / 1e3:.0f} kB, "
          f"with thumbnails {shown_size / 1e3:.0f} kB")
    assert plain_size < 2_000 * len(photos) and shown_size < 12_000 * len(photos) < kept / 4
    assert all("<img" not in p._repr_html_() for p in plain)


def test_an_error_prediction_keeps_no_input_of_its_batch_alive(imagenet: Classifier):
    """An item's error was kept with its traceback, whose frames hold the whole batch of inputs."""
    import gc
    import weakref

    for bad in ("no/such/photo.jpg", None):  # raised while reading the item / while preprocessing it
        images = [np.full((300, 300, 3), 90, np.uint8) for _ in range(5)]
        alive = [weakref.ref(image) for image in images]
        predictions = imagenet.predict_batch(images + [bad])
        del images
        gc.collect()
        assert predictions[-1].error is not None and all(p.ok for p in predictions[:-1])
        assert sum(ref() is not None for ref in alive) == 0, f"inputs kept by the error of {bad!r}"
        with pytest.raises(type(predictions[-1].error)):  # still raised as itself
            imagenet.predict_batch([bad], on_error="raise")


def test_every_input_kind_gets_a_thumbnail(model_file: Path, sample_photos):
    path = sample_photos[3]
    data = path.read_bytes()
    pil = Image.open(path).convert("RGB")
    array = np.asarray(pil)
    kinds = {"path": path, "str": str(path), "bytes": data, "file object": io.BytesIO(data), "PIL": pil,
             "numpy": array, "torch": torch.from_numpy(array.copy()).permute(2, 0, 1)}
    with Classifier.load(model_file, labels="imagenet1k", thumbnails=True) as clf:
        predictions = clf.predict_batch(list(kinds.values()))
    assert all(p.ok for p in predictions)
    # What the model saw (shorter side 256, centre crop 224), scaled to the thumbnail's size.
    scale = 256 / min(pil.size)
    resized = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BILINEAR)
    left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)).resize((112, 112)), dtype=np.float32)
    for kind, prediction in zip(kinds, predictions):
        pixels = _thumbnail_pixels(prediction)
        assert pixels.shape == (112, 112, 3), kind
        assert np.abs(pixels - crop).mean() < 12, kind


def test_thumbnails_are_made_in_notebooks_only(model_file: Path, sample_photos, monkeypatch):
    import sys
    import types

    photo = sample_photos[0].read_bytes()
    with Classifier.load(model_file, labels="imagenet1k") as clf:
        assert clf.thumbnails is None
        assert "<img" not in clf.predict(photo)._repr_html_()  # a script: no thumbnail made
        terminal = types.SimpleNamespace(get_ipython=lambda: types.SimpleNamespace())  # IPython in a terminal
        monkeypatch.setitem(sys.modules, "IPython", terminal)
        assert "<img" not in clf.predict(photo)._repr_html_()
        kernel = types.SimpleNamespace(get_ipython=lambda: types.SimpleNamespace(kernel=object()))
        monkeypatch.setitem(sys.modules, "IPython", kernel)
        assert "<img" in clf.predict(photo)._repr_html_()
        clf.thumbnails = False
        assert "<img" not in clf.predict(photo)._repr_html_()
    with pytest.raises(ValueError, match="thumbnails"):
        Classifier.load(model_file, labels="imagenet1k", thumbnails="yes")


def test_a_list_of_predictions_renders_as_a_grid(model_file: Path, sample_photos):
    from speciesclf.model.classifier import Predictions

    with Classifier.load(model_file, labels="imagenet1k", thumbnails=True) as clf:
        predictions = clf.predict_batch(sample_photos[:5] + [b""])
    assert isinstance(predictions, Predictions) and isinstance(predictions, list) and len(predictions) == 6
    assert predictions == list(predictions) and predictions[1:2] == [predictions[1]]
    grid = predictions._repr_html_()
    assert "flex-wrap" in grid and grid.count("<img src='data:image/jpeg;base64,") == 5
    assert all(p.guess in grid for p in predictions[:5]) and "EmptyInputError" in grid


def test_raw_model_needs_labels(model_file: Path):
    with pytest.raises(ValueError, match="labels="):
        Classifier.load(model_file)
    with pytest.raises(FileNotFoundError):
        Classifier.load(model_file.parent / "missing.onnx", labels="imagenet1k")


def test_bundles_registry_and_zip(model_file: Path, sample_photos, tmp_path):
    from speciesclf import Label, Registry, UnknownRule, create_bundle
    from speciesclf.model.builtin import imagenet_labels

    names = {label.index: label.name for label in imagenet_labels()}
    fish = [Label(i, names[i]) for i in (0, 1, 2, 3, 4)]  # tench, goldfish, great white, tiger shark, hammerhead
    common = dict(model_file=model_file, labels=fish, name="fish", framework="onnx", num_outputs=1000,
                  label_subset=(0, 1, 2, 3, 4), unknown=UnknownRule("subset_mass", 0.5))
    v1 = create_bundle(tmp_path / "fish-1.0.0", version="1.0.0", **common)
    v2 = create_bundle(tmp_path / "fish-1.1.0.zip", version="1.1.0", notes="same weights, zipped", **common)
    registry = Registry(tmp_path / "registry")
    assert registry.register(v1, aliases=["production"]) == "fish@1.0.0"
    assert registry.register(v2) == "fish@1.1.0"

    tench = next(p for p in sample_photos if "tench" in p.name)
    cab = next(p for p in sample_photos if p.name.endswith("_cab.JPEG"))
    for ref, expected in [("fish", "fish@1.0.0"), ("fish@production", "fish@1.0.0"), ("fish@1.1.0", "fish@1.1.0")]:
        clf = Classifier.load(ref, registry=registry)
        assert clf.model == expected and clf.labels == [label.name for label in fish]
        known, other = clf.predict_batch([tench, cab])
        assert known.label == "tench" and not known.unknown
        assert other.unknown  # none of the five fish: the subset holds little of the probability
    zipped = Classifier.load(v2)
    assert zipped.model == "fish@1.1.0" and zipped.predict(tench).label == "tench"
    registry.set_alias("fish", "production", "1.1.0")
    clf = Classifier.load("fish", registry=registry)
    assert clf.model == "fish@1.1.0"
    assert clf.reload(v1) == "fish@1.0.0" and clf.predict(tench).model == "fish@1.0.0"


def test_predict_iter_progress_bar(imagenet: Classifier, sample_photos, capsys):
    photos = sample_photos[:6]
    assert len(list(imagenet.predict_iter(photos, batch_size=4, progress=True))) == 6
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "6/6" in bar and "img/s" in bar and "100%" in bar and imagenet.model in bar  # a total: an ETA
    assert len(list(imagenet.predict_iter(iter(photos), batch_size=4, progress=True))) == 6
    counted = capsys.readouterr().err.replace("\r", "\n")
    assert "6img" in counted and "img/s" in counted and "/6" not in counted  # no total: count and rate
    assert len(list(imagenet.predict_iter(photos))) == 6 and capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress"):
        imagenet.predict_iter(photos, progress="yes")
