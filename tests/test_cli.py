"""The CLI's output and options: the classify table, JSON, JSON Lines and CSV (with "unknown" as the Prediction
contract has it), help and defaults on every option, --version, preprocess's files, the progress bar.

A three-class ONNX model made here keeps these fast and independent of the shared assets: a red image is
class "red thing" with certainty, a grey one is a three-way tie, which its open-set rule calls unknown.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from speciesclf import Classifier, __version__
from speciesclf.bundles.bundle import Label, UnknownRule, create_bundle
from speciesclf.cli import build_parser, main
from speciesclf.preprocessing.spec import PreprocessSpec

SPEC = PreprocessSpec(size=16, resize=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLASSES = ["red thing", "green thing", "a blue thing with a rather long name"]


@pytest.fixture(autouse=True)
def _private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECIESCLF_HOME", str(tmp_path / "home"))


def colour_model() -> bytes:
    """(N, 3, H, W) in [-1, 1] -> logits 10 * channel means: the image's colour is its class."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["means"], axes=[2, 3], keepdims=0),
         helper.make_node("Mul", ["means", "gain"], ["output"])],
        "colour",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("gain", TensorProto.FLOAT, [], [10.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    source = tmp_path / "colour.onnx"
    source.write_bytes(colour_model())
    return create_bundle(tmp_path / "colour", model_file=source, labels=[Label(i, n) for i, n in enumerate(CLASSES)],
                         name="colour", version="1.0.0", preprocess=SPEC, num_outputs=3,
                         unknown=UnknownRule("max_probability", 0.5))


def _save(path: Path, rgb: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20, 3), rgb, dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    deep = tmp_path / "photos" / ("a-folder-with-a-long-name-" * 3) / "red.png"
    return [_save(deep, (255, 0, 0)), _save(tmp_path / "photos" / "grey.png", (128, 128, 128)),
            _save(tmp_path / "photos" / "green.png", (0, 255, 0))]


@pytest.fixture()
def broken(tmp_path: Path) -> Path:
    path = tmp_path / "photos" / "broken.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an image")
    return path


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# --- the table -------------------------------------------------------------------------------------------------


def test_table_has_a_header_and_columns_that_line_up(capsys, bundle: Path, images: list[Path], broken: Path):
    rc, out, err = _run(capsys, "classify", *images, broken, "--model", bundle)
    assert rc == 1  # the broken file
    lines = out.splitlines()
    assert len(lines) == 5 and lines[0].split()[:3] == ["FILE", "LABEL", "SCORE"]
    assert all(line == line.rstrip() for line in lines), "no row ends in spaces"  # error rows did
    header = lines[0]
    starts = {column: header.index(column) for column in ("LABEL", "SCORE", "OPEN-SET", "TOP-")}
    rows = {Path(line.split()[0]).name: line for line in lines[1:]}
    assert set(rows) == {"red.png", "grey.png", "green.png", "broken.png"}
    for name in ("red.png", "grey.png", "green.png"):  # before: a 50-character file column the long path overran
        row = rows[name]
        assert row[starts["LABEL"] - 2:starts["LABEL"]] == "  " and row[starts["LABEL"]] != " ", row
        assert row[starts["TOP-"] - 2:starts["TOP-"]] == "  " and row[starts["TOP-"]] != " ", row
    assert rows["red.png"][starts["LABEL"]:].startswith("red thing ")
    assert rows["broken.png"][starts["LABEL"]:].startswith("error: ")


def test_table_says_unknown_and_marks_the_guess(capsys, bundle: Path, images: list[Path]):
    rc, out, err = _run(capsys, "classify", images[1], "--model", bundle)
    assert rc == 0, err
    header, row = out.splitlines()
    label = row[header.index("LABEL"):header.index("SCORE")].strip()
    # A three-way tie: the guess is the first class, at 1/3; the open-set score (the top probability) too.
    assert label == "unknown (guess: red thing 0.333)"  # before: "unknown 0.333", the guess nowhere
    assert row[header.index("SCORE"):].split()[:2] == ["-", "0.333"]


def test_table_fits_a_terminal(bundle: Path, images: list[Path]):
    from speciesclf.cli import _Table

    names = [str(p) for p in images]
    table = _Table(names, CLASSES, can_be_unknown=True, top_k=5, columns=100)
    lines = [table.header()] + [table.row(n, _prediction()) for n in names]
    assert all(len(line) <= 100 for line in lines), lines
    assert lines[1].startswith("\u2026") and "red.png" in lines[1]  # long names are cut at the left
    starts = {line.index("0.900") for line in lines[1:]}
    assert len(starts) == 1


def _prediction():
    from speciesclf import Prediction

    return Prediction(label="red thing", guess="red thing", score=0.9, index=0, top_k=[("red thing", 0.9)],
                      unknown=False, model="colour@1.0.0", timings={}, open_set_score=0.9)


# --- JSON, JSON Lines, CSV ---------------------------------------------------------------------------------------


def test_json_is_one_array_and_jsonl_one_object_per_line(capsys, bundle: Path, images: list[Path]):
    rc, out, err = _run(capsys, "classify", *images, "--model", bundle, "--format", "json")
    assert rc == 0, err
    rows = json.loads(out)  # before: JSON Lines under the name json, which json.loads refuses
    assert isinstance(rows, list) and [Path(r["file"]).name for r in rows] == ["red.png", "grey.png", "green.png"]
    rc, out, err = _run(capsys, "classify", *images, "--model", bundle, "--format", "jsonl")
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]

    def untimed(row: dict) -> dict:
        return {key: value for key, value in row.items() if key != "timings"}

    assert list(map(untimed, lines)) == list(map(untimed, rows))


