"""One network exported three ways runs the same under ONNX Runtime and torch; plugins add formats."""

from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import speciesclf
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


def test_entry_point_plugin_adds_a_format(tmp_path, monkeypatch):
    """A package that declares a `speciesclf.loaders` entry point teaches Classifier a new model format."""
    site = tmp_path / "site"
    (site / "npyloader-0.1.dist-info").mkdir(parents=True)
    (site / "npyloader-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: npyloader\nVersion: 0.1\n")
    (site / "npyloader-0.1.dist-info" / "entry_points.txt").write_text("[speciesclf.loaders]\nnpy = npyloader:load\n")
    (site / "npyloader.py").write_text(textwrap.dedent('''
        import numpy as np

        class _MeanColour:
            name, device = "npy-linear", "cpu"
            def __init__(self, weights):
                self.weights = weights
            def run(self, batch):
                return batch.mean(axis=(2, 3)) @ self.weights

        def load(path, *, device, threads):
            return _MeanColour(np.load(path))
        load.suffixes = (".npy",)
    '''))
    monkeypatch.syspath_prepend(str(site))
    weights = tmp_path / "colours.npy"
    np.save(weights, np.array([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]], dtype=np.float32))  # red vs blue
    clf = Classifier.load(weights, labels=["red", "blue"])
    assert clf._engine.runtime.name == "npy-linear"
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 250
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[..., 2] = 250
    assert [p.label for p in clf.predict_batch([red, blue])] == ["red", "blue"]
    sys.modules.pop("npyloader", None)


def test_onnx_runtime_runs_large_batches_in_slices(shared_dir):
    # Slicing is a speed choice only: the outputs must be those of one run over the whole batch.
    from speciesclf.runtimes.ort import OnnxRuntime

    model = shared_dir / "models" / "mobilenetv2-12-int8.onnx"
    whole = OnnxRuntime(model, device="cpu", threads=2, run_batch=0)
    sliced = OnnxRuntime(model, device="cpu", threads=2, run_batch=3)
    assert OnnxRuntime(model, device="cpu").run_batch == 8  # the CPU default
    batch = np.random.default_rng(0).normal(size=(7, 3, 224, 224)).astype(np.float32)
    expected = whole.run(batch)
    assert expected.shape == (7, 1000)
    # (equal here; a tolerance in case a CPU's kernels differ with the batch size)
    np.testing.assert_allclose(sliced.run(batch), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sliced.run(batch[:2]), expected[:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="run_batch"):
        OnnxRuntime(model, device="cpu", run_batch=-1)
