"""speciesclf.evaluate and `speciesclf evaluate`: datasets (class folders, labels CSVs), matching classes by name
or index, the figures on a synthetic dataset whose every answer is known, and the shared ImageNet photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from speciesclf import Classifier
from speciesclf.bundles.bundle import Label, UnknownRule, create_bundle
from speciesclf.cli import main
from speciesclf.evaluate import Dataset, DatasetError, evaluate, load_dataset, normalize_class_name
from test_cli import CLASSES, SPEC, colour_model

RED, GREEN, GREY = (255, 0, 0), (0, 255, 0), (128, 128, 128)


@pytest.fixture(autouse=True)
def _private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECIESCLF_HOME", str(tmp_path / "home"))


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    source = tmp_path / "colour.onnx"
    source.write_bytes(colour_model())
    return create_bundle(tmp_path / "colour", model_file=source, labels=[Label(i, n) for i, n in enumerate(CLASSES)],
                         name="colour", version="1.0.0", preprocess=SPEC, num_outputs=3,
                         unknown=UnknownRule("max_probability", 0.5))


@pytest.fixture()
def classifier(bundle: Path):
    with Classifier.load(bundle, device="cpu") as clf:
        yield clf


def _save(path: Path, rgb: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20, 3), rgb, dtype=np.uint8)).save(path)
    return path


# The model calls red images "red thing", green ones "green thing", and grey ones unknown (a three-way tie).
TREE = {
    "red_thing": [RED, RED, RED, GREEN],  # three right, one taken for the green class
    "Green-Thing": [GREEN, GREEN],  # another spelling of "green thing": matched by name all the same
    "purple": [GREY, GREY, RED],  # a class the model does not have: two rightly unknown, one answered
}


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for name, colours in TREE.items():
        for i, colour in enumerate(colours):
            _save(root / name / "sub" / f"{i}.png", colour)
    return root


def test_class_names_match_whatever_the_case_and_separators():
    assert normalize_class_name("Blue_Jay") == normalize_class_name("blue-jay") == normalize_class_name(" Blue  jay")
    assert normalize_class_name("Blue_Jay") != normalize_class_name("Blue_Jays")


def test_a_folder_tree_is_one_class_per_subfolder(tree: Path):
    data = load_dataset(tree)
    assert len(data) == 9 and data.has_names and not data.has_indices
    assert sorted(set(data.names)) == ["Green-Thing", "purple", "red_thing"]


def test_figures_on_a_dataset_whose_every_answer_is_known(classifier, tree: Path):
    report = evaluate(classifier, tree, thresholds=[0.0, 0.5, 0.9])
    assert report.match == "name" and report.model == "colour@1.0.0"
    assert (report.images, report.evaluated, report.known, report.other) == (9, 9, 6, 3)
    assert report.top1 == pytest.approx(5 / 6) and report.top1_guess == pytest.approx(5 / 6)
    assert report.top5 == 1.0  # every class is among the three guesses
    assert report.unknown_rate == pytest.approx(2 / 9)
    assert report.unknown_rate_known == 0.0 and report.unknown_rate_other == pytest.approx(2 / 3)
    assert report.open_set_accuracy == pytest.approx(7 / 9)
    assert report.unmatched_classes == ("purple",) and report.rule == ("max_probability", 0.5)
    figures = {c.name: c for c in report.classes}
    assert set(figures) == {"red_thing", "Green-Thing"}
    red, green = figures["red_thing"], figures["Green-Thing"]
    # "red thing" was said 4 times (3 red photos, the purple folder's red one), 3 of them right.
    assert (red.support, red.predicted, red.correct) == (4, 4, 3)
    assert red.precision == pytest.approx(0.75) and red.recall == pytest.approx(0.75)
    assert (green.support, green.predicted, green.correct) == (2, 3, 2)
    assert green.precision == pytest.approx(2 / 3) and green.recall == 1.0
    everything, half, strict = report.sweep
    assert (everything.coverage, everything.accuracy, everything.known_answered, everything.other_rejected) == \
        pytest.approx((1.0, 5 / 9, 1.0, 0.0))
    # At 0.5 (the model's own rule) the two grey photos are unknown: 7 answers, 5 right.
    assert (half.coverage, half.accuracy, half.known_answered, half.other_rejected) == \
        pytest.approx((7 / 9, 5 / 7, 1.0, 2 / 3))
    assert strict.threshold == 0.9 and strict.coverage == pytest.approx(7 / 9)


def test_report_as_text_and_as_json(classifier, tree: Path):
    report = evaluate(classifier, tree)
    text = report.format(per_class=1)
    assert "top-1        0.833" in text and "<- the model's" in text and "1 of 2, worst recall first" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["top1"] == pytest.approx(5 / 6) and data["rule"] == {"method": "max_probability", "threshold": 0.5}
    assert len(data["sweep"]) == 19 and {c["name"] for c in data["classes"]} == {"red_thing", "Green-Thing"}


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_a_labels_csv_in_the_model_s_label_space_is_matched_by_index(classifier, tmp_path: Path):
    _save(tmp_path / "img" / "a.png", RED)
    _save(tmp_path / "img" / "b.png", GREEN)
    _save(tmp_path / "img" / "c.png", RED)
    # Names reworded but the indices are the model's: index 0 is the model's "red thing" for the dataset too.
    path = _csv(tmp_path / "labels.csv", "file,class_index,name",
                ["img/a.png,0,red thing", "img/b.png,1,green thing", "img/c.png,7,something else"])
    report = evaluate(classifier, path)
    assert report.match == "index" and (report.known, report.other) == (2, 1) and report.top1 == 1.0
    assert evaluate(classifier, path, match="name").match == "name"


def test_a_csv_numbered_in_its_own_order_is_matched_by_name(classifier, tmp_path: Path):
    _save(tmp_path / "img" / "a.png", RED)
    _save(tmp_path / "img" / "b.png", GREEN)
    # As birds100 against an ImageNet model: index 0 is the dataset's first class, not the model's class 0.
    path = _csv(tmp_path / "labels.csv", "file,species,class_index", ["img/a.png,Green_Thing,0", "img/b.png,Red_Thing,1"])
    report = evaluate(classifier, path)
    assert report.match == "name" and report.known == 2 and report.top1 == 0.0
    assert evaluate(classifier, path, match="index").top1 == 1.0  # asked for, the indices are taken as they are


def test_a_folder_holding_a_labels_csv_is_read_through_it(tmp_path: Path):
    _save(tmp_path / "images" / "Red" / "a.png", RED)
    _csv(tmp_path / "labels.csv", "file,animal,domain", ["images/Red/a.png,red thing,photo"])
    data = load_dataset(tmp_path)
    assert data.names == ("red thing",) and data.items == (str(tmp_path / "images" / "Red" / "a.png"),)
    assert load_dataset(tmp_path / "labels.csv", label_column="domain").names == ("photo",)


def test_images_that_fail_are_counted_apart(classifier, tree: Path):
    (tree / "red_thing" / "broken.png").write_bytes(b"not an image")
    report = evaluate(classifier, tree)
    assert (report.images, report.evaluated, len(report.errors)) == (10, 9, 1)
    assert report.errors[0]["file"].endswith("broken.png") and report.errors[0]["code"]
    assert report.top1 == pytest.approx(5 / 6)


def test_any_predictor_with_labels_can_be_evaluated(classifier, tree: Path):
    calls = []

    def predictor(images):
        calls.append(len(images))
        return classifier.predict_batch(images, top_k=5)

    data = load_dataset(tree)
    report = evaluate(predictor, data, labels=classifier.labels, batch_size=4)
    assert calls == [4, 4, 1] and report.top1 == pytest.approx(5 / 6)
    pairs = Dataset.from_pairs([(item, name) for item, name in zip(data.items, data.names)])
    assert evaluate(classifier, pairs).top1 == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="labels="):
        evaluate(predictor, data)


@pytest.mark.parametrize("header, rows, message", [
    ("name,species", ["a,b"], "no file column"),
    ("file,colour", ["a.png,red"], "no class column"),
    ("file,class_index", ["a.png,x"], "class_index must be an integer"),
    ("file,species", [], "no rows"),
])
def test_unusable_csvs_are_a_dataset_error(tmp_path: Path, header: str, rows: list[str], message: str):
    with pytest.raises(DatasetError, match=message):
        load_dataset(_csv(tmp_path / "labels.csv", header, rows))


def test_missing_and_empty_datasets_are_a_dataset_error(tmp_path: Path):
    with pytest.raises(DatasetError, match="no such dataset"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty" / "a-class").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(tmp_path / "empty")


# --- the command ----------------------------------------------------------------------------------------------


def test_cli_prints_the_report_and_its_json(capsys, bundle: Path, tree: Path):
    rc = main(["evaluate", str(tree), "--model", str(bundle), "--progress", "off"])
    out, err = capsys.readouterr()
    assert rc == 0 and "top-1        0.833" in out and "red_thing" in out, err
    rc = main(["evaluate", str(tree), "--model", str(bundle), "--json", "--thresholds", "0.25,0.75"])
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert rc == 0 and data["top1"] == pytest.approx(5 / 6) and [p["threshold"] for p in data["sweep"]] == [0.25, 0.75]


def test_cli_errors_are_one_line(capsys, bundle: Path, tmp_path: Path, tree: Path):
    rc = main(["evaluate", str(tmp_path / "nowhere"), "--model", str(bundle)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("speciesclf: error: ") and "no such dataset" in err
    rc = main(["evaluate", str(tree), "--model", str(bundle), "--thresholds", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and "--thresholds" in err and len(err.strip().splitlines()) == 1


# --- the shared photos -----------------------------------------------------------------------------------------


def test_imagenet1k_on_the_shared_photos(capsys, shared_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SPECIESCLF_WEIGHTS", str(shared_dir / "models"))
    labels = shared_dir / "images" / "imagenet-samples" / "labels.csv"
    rc = main(["evaluate", str(labels), "--model", "imagenet1k", "--json", "--progress", "off"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert rc == 0, err
    assert report["match"] == "index" and report["known"] == 419  # the photos' class_index is ImageNet's
    assert report["top1"] == pytest.approx(0.84, abs=0.01)  # the README's 0.840
    assert report["top5"] > report["top1"] and report["unknown_rate"] == 0.0


def test_species100_on_the_shared_photos(species100, shared_dir: Path):
    report = evaluate(species100, shared_dir / "images" / "imagenet-samples")
    # Its classes keep ImageNet's output indices (some reworded: "common ostrich"), so index matching is chosen.
    assert report.match == "index" and report.known == 67 and report.other == 352
    assert report.unknown_rate_other > 0.9 and report.unknown_rate_known < 0.1
    assert report.rule == ("subset_mass", 0.5)
