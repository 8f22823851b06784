"""CLI errors: bad arguments, unusable models and files end in one line ``speciesclf: error: ...``, never a
traceback. The commands run in-process, so that an escaping exception fails the test with its traceback."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from speciesclf import Classifier
from speciesclf.bundles.bundle import Label, create_bundle
from speciesclf.cli import main
from speciesclf.preprocessing.spec import PreprocessSpec

SPEC = PreprocessSpec(size=32, resize=None)


@pytest.fixture(autouse=True)
def _private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECIESCLF_HOME", str(tmp_path / "home"))


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(path)
    return path


def _one_error_line(capsys: pytest.CaptureFixture, rc: int, match: str) -> str:
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("speciesclf: error: "), err
    assert match in lines[0], err
    return lines[0]


@pytest.mark.parametrize("option, value", [("--top-k", "0"), ("--threads", "-1"), ("--threads", "0"),
                                           ("--batch-size", "0"), ("--top-k", "many")])
def test_classify_counts_are_checked_when_parsed(capsys, image: Path, option: str, value: str):
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", str(image), "--model", "no-such-model", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: expected an integer >= 1" in err and "Traceback" not in err


@pytest.mark.parametrize("threads", [0, -1, True, 1.5])
def test_classifier_load_refuses_bad_thread_counts(threads):
    with pytest.raises(ValueError, match="threads must be an int >= 1 or None"):
        Classifier.load("no-such-model", threads=threads)


def test_classify_a_bundle_whose_model_is_not_onnx(capsys, tmp_path: Path, image: Path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not really a model")
    bundle = create_bundle(tmp_path / "b", model_file=model, labels=[Label(0, "a")], name="garbage", version="1.0.0")
    rc = main(["classify", str(image), "--model", str(bundle), "--threads", "1"])
    _one_error_line(capsys, rc, "onnxruntime cannot load the model")


def test_classify_an_empty_builtin_tag(capsys, image: Path):
    rc = main(["classify", str(image), "--model", "species100@"])
    _one_error_line(capsys, rc, "nothing after '@'")
    rc = main(["classify", str(image), "--model", "species100@latest"])
    _one_error_line(capsys, rc, "built-in species100 has version 1.0.0")


def test_an_error_while_classifying_is_one_line(capsys, tmp_path: Path, image: Path):
    import torch

    # torch models tell their output width only when they run: the error comes from the classify loop.
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5)).eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.export.save(torch.export.export(net, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},)),
                          buffer)
    model = tmp_path / "net.pt2"
    model.write_bytes(buffer.getvalue())
    bundle = create_bundle(tmp_path / "b", model_file=model, labels=[Label(i, f"c{i}") for i in range(3)],
                           name="wide", version="1.0.0", preprocess=SPEC, num_outputs=3)
    rc = main(["classify", str(image), "--model", str(bundle), "--device", "cpu", "--quiet"])
    _one_error_line(capsys, rc, "manifest.num_outputs: wide@1.0.0 says 3, but its model has 5 outputs")


def test_a_runtime_failing_mid_run_is_one_line(capsys, tmp_path: Path, image: Path):
    """A model that runs one image but fails on a batch (a Reshape to batch 1): onnxruntime raises its own
    exception types (Fail, InvalidArgument: none a ValueError or RuntimeError), still one line, no traceback."""
    from tiny_models import batch_of_one_onnx

    path = batch_of_one_onnx(tmp_path / "one.onnx")
    bundle = create_bundle(tmp_path / "b", model_file=path, labels=[Label(i, f"c{i}") for i in range(3)],
                           name="one", version="1.0.0", preprocess=SPEC, num_outputs=3)
    rc = main(["classify", *[str(image)] * 4, "--model", str(bundle), "--threads", "1", "--quiet"])
    line = _one_error_line(capsys, rc, "Fail: ")
    assert "cannot be reshaped" in line


@pytest.mark.parametrize("args, match", [
    (["--size", "0"], "PreprocessSpec.size must be a positive int"),
    (["--resize", "100"], "PreprocessSpec.resize (100) must be >= size (224)"),
    (["--size", "100000", "--resize", "0"], "PreprocessSpec.size must be <= 8192"),
    (["--output", "/nonexistent/dir/x.npy"], "No such file or directory"),
])
def test_preprocess_errors_are_one_line(capsys, image: Path, args: list[str], match: str):
    rc = main(["preprocess", str(image), *args])
    _one_error_line(capsys, rc, match)


def test_bundle_inspect_of_a_manifest_json_cannot_parse(capsys, tmp_path: Path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    bundle = create_bundle(tmp_path / "b", model_file=model, labels=[Label(0, "a")], name="big", version="1.0.0")
    manifest = bundle / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good.replace('"temperature": 1.0', '"temperature": 1' + "0" * 5000))
    rc = main(["bundle", "inspect", str(bundle)])
    _one_error_line(capsys, rc, "manifest.json: unusable JSON")
    manifest.write_text("[" * 100_000 + "]" * 100_000)
    rc = main(["bundle", "inspect", str(bundle)])
    _one_error_line(capsys, rc, "nested too deeply")
    manifest.write_text(good.replace('"num_outputs": null', '"num_outputs": 1000000000000'))
    rc = main(["bundle", "inspect", str(bundle)])  # before: MemoryError from set(range(num_outputs))
    _one_error_line(capsys, rc, "manifest.num_outputs: expected an integer in 1..16777216")


# --- classify's output, whatever the file names and wherever it goes -----------------------------------------


def _classify(args: list[str], shared_dir: Path, **kw) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys

    env = dict(os.environ, SPECIESCLF_WEIGHTS=str(shared_dir / "models"), PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "speciesclf", "classify", *args], capture_output=True, env=env,
                          timeout=120, **kw)


@pytest.fixture()
def odd_names(tmp_path: Path, sample_photos) -> Path:
    import os

    folder = tmp_path / "odd"
    folder.mkdir()
    photo = sample_photos[0].read_bytes()
    for name in (b"caf\xe9.jpg", b"new\nline.jpg", b"comma, \"quote\".jpg", b"plain.jpg"):
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(photo)
    return folder


def test_odd_file_names_keep_one_row_each_in_every_format(odd_names: Path, shared_dir: Path) -> None:
    import csv
    import json

    table = _classify([str(odd_names), "--model", "imagenet1k"], shared_dir)
    assert table.returncode == 0, table.stderr.decode()
    lines = table.stdout.decode("utf-8").splitlines()
    assert len(lines) == 1 + 4 and lines[0].startswith("FILE ")  # a newline in a name does not split its row
    rows = list(csv.reader(io.StringIO(_classify([str(odd_names), "--model", "imagenet1k", "--format", "csv"],
                                                 shared_dir).stdout.decode("utf-8"))))
    assert len(rows) == 5 and all(len(row) == len(rows[0]) == 10 for row in rows)
    names = sorted(Path(row[0]).name for row in rows[1:])
    assert names == sorted(["caf\\xe9.jpg", "new\nline.jpg", 'comma, "quote".jpg', "plain.jpg"])
    assert {row[1] for row in rows[1:]} == {"tench"}
    out = _classify([str(odd_names), "--model", "imagenet1k", "--format", "jsonl"], shared_dir).stdout
    objects = [json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
               for line in out.decode("utf-8").splitlines()]
    assert len(objects) == 4 and all(o["label"] == "tench" for o in objects)
    out = _classify([str(odd_names), "--model", "imagenet1k", "--format", "json"], shared_dir).stdout
    array = json.loads(out.decode("utf-8"), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert [o["file"] for o in array] == [o["file"] for o in objects]


def test_a_path_the_os_cannot_look_up_fails_on_its_own_row(image: Path, shared_dir: Path) -> None:
    result = _classify([str(image), "y" * 300 + ".jpg", "--model", "imagenet1k", "--format", "csv"], shared_dir)
    rows = result.stdout.decode().splitlines()
    assert result.returncode == 1 and len(rows) == 3, result.stderr.decode()
    assert rows[2].endswith("File name too long") and "Traceback" not in result.stderr.decode()


def test_a_reader_going_away_ends_the_run_quietly(shared_dir: Path, sample_photos) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, SPECIESCLF_WEIGHTS=str(shared_dir / "models"))
    folder = str(sample_photos[0].parent)
    with subprocess.Popen([sys.executable, "-m", "speciesclf", "classify", folder, "--model", "imagenet1k",
                           "--format", "csv", "--batch-size", "8"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        proc.stdout.readline()
        proc.stdout.close()  # like `| head -1`
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err.decode().strip() == "", err.decode()


def test_ctrl_c_stops_without_a_traceback(shared_dir: Path, sample_photos) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, SPECIESCLF_WEIGHTS=str(shared_dir / "models"))
    folder = str(sample_photos[0].parent)
    with subprocess.Popen([sys.executable, "-m", "speciesclf", "classify", *[folder] * 12, "--model",
                           "imagenet1k", "--batch-size", "8"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        proc.stdout.readline()  # classifying has begun (5,028 images: seconds of work left)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err.decode(), err.decode()


def test_json_output_has_no_nan() -> None:
    from speciesclf.cli import _finite_or_none

    assert _finite_or_none({"score": float("nan"), "top_k": [{"score": float("inf")}, {"score": 0.5}]}) == \
        {"score": None, "top_k": [{"score": None}, {"score": 0.5}]}
