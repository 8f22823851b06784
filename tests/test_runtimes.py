"""One network exported three ways runs the same under ONNX Runtime and torch; plugins add formats."""

from __future__ import annotations

import os
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import speciesclf
import torch
from forking import exit_code_in_child
from speciesclf import Classifier, PreprocessSpec

LABELS = [f"class {i}" for i in range(10)]


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layers, channels = [], 3
        for width in (16, 32, 64):
            layers += [torch.nn.Conv2d(channels, width, 3, stride=2, padding=1), torch.nn.BatchNorm2d(width),
                       torch.nn.ReLU()]
            channels = width
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(channels, 10)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exported")
    net = SmallNet().eval()
    example = torch.randn(2, 3, 224, 224)
    paths = {"torchscript": folder / "net.pt", "torch-export": folder / "net.pt2", "onnx": folder / "net.onnx"}
    # TorchScript and the TorchScript-based ONNX exporter are deprecated in recent torch, but models in
    # those formats are what users bring: make them, quietly.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(net, example).save(str(paths["torchscript"]))
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(paths["torch-export"]))
        torch.onnx.export(net, (example,), str(paths["onnx"]), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)
    return paths


def _load(path: Path, **kwargs) -> Classifier:
    if path.suffix == ".pt":  # torch passes its TorchScript deprecation notice on to the user, as it should
        with pytest.warns(DeprecationWarning, match="torch.jit.load"):
            return Classifier.load(path, labels=LABELS, batch_size=16, **kwargs)
    return Classifier.load(path, labels=LABELS, batch_size=16, **kwargs)


@pytest.mark.shared
def test_same_network_same_answers_across_runtimes(exported, sample_photos):
    photos = sample_photos[:48]
    batch = speciesclf.preprocess_batch(photos, PreprocessSpec()).array
    outputs, top1 = {}, {}
    for framework, path in exported.items():
        clf = _load(path)
        assert clf._engine.runtime.name == ("onnxruntime" if framework == "onnx" else "torch")
        outputs[framework] = clf._engine.runtime.run(batch)
        top1[framework] = [p.index for p in clf.predict_batch(photos)]
    reference = outputs["torchscript"]
    scale = np.abs(reference).max()
    for framework, logits in outputs.items():
        relative = np.abs(logits - reference).max() / scale
        print(f"\n[runtimes] {framework}: max relative logit difference to TorchScript {relative:.2e}")
        assert relative <= 1e-4, framework
        assert top1[framework] == top1["torchscript"], framework


def test_backend_choice_is_checked(exported):
    with pytest.raises(ValueError, match="onnxruntime"):
        Classifier.load(exported["onnx"], labels=LABELS, backend="torch")
    with pytest.raises(ValueError, match="torch backend"):
        Classifier.load(exported["torchscript"], labels=LABELS, backend="onnxruntime")


def _install_npy_plugin(tmp_path, monkeypatch, before_load: str = "") -> None:
    """A package `npyloader` declaring a `speciesclf.loaders` entry point for `.npy` weight files.
    ``before_load`` is Python run by its loader first (``path`` is the path it was given)."""
    site = tmp_path / "site"
    (site / "npyloader-0.1.dist-info").mkdir(parents=True)
    (site / "npyloader-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: npyloader\nVersion: 0.1\n")
    (site / "npyloader-0.1.dist-info" / "entry_points.txt").write_text("[speciesclf.loaders]\nnpy = npyloader:load\n")
    (site / "npyloader.py").write_text(textwrap.dedent('''
        import numpy as np

        seen = []

        class _MeanColour:
            name, device = "npy-linear", "cpu"
            def __init__(self, weights):
                self.weights = weights
            def run(self, batch):
                return batch.mean(axis=(2, 3)) @ self.weights

        def load(path, *, device, threads):
            seen.append(path)
            BEFORE_LOAD
            return _MeanColour(np.load(path))
        load.suffixes = (".npy",)
    ''').replace("BEFORE_LOAD", before_load or "pass"))
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop("npyloader", None)


def _red_and_blue() -> list[np.ndarray]:
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 250
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[..., 2] = 250
    return [red, blue]


RED_VS_BLUE = np.array([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]], dtype=np.float32)


