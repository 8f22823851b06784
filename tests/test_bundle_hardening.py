"""Hardening of bundles, the registry, specs and inputs against malformed or hostile data.

Each test is the regression test of one reviewed bug: labels that do not line up with the model's outputs,
a model swapped after its sha256 was checked, unbounded sizes, `$`-anchored patterns, unparseable JSON,
labels that do not survive a round trip, zip entries that clash, special files as image paths, and the
built-in models' reference parser.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from speciesclf import Classifier
from speciesclf.bundles.bundle import (
    MAX_NUM_OUTPUTS,
    Bundle,
    BundleError,
    Label,
    Manifest,
    create_bundle,
    is_semver,
    is_valid_name,
    read_labels,
)
from speciesclf.errors import ImageReadError, ImageTooLargeError
from speciesclf.preprocessing.inputs import read_file
from speciesclf.bundles.registry import Registry, RegistryError
from speciesclf.model.runtimes import ModelLoadError, load_runtime
from speciesclf.preprocessing.spec import MAX_SIZE, PreprocessSpec

# A small input keeps every model run cheap; the models below average over the pixels anyway.
SPEC = PreprocessSpec(size=32, resize=None)


@pytest.fixture(autouse=True)
def _private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECIESCLF_HOME", str(tmp_path / "home"))


def _onnx_model(width: int, *, static: bool = True, bias: float = 0.0,
                input_shape: tuple = ("N", 3, "H", "W")) -> bytes:
    """(N, 3, H, W) -> (N, width): the channel means times a fixed matrix (plus ``bias``).

    ``static=False`` declares the output width symbolic, so that only a run tells it.
    """
    weight = np.arange(3 * width, dtype=np.float32).reshape(3, width) / (3 * width) + np.float32(bias)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["means"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["means", "weight"], ["output"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", width if static else "classes"])],
        [helper.make_tensor("weight", TensorProto.FLOAT, [3, width], weight.ravel().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _bundle(tmp_path: Path, model: bytes, labels: list[Label], name: str = "b", **kwargs) -> Path:
    src = tmp_path / f"{name}.onnx"
    src.write_bytes(model)
    return create_bundle(tmp_path / name, model_file=src, labels=labels, name="tiny", version="1.0.0",
                         preprocess=SPEC, **kwargs)


def _image() -> np.ndarray:
    return np.full((40, 40, 3), 128, dtype=np.uint8)


# --- 1. labels, num_outputs and label_subset against the model's real output width ------------------------


def test_num_outputs_smaller_than_the_model_is_refused_at_load(tmp_path: Path):
    path = _bundle(tmp_path, _onnx_model(5), [Label(i, f"c{i}") for i in range(3)], num_outputs=3)
    with pytest.raises(BundleError, match=r"manifest\.num_outputs: tiny@1\.0\.0 says 3, but its model has 5"):
        Classifier.load(path)


def test_label_subset_beyond_the_model_is_refused_at_load(tmp_path: Path):
    labels = [Label(0, "a"), Label(7, "h")]
    path = _bundle(tmp_path, _onnx_model(5), labels, label_subset=[0, 7])
    with pytest.raises(BundleError, match=r"manifest\.label_subset: index 7 is out of range.* 5 outputs"):
        Classifier.load(path)


def test_labels_with_a_gap_and_no_subset_are_refused(tmp_path: Path):
    # Before: names came from the sorted indices (0, 2) and were paired with output columns 0 and 1.
    path = _bundle(tmp_path, _onnx_model(3), [Label(0, "tench"), Label(2, "great white shark")])
    with pytest.raises(BundleError, match=r"labels: without manifest\.label_subset .*missing: 1"):
        Classifier.load(path)


def test_fewer_labels_than_outputs_and_no_subset_are_refused(tmp_path: Path):
    path = _bundle(tmp_path, _onnx_model(5), [Label(i, f"c{i}") for i in range(3)])
    with pytest.raises(BundleError, match=r"labels: without manifest\.label_subset every model output needs a label"):
        Classifier.load(path)


def test_a_width_known_only_after_a_run_is_checked_on_the_first_batch(tmp_path: Path):
    import io
    import warnings

    import torch

    # A torch runtime cannot tell its output width before a run.
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5)).eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(net, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
        torch.export.save(program, buffer)
    src = tmp_path / "net.pt2"
    src.write_bytes(buffer.getvalue())
    path = create_bundle(tmp_path / "b", model_file=src, labels=[Label(i, f"c{i}") for i in range(3)], name="tiny",
                         version="1.0.0", preprocess=SPEC, num_outputs=3)
    clf = Classifier.load(path, device="cpu")
    with clf, pytest.raises(BundleError, match=r"manifest\.num_outputs: .* says 3, but its model has 5"):
        clf.predict(_image())


def test_a_matching_bundle_reports_the_model_s_own_columns(tmp_path: Path):
    model = _onnx_model(4)
    labels = [Label(i, f"c{i}") for i in range(4)]
    with Classifier.load(_bundle(tmp_path, model, labels, num_outputs=4)) as clf:
        p = clf.predict(_image(), top_k=4)
    assert p.ok and clf.labels == ["c0", "c1", "c2", "c3"]
    # The weights grow with the column, so the last output is the largest logit.
    assert p.label == "c3" and p.index == 3
    with Classifier.load(_bundle(tmp_path, model, [Label(1, "c1"), Label(3, "c3")], name="s",
                                 label_subset=[3, 1])) as clf:
        p = clf.predict(_image())
    assert p.label == "c3" and p.index == 3 and {name for name, _ in p.top_k} == {"c1", "c3"}


def test_a_raw_model_file_needs_one_label_per_output(tmp_path: Path):
    model = tmp_path / "m.onnx"
    model.write_bytes(_onnx_model(5))
    with pytest.raises(BundleError, match="every model output needs a label"):
        Classifier.load(model, labels=["a", "b", "c"], preprocess=SPEC)
    with Classifier.load(model, labels=list("abcde"), preprocess=SPEC) as clf:
        assert clf.predict(_image()).label == "e"


# --- 2. the sha256 is checked on the bytes the runtime loads ------------------------------------------------


def test_a_model_replaced_after_open_is_not_loaded(tmp_path: Path):
    path = _bundle(tmp_path, _onnx_model(3), [Label(i, f"c{i}") for i in range(3)], num_outputs=3)
    bundle = Bundle.open(path)  # verified here...
    swapped = tmp_path / "swapped.onnx"
    swapped.write_bytes(_onnx_model(3, bias=1.0))
    os.replace(swapped, bundle.model_path)  # ...then replaced before the runtime reads it
    with pytest.raises(BundleError, match="model_sha256 mismatch"):
        Classifier.load(bundle)


def test_read_model_returns_the_checked_bytes(tmp_path: Path):
    model = _onnx_model(3)
    bundle = Bundle.open(_bundle(tmp_path, model, [Label(i, f"c{i}") for i in range(3)]))
    assert bundle.read_model() == model


def test_runtimes_load_the_given_bytes_not_the_path(tmp_path: Path):
    runtime = load_runtime(tmp_path / "nowhere.onnx", "onnx", device="cpu", data=_onnx_model(4))
    assert runtime.output_width == 4
    assert runtime.run(np.zeros((2, 3, 8, 8), np.float32)).shape == (2, 4)


def test_torch_runtimes_load_the_given_bytes(tmp_path: Path):
    import io
    import warnings

    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2)).eval()
    example = torch.zeros(1, 3, 4, 4)
    exported, scripted = io.BytesIO(), io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():  # TorchScript is deprecated; users still bring it
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.export.save(torch.export.export(net, (example,)), exported)
        torch.jit.save(torch.jit.trace(net, example), scripted)
    runtime = load_runtime(tmp_path / "nowhere.pt2", "torch-export", device="cpu", data=exported.getvalue())
    assert runtime.run(np.zeros((1, 3, 4, 4), np.float32)).shape == (1, 2)
    with pytest.warns(DeprecationWarning, match="torch.jit.load"):
        runtime = load_runtime(tmp_path / "nowhere.pt", "torchscript", device="cpu", data=scripted.getvalue())
    assert runtime.run(np.zeros((1, 3, 4, 4), np.float32)).shape == (1, 2)
    with pytest.raises(ModelLoadError, match="torch cannot load the torch-export model"):
        load_runtime(tmp_path / "bad.pt2", "torch-export", device="cpu", data=b"not a model")


def test_a_model_the_runtime_cannot_parse_is_one_typed_error(tmp_path: Path):
    path = _bundle(tmp_path, b"not an onnx model", [Label(0, "a")])
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load the model"):
        Classifier.load(path)


# --- 3. num_outputs is bounded, coverage is checked in O(labels) ---------------------------------------------


def _manifest(**changes) -> dict:
    data = {"name": "tiny", "version": "1.0.0", "framework": "onnx", "model_file": "model.onnx",
            "model_sha256": "0" * 64, "labels_file": "labels.tsv", "preprocess": {}}
    data.update(changes)
    return data


@pytest.mark.parametrize("count", [10**12, MAX_NUM_OUTPUTS + 1, 0, -1])
def test_num_outputs_is_bounded(count: int):
    with pytest.raises(BundleError, match=r"manifest\.num_outputs: expected an integer in 1\.\."):
        Manifest.from_dict(_manifest(num_outputs=count))


def test_coverage_check_does_not_build_a_range_of_num_outputs(tmp_path: Path):
    with pytest.raises(BundleError, match=r"must cover 0\.\.16777215 .*missing: 1, 2, 3"):
        _bundle(tmp_path, b"x", [Label(0, "a")], num_outputs=MAX_NUM_OUTPUTS)
    with pytest.raises(BundleError, match=r"labels: index must be an int in 0\.\."):
        Label(MAX_NUM_OUTPUTS, "a")
    with pytest.raises(BundleError, match=r"manifest\.label_subset: expected output indices"):
        Manifest.from_dict(_manifest(label_subset=[10**12]))


# --- 4. patterns match whole strings: no trailing newline ---------------------------------------------------


def test_patterns_refuse_a_trailing_newline(tmp_path: Path):
    assert not is_valid_name("fox\n") and not is_semver("1.0.0\n")
    for field, value in (("name", "fox\n"), ("version", "1.0.0\n"), ("model_sha256", "0" * 64 + "\n")):
        with pytest.raises(BundleError, match=f"manifest.{field}"):
            Manifest.from_dict(_manifest(**{field: value}))
    registry = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="invalid alias"):
        registry.set_alias("fox", "production\n", "1.0.0")


# --- 5. JSON that json.loads cannot take ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"temperature": 1' + "0" * 5000 + "}", "[" * 100_000 + "]" * 100_000])
def test_unparseable_manifest_json_is_a_bundle_error(tmp_path: Path, text: str):
    path = _bundle(tmp_path, b"x", [Label(0, "a")])
    (path / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match="manifest.json: unusable JSON"):
        Bundle.open(path)


def test_a_label_index_of_thousands_of_digits_is_a_bundle_error(tmp_path: Path):
    labels = tmp_path / "labels.tsv"
    labels.write_text("index\tname\n" + "9" * 5000 + "\tx\n")
    with pytest.raises(BundleError, match="labels.tsv line 2: index must be an integer"):
        read_labels(labels)


def test_deeply_nested_aliases_json_is_a_registry_error(tmp_path: Path):
    registry = Registry(tmp_path / "reg")
    (registry.root / "fox").mkdir(parents=True)
    (registry.root / "fox" / "aliases.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RegistryError, match="corrupt aliases file"):
        registry.aliases("fox")


# --- 7, 8. PreprocessSpec: finite real numbers, bounded sizes -----------------------------------------------


@pytest.mark.parametrize("field", ["mean", "std"])
@pytest.mark.parametrize("values", [[float("nan")] * 3, [float("inf")] * 3, ["0.2", "0.2", "0.2"], "abc", [True] * 3])
def test_mean_and_std_must_be_finite_numbers(field: str, values):
    with pytest.raises(ValueError, match=f"PreprocessSpec.{field} must be 3 finite numbers"):
        PreprocessSpec(**{field: values})
    with pytest.raises(BundleError, match=f"manifest.preprocess: PreprocessSpec.{field}"):
        Manifest.from_dict(_manifest(preprocess={field: values}))


def test_mean_and_std_accept_numpy_numbers():
    spec = PreprocessSpec(mean=np.array([0.5, 0.5, 0.5], np.float32), std=(np.float64(0.25), 1, 0.5))
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 1.0, 0.5)


@pytest.mark.parametrize("kwargs", [dict(size=10**6, resize=None), dict(size=224, resize=MAX_SIZE + 1),
                                    dict(size=MAX_SIZE + 1, resize=None)])
def test_size_and_resize_are_bounded(kwargs):
    with pytest.raises(ValueError, match=f"must be <= {MAX_SIZE}"):
        PreprocessSpec(**kwargs)
    assert PreprocessSpec(size=MAX_SIZE, resize=MAX_SIZE).size == MAX_SIZE


def test_jpeg_reduce_margin_must_be_a_number():
    for margin in ("2", float("nan"), float("inf"), 0.5):
        with pytest.raises(ValueError, match="jpeg_reduce_margin"):
            PreprocessSpec(jpeg_reduce_margin=margin)


# --- 9. labels that create_bundle writes, Bundle.open reads ---------------------------------------------------


@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"])
def test_label_names_with_unicode_line_separators_round_trip(tmp_path: Path, char: str):
    labels = [Label(0, f"red{char}fox", f"Vulpes{char}vulpes"), Label(1, "badger")]
    path = _bundle(tmp_path, b"x", labels, num_outputs=2)
    assert Bundle.open(path).labels == labels


def test_labels_with_crlf_line_ends_still_read(tmp_path: Path):
    labels = tmp_path / "labels.tsv"
    labels.write_bytes(b"index\tname\tscientific_name\r\n0\tred fox\tVulpes vulpes\r\n1\tbadger\t\r\n")
    assert read_labels(labels) == [Label(0, "red fox", "Vulpes vulpes"), Label(1, "badger")]


def test_plain_label_files_split_at_newlines_only(tmp_path: Path):
    names = tmp_path / "names.txt"
    names.write_text("red\u2028fox\nbadger\ncat\n", encoding="utf-8")
    model = tmp_path / "m.onnx"
    model.write_bytes(_onnx_model(3))
    with Classifier.load(model, labels=names, preprocess=SPEC) as clf:
        assert clf.labels == ["red\u2028fox", "badger", "cat"]


# --- 10. a zip entry under a path that an earlier entry made a file ------------------------------------------


def test_zip_file_then_folder_of_the_same_name_is_a_bundle_error(tmp_path: Path):
    good = _bundle(tmp_path, b"x", [Label(0, "a")])
    archive = tmp_path / "clash.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in good.iterdir():
            zf.write(f, f.name)
        zf.writestr("a", b"x")
        zf.writestr("a/b", b"y")
    with pytest.raises(BundleError, match="zip: cannot extract 'a/b'"):
        Bundle.open(archive)
    with pytest.raises(RegistryError, match="zip: cannot extract 'a/b'"):
        Registry(tmp_path / "reg").register(archive)


# --- 11. image paths: regular files of at most max_bytes ------------------------------------------------------


def test_read_file_refuses_devices_and_fifos(tmp_path: Path):
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_file("/dev/zero", 1000)
    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageReadError, match="not a regular file"):  # before: blocked until a writer came
        read_file(fifo, 1000)
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_file(tmp_path, 1000)


def test_read_file_counts_the_bytes_it_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "grows.jpg"
    path.write_bytes(b"x" * 2000)
    real_fstat = os.fstat

    def stale_fstat(fd):  # a file that grew after its size was taken
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, *st[1:6], 10, *st[7:]))

    monkeypatch.setattr(os, "fstat", stale_fstat)
    with pytest.raises(ImageTooLargeError, match="more than max_bytes=1000"):
        read_file(path, 1000)
    monkeypatch.undo()
    assert stat.S_ISREG(os.stat(path).st_mode) and read_file(path, 2000) == b"x" * 2000


# --- 12. built-in references are parsed like registry references ---------------------------------------------


@pytest.mark.parametrize("ref", ["species100@", "species100@latest", "imagenet1k@2.0.0", "species100@1.0.0\n",
                                 "species100@@1.0.0"])
def test_builtin_references_are_parsed_strictly(ref: str):
    from speciesclf.model.builtin import builtin_bundle

    with pytest.raises(RegistryError):
        builtin_bundle(ref)


# --- registry: aliases.json checked before a version appears; versions read from it are checked ---------------


def test_register_with_aliases_fails_before_publishing_on_a_corrupt_aliases_file(tmp_path: Path):
    registry = Registry(tmp_path / "reg")
    (registry.root / "tiny").mkdir(parents=True)
    (registry.root / "tiny" / "aliases.json").write_text("{not json")
    path = _bundle(tmp_path, b"x", [Label(0, "a")])
    with pytest.raises(RegistryError, match="corrupt aliases file"):
        registry.register(path, aliases=["production"])
    assert registry.versions("tiny") == []


def test_resolve_refuses_an_alias_that_is_not_a_version(tmp_path: Path):
    registry = Registry(tmp_path / "reg")
    registry.register(_bundle(tmp_path, b"x", [Label(0, "a")]))
    outside = tmp_path / "outside"
    outside.mkdir()
    (registry.root / "tiny" / "aliases.json").write_text(json.dumps({"production": "../../../outside"}))
    with pytest.raises(RegistryError, match="is not a version"):
        registry.resolve("tiny")


# --- a model whose scores are NaN for some images -------------------------------------------------------


def _sqrt_model(width: int) -> bytes:
    """Like _onnx_model, but through Sqrt of the channel means: NaN scores for a dark image (its normalised
    means are negative), finite ones for a bright image."""
    weight = np.arange(3 * width, dtype=np.float32).reshape(3, width) / (3 * width)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["means"], axes=[2, 3], keepdims=0),
            helper.make_node("Sqrt", ["means"], ["roots"]),
            helper.make_node("MatMul", ["roots", "weight"], ["output"]),
        ],
        "nan_for_dark_images",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor("weight", TensorProto.FLOAT, [3, width], weight.ravel().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_nan_scores_fail_their_image_alone(tmp_path: Path):
    # Before: NaN scores sorted into some label, reported as an ordinary prediction with a NaN score.
    from speciesclf import ModelOutputError

    path = _bundle(tmp_path, _sqrt_model(3), [Label(i, f"c{i}") for i in range(3)])
    bright, dark = np.full((40, 40, 3), 250, np.uint8), np.zeros((40, 40, 3), np.uint8)
    with Classifier.load(path) as clf:
        first, broken, last = clf.predict_batch([bright, dark, bright])
        assert first.ok and last.ok and np.isfinite(first.score)
        assert isinstance(broken.error, ModelOutputError) and broken.label is None and broken.top_k == []
        assert "not finite" in str(broken.error) and broken.to_dict()["error"]
        with pytest.raises(ModelOutputError, match="not finite"):
            clf.predict(dark, on_error="raise")


def test_postprocessor_flags_rows_that_are_not_finite():
    from speciesclf.model.postprocess import PostProcessor

    outputs = np.array([[1.0, 2.0], [np.nan, 0.0], [np.inf, 1.0], [-np.inf, 1.0]])
    for kind in ("logits", "probabilities"):
        assert PostProcessor(output_kind=kind)(outputs).finite.tolist() == [True, False, False, False]
    # Finite logits over a tiny temperature overflow to inf - inf = NaN: not a usable row either.
    assert PostProcessor(temperature=1e-308)(np.array([[1.0, 2.0], [0.0, 0.0]])).finite.tolist() == [False, True]


def test_the_service_answers_nan_scores_as_its_own_failure():
    from speciesclf import ModelOutputError
    from speciesclf.serve._images import error_for_prediction

    error = error_for_prediction(ModelOutputError("scores are not finite"))
    assert (error.status, error.code) == (500, "model_error")


# --- bundle verify loads the model; inspect says when a bundle was tampered with ------------------------------


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    from speciesclf.cli import main

    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_verify_refuses_random_bytes_as_model_onnx(tmp_path: Path, capsys):
    path = _bundle(tmp_path, os.urandom(1024), [Label(0, "a")])  # its sha256 is right: only a load tells
    rc, out, err = _cli(capsys, "bundle", "verify", str(path))
    assert rc == 1 and out == "", out  # before: "tiny@1.0.0: ok (sha256 ...)" and exit 0
    assert err.startswith("speciesclf: error: ") and "onnxruntime cannot load the model" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(BundleError, match="onnxruntime cannot load the model"):
        Bundle.open(path).check_model()
    rc, out, err = _cli(capsys, "bundle", "verify", "--hash-only", str(path))  # what --hash-only promises
    assert rc == 0 and "sha256" in out and "not loaded" in out


def test_verify_loads_a_sound_model_and_runs_a_test_image(tmp_path: Path, capsys):
    path = _bundle(tmp_path, _onnx_model(4), [Label(i, f"c{i}") for i in range(4)], num_outputs=4)
    check = Bundle.open(path).check_model()
    assert (check.runtime, check.device, check.classes, check.outputs) == ("onnxruntime", "cpu", 4, 4)
    rc, out, err = _cli(capsys, "bundle", "verify", str(path))
    assert rc == 0, err
    assert out.startswith("tiny@1.0.0: ok") and "onnxruntime" in out and "4 outputs" in out


def test_verify_compares_the_model_s_outputs_with_the_manifest(tmp_path: Path, capsys):
    path = _bundle(tmp_path, _onnx_model(5), [Label(i, f"c{i}") for i in range(3)], num_outputs=3)
    rc, out, err = _cli(capsys, "bundle", "verify", str(path))
    assert rc == 1 and "manifest.num_outputs: tiny@1.0.0 says 3, but its model has 5 outputs" in err


def test_verify_compares_the_model_s_declared_input_with_the_preprocessing(tmp_path: Path, capsys):
    model = _onnx_model(2, input_shape=("N", 3, 64, 64))  # the manifest's preprocessing gives 32x32
    path = _bundle(tmp_path, model, [Label(0, "a"), Label(1, "b")], num_outputs=2)
    rc, out, err = _cli(capsys, "bundle", "verify", str(path))
    assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "64" in err and "32" in err, err


def test_verify_runs_a_torch_model_to_learn_its_width(tmp_path: Path, capsys):
    import io
    import warnings

    import torch

    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5)).eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.export.save(torch.export.export(net, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},)),
                          buffer)
    src = tmp_path / "net.pt2"
    src.write_bytes(buffer.getvalue())
    labels = [Label(i, f"c{i}") for i in range(5)]
    good = create_bundle(tmp_path / "good", model_file=src, labels=labels, name="tiny", version="1.0.0",
                         preprocess=SPEC, num_outputs=5)
    rc, out, err = _cli(capsys, "bundle", "verify", str(good))
    assert rc == 0 and "torch" in out and "5 outputs" in out, err
    bad = create_bundle(tmp_path / "bad", model_file=src, labels=labels[:3], name="tiny", version="1.0.0",
                        preprocess=SPEC, num_outputs=3)
    rc, out, err = _cli(capsys, "bundle", "verify", str(bad))
    assert rc == 1 and "says 3, but its model has 5 outputs" in err


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_of_a_tampered_bundle_says_so_and_fails(tmp_path: Path, capsys, as_json: bool):
    path = _bundle(tmp_path, _onnx_model(2), [Label(0, "a"), Label(1, "b")], num_outputs=2)
    json_flag = ["--json"] if as_json else []
    rc, out, err = _cli(capsys, "bundle", "inspect", str(path), *json_flag)
    assert rc == 0 and err == "", err
    (path / "model.onnx").write_bytes(_onnx_model(2, bias=1.0))  # same size and kind, other weights
    rc, out, err = _cli(capsys, "bundle", "inspect", str(path), *json_flag)
    assert rc == 1  # before: 0, and not a word about it
    assert err.startswith("speciesclf: error: model_sha256 mismatch"), err
    # The manifest is still shown: what the bundle claims to be helps to find out what happened.
    if as_json:
        assert json.loads(out)["name"] == "tiny"
    else:
        assert "tiny@1.0.0" in out and "MISMATCH" in out
