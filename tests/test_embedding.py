"""Prediction.logits and Prediction.embedding: the built-in models' pooled features, added to the ONNX graph."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from speciesclf import Classifier, Label, PreprocessSpec, create_bundle, preprocess_batch
from speciesclf.model.builtin import MOBILENET_EMBEDDING

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def weights(shared_dir: Path) -> Path:
    return shared_dir / "models" / "mobilenetv2-12-int8.onnx"


def _pooled_features_independently(weights: Path, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features): the quantized pooled tensor exposed as a raw output, dequantized here by hand."""
    model = onnx.load(weights)
    tensor = MOBILENET_EMBEDDING["tensor"]
    model.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.UINT8, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, quantized = session.run(["output", tensor], {"input": batch})
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scale = initializers[MOBILENET_EMBEDDING["scale"]].astype(np.float32)
    zero_point = initializers[MOBILENET_EMBEDDING["zero_point"]].astype(np.int32)
    return logits, (quantized.astype(np.int32) - zero_point).astype(np.float32) * scale


def test_embedding_and_logits_of_the_builtin_models(home, weights, sample_photos):
    photos = sample_photos[:12]
    batch = preprocess_batch(photos, PreprocessSpec(size=224, resize=256)).array
    logits, features = _pooled_features_independently(weights, batch)
    for name in ("species100", "imagenet1k"):
        with Classifier.load(name, batch_size=5) as clf:
            plain = clf.predict_batch(photos)
            assert all(p.embedding is None and p.logits is None for p in plain)
            asked = clf.predict_batch(photos, return_embedding=True, return_logits=True)
        for p, q, row, feature in zip(plain, asked, logits, features):
            assert q.embedding.dtype == np.float32 and q.embedding.shape == (1280,)
            assert q.logits.dtype == np.float32 and q.logits.shape == (1000,)
            np.testing.assert_array_equal(q.embedding, feature)  # the dequantized pooled tensor, exactly
            np.testing.assert_array_equal(q.logits, row)  # the embedding output changed no logit
            assert (q.label, q.guess, q.score, q.top_k) == (p.label, p.guess, p.score, p.top_k)
        d = asked[0].to_dict()
        assert len(d["embedding"]) == 1280 and len(d["logits"]) == 1000 and "embedding" not in plain[0].to_dict()


def test_embedding_only_when_asked_per_call_kind(home, sample_photos):
    with Classifier.load("species100", batch_size=4) as clf:
        single = clf.predict(sample_photos[0], return_embedding=True)
        assert single.embedding.shape == (1280,) and single.logits is None
        streamed = list(clf.predict_iter(sample_photos[:6], return_logits=True))
        assert all(p.logits.shape == (1000,) and p.embedding is None for p in streamed)
        broken = clf.predict_batch([b"", sample_photos[1]], return_embedding=True)
        assert broken[0].error is not None and broken[0].embedding is None and broken[1].embedding is not None
        np.testing.assert_array_equal(broken[1].embedding, clf.predict(sample_photos[1], return_embedding=True).embedding)
        with pytest.raises(TypeError, match="return_embedding"):
            clf.predict(sample_photos[0], return_embedding="yes")


def test_embeddings_find_photos_of_the_same_species(home, shared_dir):
    """Nearest-neighbour sanity on birds100: most species are not ImageNet classes, yet the pooled
    features of one photo are closest to photos of its own species far more often than chance (1 in 20)."""
    root = shared_dir / "datasets" / "birds100"
    with open(root / "labels.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if int(row["class_index"]) < 20]
    chosen = [row for i, row in enumerate(rows) if i % 40 < 8]  # 8 photos of each of 20 species
    with Classifier.load("imagenet1k") as clf:
        vectors = np.stack([p.embedding for p in clf.predict_batch([root / r["file"] for r in chosen],
                                                                   return_embedding=True)])
    species = np.array([int(r["class_index"]) for r in chosen])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    accuracy = float(np.mean(species[similarity.argmax(axis=1)] == species))
    print(f"\n[embedding] birds100, 20 species x 8 photos: leave-one-out 1-NN accuracy {accuracy:.3f} (chance 0.05)")
    assert accuracy >= 0.4


def test_the_embedding_output_is_added_once(home, monkeypatch):
    import speciesclf.model.builtin as builtin

    Classifier.load("species100").close()  # assembled (with its embedding output) on first use

    def refuse(*args, **kwargs):
        raise AssertionError("the graph was edited again")

    builtin._edited_weights.cache_clear()
    monkeypatch.setattr("speciesclf.model.runtimes.onnx_graph.add_output", refuse)
    with Classifier.load("species100") as clf:
        assert clf.predict(np.zeros((64, 64, 3), np.uint8), return_embedding=True).embedding.shape == (1280,)


def test_a_bundle_names_its_embedding_output(home, weights, tmp_path, sample_photos):
    from speciesclf import BundleError
    from speciesclf.model.runtimes.onnx_graph import add_output

    edited = tmp_path / "with-features.onnx"
    edited.write_bytes(add_output(weights.read_bytes(), name="features", **MOBILENET_EMBEDDING))
    labels = [Label(i, f"class {i}") for i in range(1000)]
    common = dict(model_file=edited, labels=labels, version="1.0.0", num_outputs=1000)
    good = create_bundle(tmp_path / "good", name="good", embedding_output="features", **common)
    with Classifier.load(good) as clf:
        assert clf.predict(sample_photos[0], return_embedding=True).embedding.shape == (1280,)
    wrong = create_bundle(tmp_path / "wrong", name="wrong", embedding_output="pooled", **common)
    with pytest.raises(BundleError, match=r"manifest\.embedding_output: 'pooled' is not an output.*'features'"):
        Classifier.load(wrong)
    plain = create_bundle(tmp_path / "plain", name="plain", **common)
    with Classifier.load(plain) as clf:
        assert clf.predict(sample_photos[0]).ok
        with pytest.raises(ValueError, match="declares no embedding output"):
            clf.predict(sample_photos[0], return_embedding=True)
    with pytest.raises(BundleError, match="manifest.embedding_output"):
        create_bundle(tmp_path / "bad", name="bad", embedding_output="", **common)


def test_the_final_layer_on_the_embedding_reproduces_the_logits(home, weights, sample_photos):
    """The embedding is the classifier's input: its dequantized weights applied to it give the logits, to
    within the quantization step of the model's int8 output."""
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(weights).graph.initializer}

    def dequantized(prefix: str) -> np.ndarray:
        values = initializers[f"{prefix}_quantized"].astype(np.float32)
        return (values - initializers[f"{prefix}_zero_point"].astype(np.float32)) * initializers[f"{prefix}_scale"]

    weight, bias = dequantized("classifier.1.weight"), dequantized("classifier.1.bias")
    step = float(initializers["output_scale"])
    with Classifier.load("imagenet1k") as clf:
        predictions = clf.predict_batch(sample_photos[::10], return_embedding=True, return_logits=True)
    features = np.stack([p.embedding for p in predictions])
    logits = np.stack([p.logits for p in predictions])
    # The int8 output saturates: its range is what the quantized logits can say at all.
    zero_point = float(initializers["output_zero_point"])
    recomputed = np.clip(features @ weight + bias, (0 - zero_point) * step, (255 - zero_point) * step)
    assert np.abs(recomputed - logits).max() <= 1.5 * step
    assert (recomputed.argmax(axis=1) == logits.argmax(axis=1)).mean() >= 0.95