def test_entry_point_plugin_adds_a_format(tmp_path, monkeypatch):
    """A package that declares a `speciesclf.loaders` entry point teaches Classifier a new model format."""
    _install_npy_plugin(tmp_path, monkeypatch)
    weights = tmp_path / "colours.npy"
    np.save(weights, RED_VS_BLUE)
    clf = Classifier.load(weights, labels=["red", "blue"])
    assert clf._engine.runtime.name == "npy-linear"
    assert [p.label for p in clf.predict_batch(_red_and_blue())] == ["red", "blue"]
    sys.modules.pop("npyloader", None)


def test_plugin_loads_the_checked_bytes_of_a_bundle(tmp_path, monkeypatch):
    """A bundle's model file replaced after its sha256 check (here: by the time the plugin opens it) must
    not be what runs. Before, plugins got the bundle's own path and loaded the replacement."""
    import gc

    weights = tmp_path / "colours.npy"
    np.save(weights, RED_VS_BLUE)
    bundle = speciesclf.create_bundle(tmp_path / "bundle", model_file=weights, framework="npy",
                                      labels=[speciesclf.Label(0, "red"), speciesclf.Label(1, "blue")],
                                      name="colours", version="1.0.0", preprocess=PreprocessSpec(size=32, resize=None))
    swapped = tmp_path / "swapped.npy"
    np.save(swapped, -RED_VS_BLUE)  # every answer the wrong way round
    target = Path(bundle) / "model.npy"
    assert target.exists()
    (Path(bundle) / "sidecar.txt").write_text("found")  # a format's second file, beside the model
    _install_npy_plugin(tmp_path, monkeypatch, before_load=f"import shutil; shutil.copyfile({str(swapped)!r}, "
                                                           f"{str(target)!r}); import pathlib; assert pathlib.Path("
                                                           f"path).with_name('sidecar.txt').read_text() == 'found'")
    clf = Classifier.load(bundle)
    import npyloader

    (given,) = npyloader.seen
    assert Path(given) != target and Path(given).name == "model.npy"
    assert [p.label for p in clf.predict_batch(_red_and_blue())] == ["red", "blue"]
    # The private copy lives as long as the runtime.
    assert Path(given).exists()
    clf.close()
    del clf
    gc.collect()
    assert not Path(given).parent.exists()
    sys.modules.pop("npyloader", None)


def test_bundle_of_a_plugin_format_without_the_plugin_says_so(tmp_path):
    weights = tmp_path / "colours.npy"
    np.save(weights, RED_VS_BLUE)
    bundle = speciesclf.create_bundle(tmp_path / "bundle", model_file=weights, framework="npy",
                                      labels=[speciesclf.Label(0, "red"), speciesclf.Label(1, "blue")],
                                      name="colours", version="1.0.0")
    with pytest.raises(ValueError, match="no runtime for framework 'npy' .*speciesclf.loaders plugin"):
        Classifier.load(bundle)


def test_onnx_runtime_runs_large_batches_in_slices(shared_dir):
    # Slicing and side-by-side runs are speed choices only: the outputs must be those of one run over the
    # whole batch, in the same order.
    from speciesclf.model.runtimes.ort import OnnxRuntime

    model = shared_dir / "models" / "mobilenetv2-12-int8.onnx"
    whole = OnnxRuntime(model, device="cpu", threads=2, run_batch=0, parallel_runs=False)
    sliced = OnnxRuntime(model, device="cpu", threads=2, run_batch=3, parallel_runs=False)
    side_by_side = OnnxRuntime(model, device="cpu", threads=2, run_batch=3, parallel_runs=True)
    assert OnnxRuntime(model, device="cpu").run_batch == 8  # the CPU default
    batch = np.random.default_rng(0).normal(size=(7, 3, 224, 224)).astype(np.float32)
    expected = whole.run(batch)
    assert expected.shape == (7, 1000)
    # (equal here; a tolerance in case a CPU's kernels differ with the batch size or the thread count)
    for runtime in (sliced, side_by_side):
        for n in (7, 2, 1):
            np.testing.assert_allclose(runtime.run(batch[:n]), expected[:n], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="run_batch"):
        OnnxRuntime(model, device="cpu", run_batch=-1)
    with pytest.raises(ValueError, match="parallel_runs"):
        OnnxRuntime(model, device="cpu", parallel_runs="yes")