def test_json_and_csv_carry_unknown_as_the_contract_says(capsys, bundle: Path, images: list[Path]):
    rc, out, _ = _run(capsys, "classify", *images, "--model", bundle, "--format", "json")
    red, grey, _ = json.loads(out)
    assert grey["label"] is None and grey["unknown"] is True and grey["guess"] == "red thing"
    assert grey["open_set_score"] == pytest.approx(1 / 3, abs=1e-3) and grey["scientific_name"] is None
    assert red["label"] == red["guess"] == "red thing" and red["unknown"] is False
    rc, out, _ = _run(capsys, "classify", *images, "--model", bundle, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["label"] for r in rows] == ["red thing", "", "green thing"]
    assert rows[1]["guess"] == "red thing" and rows[1]["unknown"] == "true"
    assert float(rows[1]["open_set_score"]) == pytest.approx(1 / 3, abs=1e-3)


def test_errors_in_json_and_csv_have_a_code_and_a_message(capsys, bundle: Path, broken: Path):
    rc, out, _ = _run(capsys, "classify", broken, "--model", bundle, "--format", "json")
    (row,) = json.loads(out)
    assert rc == 1 and set(row["error"]) == {"code", "message"} and row["label"] is None
    rc, out, _ = _run(capsys, "classify", broken, "--model", bundle, "--format", "csv")
    (row,) = csv.DictReader(io.StringIO(out))
    assert row["error_code"] and row["error"] and row["label"] == ""


# --- options -------------------------------------------------------------------------------------------------------


def test_top_k_has_one_default_everywhere(capsys, tmp_path: Path):
    library = inspect.signature(Classifier.predict).parameters["top_k"].default
    assert inspect.signature(Classifier.predict_batch).parameters["top_k"].default == library
    args = build_parser().parse_args(["classify", "x.jpg"])
    assert args.top_k == library == 5  # before: 3 in the CLI


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _subcommands(child, (*path, name))


def test_every_option_has_help_and_shows_its_default():
    missing, no_default = [], []
    for path, parser in _subcommands(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            name = " ".join(path) + " " + action.option_strings[-1]
            if not action.help:
                missing.append(name)
            if action.default in ([], ()):  # an empty repeatable option: nothing to show, and no "(default: )"
                assert "(default: )" not in parser._get_formatter()._get_help_string(action), name
            elif action.default not in (None, False, argparse.SUPPRESS):
                shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
                help_text = parser._get_formatter()._get_help_string(action) % vars(action)
                if shown not in help_text or shown not in text:
                    no_default.append(name)
    assert missing == [] and no_default == [], (missing, no_default)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"speciesclf {__version__}"


# --- preprocess's files --------------------------------------------------------------------------------------------


def test_preprocess_of_nothing_readable_writes_nothing(capsys, tmp_path: Path, broken: Path):
    out = tmp_path / "out.npy"
    rc, _, err = _run(capsys, "preprocess", broken, "--output", out, "--size", "16", "--resize", "0")
    assert rc == 1 and "nothing written" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []  # before: a NaN-filled out.npy
    rc, _, err = _run(capsys, "preprocess", tmp_path / "missing", "--output", out)
    assert rc == 1 and not out.exists(), err


def test_preprocess_writes_the_ok_mask_and_the_errors_beside_partial_results(capsys, tmp_path: Path,
                                                                           images: list[Path], broken: Path):
    out = tmp_path / "out.npy"
    rc, _, err = _run(capsys, "preprocess", images[0], broken, images[2], "--output", out, "--size", "16",
                      "--resize", "0")
    assert rc == 1  # one image failed
    array, ok = np.load(out), np.load(tmp_path / "out.ok.npy")
    assert array.shape == (3, 3, 16, 16) and ok.tolist() == [True, False, True]
    assert np.isfinite(array[ok]).all() and np.isnan(array[1]).all()
    index = json.loads((tmp_path / "out.index.json").read_text())
    assert [Path(f).name for f in index["files"]] == ["red.png", "broken.png", "green.png"]
    (error,) = index["errors"]
    assert error["index"] == 1 and Path(error["file"]).name == "broken.png" and error["code"] and error["message"]


# --- progress ----------------------------------------------------------------------------------------------------


def test_progress_bar_shows_the_rate_and_the_total(capsys, bundle: Path, images: list[Path]):
    rc, out, err = _run(capsys, "classify", *images, "--model", bundle, "--progress", "on", "--format", "csv")
    assert rc == 0
    assert re.search(r"3/3 \[", err) and "img/s" in err, err  # tqdm: count/total [elapsed<remaining, rate]
    rc, out, err = _run(capsys, "classify", *images, "--model", bundle, "--progress", "off", "--format", "csv")
    assert rc == 0 and err == ""