def test_onnx_side_by_side_runs_are_on_for_small_models_only(shared_dir, monkeypatch):
    from speciesclf.model.runtimes import ort as ort_runtime

    model = shared_dir / "models" / "mobilenetv2-12-int8.onnx"
    assert ort_runtime.OnnxRuntime(model, device="cpu", threads=2)._single_thread is not None
    assert ort_runtime.OnnxRuntime(model, device="cpu", threads=1)._single_thread is None  # one lane: nothing to gain
    assert ort_runtime.OnnxRuntime(model, device="cpu", threads=2, parallel_runs=False)._single_thread is None
    # A second session is a second copy of the weights: a large model gets one only when asked.
    monkeypatch.setattr(ort_runtime, "_PARALLEL_RUNS_MAX_MODEL_BYTES", model.stat().st_size - 1)
    assert ort_runtime.OnnxRuntime(model, device="cpu", threads=2)._single_thread is None
    assert ort_runtime.OnnxRuntime(model, device="cpu", threads=2, parallel_runs=True)._single_thread is not None
    assert ort_runtime.OnnxRuntime(model, device="cpu", threads=2, data=model.read_bytes())._single_thread is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_onnx_side_by_side_runs_work_in_a_forked_child(shared_dir):
    # The parent's lane threads do not exist in a child: a pool copied with the process would wait forever.
    from speciesclf.model.runtimes.ort import OnnxRuntime

    runtime = OnnxRuntime(shared_dir / "models" / "mobilenetv2-12-int8.onnx", device="cpu", threads=2)
    batch = np.random.default_rng(1).normal(size=(4, 3, 224, 224)).astype(np.float32)
    expected = runtime.run(batch)  # the parent's pool now has its threads
    outcome = exit_code_in_child(lambda: np.allclose(runtime.run(batch), expected, rtol=1e-5, atol=1e-5),
                                 timeout_s=20)
    assert outcome == 0, "the forked child hung running a batch" if outcome == "hung" else outcome


def _fixed_batch_model(path: Path, batch: int) -> Path:
    """(batch, 3, H, W) -> (batch, 3) with the batch dimension fixed, as torch.onnx.export writes it
    without dynamic axes."""
    import onnx
    from onnx import TensorProto, helper

    weight = np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 1.0, 0.0]], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["means"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["means", "weight"], ["output"])],
        "fixed_batch",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor("weight", TensorProto.FLOAT, [3, 3], weight.ravel().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("fixed", [1, 4])
@pytest.mark.parametrize("parallel_runs", [True, False])
def test_models_with_a_fixed_batch_size_take_any_batch(tmp_path, fixed, parallel_runs):
    # Before: every batch of another size failed in ONNX Runtime ("Got: 3 Expected: 1").
    model = _fixed_batch_model(tmp_path / "fixed.onnx", fixed)
    clf = Classifier.load(model, labels=["red", "blue", "other"], preprocess=PreprocessSpec(size=32, resize=None),
                          threads=2, runtime_options={"parallel_runs": parallel_runs})
    assert clf._engine.runtime.fixed_batch == fixed
    red, blue = _red_and_blue()
    images = [red, blue, red, blue, blue, red, red]
    expected = ["red", "blue", "red", "blue", "blue", "red", "red"]
    for n in (1, 3, 4, 7):
        predictions = clf.predict_batch(images[:n])
        assert [p.label for p in predictions] == expected[:n]
        singles = [clf.predict(image).score for image in images[:n]]
        np.testing.assert_allclose([p.score for p in predictions], singles, rtol=1e-6)


@pytest.mark.parametrize("fixed", [None, 2])
@pytest.mark.parametrize("parallel_runs", [True, False])
def test_an_empty_batch_gives_empty_outputs(tmp_path, fixed, parallel_runs):
    from speciesclf.model.runtimes.ort import OnnxRuntime

    if fixed is None:
        model = _fixed_batch_model(tmp_path / "m.onnx", 1)
        import onnx

        proto = onnx.load(model)  # the same graph with a symbolic batch dimension
        proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
        proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
        onnx.save(proto, model)
    else:
        model = _fixed_batch_model(tmp_path / "m.onnx", fixed)
    runtime = OnnxRuntime(model, device="cpu", threads=2, parallel_runs=parallel_runs)
    assert runtime.fixed_batch == fixed
    assert runtime.run(np.zeros((0, 3, 8, 8), np.float32)).shape == (0, 3)


def test_side_by_side_runs_survive_a_pool_that_was_shut_down(shared_dir):
    # As at interpreter exit, when the executor refuses new work: the parts then run in the calling thread.
    from speciesclf.model.runtimes.ort import OnnxRuntime

    runtime = OnnxRuntime(shared_dir / "models" / "mobilenetv2-12-int8.onnx", device="cpu", threads=2)
    batch = np.random.default_rng(2).normal(size=(4, 3, 224, 224)).astype(np.float32)
    expected = runtime.run(batch)
    runtime._pool().shutdown()
    np.testing.assert_allclose(runtime.run(batch), expected, rtol=1e-5, atol=1e-5)


def test_closing_the_classifier_stops_the_runtime_threads(shared_dir, sample_photos):
    import threading

    clf = Classifier.load(shared_dir / "models" / "mobilenetv2-12-int8.onnx", labels="imagenet1k", threads=2)
    assert all(p.ok for p in clf.predict_batch(sample_photos[:4]))
    assert any(t.name.startswith("speciesclf-onnx-lane") for t in threading.enumerate())
    clf.close()
    assert not any(t.name.startswith("speciesclf-onnx-lane") for t in threading.enumerate())


# --- the model's declared input against the preprocessing spec (issue 12 item 2) ----------------------------

def _two_input_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["means"], axes=[2, 3], keepdims=0),
         helper.make_node("Add", ["means", "bias"], ["output"])],
        "two_inputs",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224]),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.shared
@pytest.mark.parametrize("spec, named", [
    (PreprocessSpec(size=256, resize=288), ["256", "224"]),
    (PreprocessSpec(layout="NHWC"), ["NHWC", "NCHW"]),
    (PreprocessSpec(dtype="uint8"), ["uint8", "float32"]),
    (PreprocessSpec(dtype="float16"), ["float16", "float32"]),
])
def test_onnx_input_that_does_not_fit_the_spec_is_refused_at_load(shared_dir, spec, named):
    # Before: these loaded, then every predict failed whole with onnxruntime's raw InvalidArgument.
    from speciesclf import BundleError, ModelInputError

    with pytest.raises(ModelInputError) as caught:
        Classifier.load(shared_dir / "models" / "mobilenetv2-12-int8.onnx", labels="imagenet1k", preprocess=spec)
    assert isinstance(caught.value, BundleError)
    message = str(caught.value)
    assert all(word in message for word in named), message
    assert "'input'" in message and "[N, 3, 224, 224]" in message


def test_a_multi_input_model_gets_a_clear_error(tmp_path):
    from speciesclf import ModelInputError

    # Before: ValueError: too many values to unpack (expected 1).
    with pytest.raises(ModelInputError, match=r"2 inputs \('input', 'bias'\).*one image input"):
        Classifier.load(_two_input_model(tmp_path / "two.onnx"), labels=["a", "b", "c"])


def test_torch_export_input_is_checked_at_load(exported):
    from speciesclf import ModelInputError

    with pytest.raises(ModelInputError, match=r"224.*256|256.*224"):
        _load(exported["torch-export"], preprocess=PreprocessSpec(size=256, resize=288))
    with pytest.raises(ModelInputError, match="NHWC"):
        _load(exported["torch-export"], preprocess=PreprocessSpec(layout="NHWC"))


def test_torchscript_input_is_probed_at_load(exported):
    from speciesclf import ModelInputError

    # TorchScript declares no input shapes: one image of the spec's shape is run at load instead.
    with pytest.raises(ModelInputError, match="NHWC") as caught:
        _load(exported["torchscript"], preprocess=PreprocessSpec(layout="NHWC"))
    assert "expected input" in str(caught.value) or "channels" in str(caught.value)
    # The network pools over any image size: 256 is a fine input for it.
    assert _load(exported["torchscript"], preprocess=PreprocessSpec(size=256, resize=288)).spec.size == 256


def test_check_model_io_is_callable_on_its_own(exported):
    from speciesclf import ModelInputError
    from speciesclf.model.classifier import check_model_io
    from speciesclf.model.runtimes import load_runtime

    runtime = load_runtime(exported["onnx"], "onnx", device="cpu")
    check_model_io(runtime, PreprocessSpec())
    with pytest.raises(ModelInputError):
        check_model_io(runtime, PreprocessSpec(layout="NHWC"))
    manifest = speciesclf.Manifest(name="net", version="1.0.0", framework="onnx", model_file="model.onnx",
                                   model_sha256="0" * 64, labels_file="labels.tsv", preprocess=PreprocessSpec(),
                                   num_outputs=12)
    with pytest.raises(speciesclf.BundleError, match="num_outputs.*12.*10 outputs"):
        check_model_io(runtime, manifest.preprocess, manifest)


def _pooling_model(path: Path, shape, *, elem: str = "float", nhwc: bool = False) -> Path:
    """A valid classifier of any image size: channel means (after a cast from ``elem``), then 3 -> 4 outputs:
    the last is the blue mean, the others 0."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    element = {"float": TensorProto.FLOAT, "uint8": TensorProto.UINT8}[elem]
    nodes = [helper.make_node("Cast", ["input"], ["pixels"], to=TensorProto.FLOAT)]
    nodes.append(helper.make_node("ReduceMean", ["pixels"], ["means"], axes=[1, 2] if nhwc else [2, 3], keepdims=0))
    nodes.append(helper.make_node("MatMul", ["means", "weights"], ["output"]))
    matrix = np.zeros((3, 4), np.float32)
    matrix[2, 3] = 1  # output "d" is the blue channel's mean, the others 0
    weights = numpy_helper.from_array(matrix, "weights")
    graph = helper.make_graph(nodes, "pooling", [helper.make_tensor_value_info("input", element, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("shape, elem, spec", [
    (["N", 3, "H", "W"], "float", PreprocessSpec()),
    (["N", "C", "H", "W"], "float", PreprocessSpec()),
    (None, "float", PreprocessSpec()),  # no declared shape (rank unknown): nothing to check it against
    (["N", 224, 224, 3], "uint8", PreprocessSpec(layout="NHWC", dtype="uint8")),
    ([1, 3, 224, 224], "float", PreprocessSpec()),  # a fixed batch of 1: larger batches run in parts
    ([4, 3, 224, 224], "float", PreprocessSpec()),
])
def test_valid_onnx_inputs_load_and_predict(tmp_path, shape, elem, spec):
    model = _pooling_model(tmp_path / "pool.onnx", shape, elem=elem, nhwc=spec.layout == "NHWC")
    image = np.zeros((40, 50, 3), np.uint8)
    image[..., 2] = 255
    with Classifier.load(model, labels=list("abcd"), preprocess=spec, batch_size=6) as clf:
        predictions = clf.predict_batch([image] * 7)
    assert [p.label for p in predictions] == ["d"] * 7 and all(p.ok for p in predictions)


def test_a_runtime_failing_a_batch_raises_a_typed_error_with_its_message(tmp_path):
    """onnxruntime raises its own exception types (Fail, InvalidArgument: neither a ValueError nor a
    RuntimeError of ours); the call gets ModelRuntimeError, in the one error table, with the runtime's words."""
    from tiny_models import batch_of_one_onnx

    from speciesclf import Classifier, Label, ModelRuntimeError, PreprocessSpec, create_bundle
    from speciesclf.errors import error_body

    path = batch_of_one_onnx(tmp_path / "one.onnx")
    bundle = create_bundle(tmp_path / "b", model_file=path, labels=[Label(i, f"c{i}") for i in range(3)],
                           name="one", version="1.0.0", preprocess=PreprocessSpec(size=32, resize=32), num_outputs=3)
    pixels = np.full((40, 40, 3), 120, np.uint8)
    with Classifier.load(bundle, device="cpu") as clf:
        assert clf.predict(pixels).ok  # one image fits the graph's batch of one
        with pytest.raises(ModelRuntimeError, match=r"one@1\.0\.0: the model's runtime failed on a batch of 3") as info:
            clf.predict_batch([pixels] * 3)
        assert "reshape" in str(info.value).lower()
        assert error_body(info.value)["code"] == "model_error"
        assert clf.predict(pixels).ok  # the classifier still works
