"""`speciesclf capture stats|query|export|purge|erase` on a capture folder filled through the library
(synthetic predictions, small real JPEGs): what each prints, the filters, the exports, retention with sizes
and durations, erasure, and the errors a person meets (a usage error exits 2, any other error is one line
and exits 1)."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from speciesclf import Prediction
from speciesclf.capture import CapturePolicy, SqliteCaptureStore, new_prediction_id
from speciesclf.cli import main

LABELS = [("tench", "Tinca tinca"), ("goldfish", "Carassius auratus"), ("red fox", "Vulpes vulpes")]
DAY = 86400.0


def _prediction(label: str = "tench", *, unknown: bool = False, version: str = "1.0.0", arm: str | None = None,
                embedding=None) -> Prediction:
    return Prediction(label=None if unknown else label, score=0.9, index=0, top_k=[(label, 0.9), ("goldfish", 0.05)],
                      unknown=unknown, model=f"species100@{version}", timings={"inference_ms": 1.5}, guess=label,
                      open_set_score=0.3 if unknown else 0.9, arm=arm, embedding=embedding)


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> dict:
    """Six records: an old one (40 days), unknowns, two versions and arms, feedback on two, two subjects."""
    root = tmp_path / "capture"
    store = SqliteCaptureStore(root, policy=CapturePolicy(sample_rate=1.0, consent="assumed"), labels=LABELS,
                               flush_interval_s=0.02)
    now = time.time()
    made = [
        ("old", _prediction("tench"), new_prediction_id(now - 40 * DAY), "alice"),
        ("fox", _prediction("red fox", version="1.1.0", arm="candidate"), new_prediction_id(now - 3 * DAY), "bob"),
        ("unknown_old", _prediction("tench", unknown=True), new_prediction_id(now - 2 * DAY), "bob"),
        ("tench", _prediction("tench", embedding=np.ones(8, np.float32)), new_prediction_id(now - 3600), "alice"),
        ("unknown_new", _prediction("goldfish", unknown=True), new_prediction_id(now - 60), "bob"),
        ("labelled_unknown", _prediction("goldfish", unknown=True), new_prediction_id(now - 30), "carol"),
    ]
    ids = {}
    for seed, (name, p, pid, subject) in enumerate(made):
        ids[name] = store.capture(p, _jpeg(seed), prediction_id=pid, subject=subject)
    assert store.flush(10)
    store.add_feedback(ids["tench"], "Tinca tinca", source="user")
    store.add_feedback(ids["labelled_unknown"], "goldfish", source="expert")
    store.close()
    return {"root": root, "ids": ids}


def _run(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str, str]:
    rc = main(["capture", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _usage_error(capsys: pytest.CaptureFixture, *args: str | Path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["capture", *map(str, args)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("speciesclf: error: "), err
    return lines[0]


def _ids(out: str) -> list[str]:
    return [json.loads(line)["prediction_id"] for line in out.splitlines()]


def test_stats_as_text_and_json(capsys, folder) -> None:
    rc, out, _ = _run(capsys, "stats", folder["root"], "--json")
    assert rc == 0
    numbers = json.loads(out)
    assert numbers["records"] == 6 and numbers["records_with_image"] == 6 and numbers["images"] == 6
    assert numbers["unknown"] == 3 and numbers["records_with_feedback"] == 2 and numbers["feedback"] == 2
    assert numbers["feedback_by_source"] == {"expert": 1, "user": 1}
    assert numbers["bytes"] == numbers["image_bytes"] + numbers["database_bytes"] > 6 * 300
    assert numbers["dropped"] is None  # counted by the capturing process, not kept in the folder
    rc, out, _ = _run(capsys, "stats", folder["root"])
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert rc == 0 and rows["records"] == "6" and rows["feedback_by_source"] == "expert 1, user 1"
    assert "not kept" in rows["dropped"]


def test_query_filters_and_paging(capsys, folder) -> None:
    ids = folder["ids"]
    rc, out, _ = _run(capsys, "query", folder["root"])
    assert rc == 0 and _ids(out) == list(ids.values())  # all, in time order
    record = json.loads(out.splitlines()[3])
    assert record["label"] == "tench" and record["feedback_label"] == "tench" and record["image"]["format"] == "jpeg"
    # the review queue: unlabelled unknowns of the last 24 h
    assert _ids(_run(capsys, "query", folder["root"], "--unknown", "--no-feedback", "--since", "24h")[1]) == \
        [ids["unknown_new"]]
    assert _ids(_run(capsys, "query", folder["root"], "--has-feedback")[1]) == [ids["tench"], ids["labelled_unknown"]]
    assert _ids(_run(capsys, "query", folder["root"], "--known", "--version", "1.1.0")[1]) == [ids["fox"]]
    assert _ids(_run(capsys, "query", folder["root"], "--arm", "candidate")[1]) == [ids["fox"]]
    assert _ids(_run(capsys, "query", folder["root"], "--label", "tench")[1]) == [ids["old"], ids["tench"]]
    iso_day = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 10 * DAY))
    assert _ids(_run(capsys, "query", folder["root"], "--until", iso_day)[1]) == [ids["old"]]
    assert _ids(_run(capsys, "query", folder["root"], "--since", iso_day + "+00:00", "--until", "1d")[1]) == \
        [ids["fox"], ids["unknown_old"]]
    first = _ids(_run(capsys, "query", folder["root"], "--limit", "4")[1])
    rest = _ids(_run(capsys, "query", folder["root"], "--after-id", first[-1])[1])
    assert first + rest == list(ids.values()) and len(first) == 4


def test_export_imagefolder_and_parquet(capsys, folder, tmp_path) -> None:
    rc, out, _ = _run(capsys, "export", folder["root"], "--out", tmp_path / "tree")
    assert rc == 0 and out.startswith("wrote 2 images")
    assert sorted(os.listdir(tmp_path / "tree")) == ["goldfish", "tench"]
    with Image.open(next((tmp_path / "tree" / "tench").iterdir())) as exported:
        assert exported.size == (24, 16)
    rc, out, _ = _run(capsys, "export", folder["root"], "--out", tmp_path / "model", "--labels", "model")
    assert rc == 0 and sorted(os.listdir(tmp_path / "model")) == ["goldfish", "red fox", "tench"]
    pq = pytest.importorskip("pyarrow.parquet")
    rc, out, _ = _run(capsys, "export", folder["root"], "--format", "parquet", "--out", tmp_path / "r.parquet",
                      "--since", "24h")
    assert rc == 0 and out.startswith("wrote 3 records")
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.num_rows == 3 and "embedding" in table.column_names and "subject" not in table.column_names
    _run(capsys, "export", folder["root"], "--format", "parquet", "--out", tmp_path / "n.parquet", "--no-embeddings")
    assert "embedding" not in pq.read_table(tmp_path / "n.parquet").column_names


def test_parquet_without_pyarrow_is_one_clear_line(capsys, folder, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    rc, out, err = _run(capsys, "export", folder["root"], "--format", "parquet", "--out", tmp_path / "r.parquet")
    assert rc == 1 and out == "" and "pip install 'speciesclf[capture]'" in _one_error_line(err)
    assert not (tmp_path / "r.parquet").exists()


def test_purge_by_age_and_size(capsys, folder) -> None:
    rc, out, _ = _run(capsys, "purge", folder["root"], "--retention", "30d")
    assert rc == 0 and out.startswith("removed 1 records, 0 feedback entries, 1 images")
    assert _ids(_run(capsys, "query", folder["root"], "--label", "tench")[1]) == [folder["ids"]["tench"]]
    before = json.loads(_run(capsys, "stats", folder["root"], "--json")[1])
    rc, out, _ = _run(capsys, "purge", folder["root"], "--max-bytes", f"{before['bytes'] - 1}")
    assert rc == 0 and not out.startswith("removed 0 records")
    after = json.loads(_run(capsys, "stats", folder["root"], "--json")[1])
    assert after["records"] < before["records"] and after["bytes"] <= before["bytes"] - 1
    # the newest records are the ones kept
    assert folder["ids"]["labelled_unknown"] in _ids(_run(capsys, "query", folder["root"])[1])


def test_purge_removes_orphan_images(capsys, folder) -> None:
    orphan = folder["root"] / "images" / "ff" / ("f" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"left by a crash")
    old = time.time() - 3600  # past the grace a second process would need to commit its batch
    os.utime(orphan, (old, old))
    rc, out, _ = _run(capsys, "purge", folder["root"])
    assert rc == 0 and out.rstrip().endswith("1 orphan files") and not orphan.exists()


def test_erase_by_id_and_subject(capsys, folder) -> None:
    ids = folder["ids"]
    rc, out, _ = _run(capsys, "erase", folder["root"], "--prediction-id", ids["tench"])
    assert rc == 0 and out.strip() == "erased 1 records, 1 feedback entries, 1 images"
    rc, out, _ = _run(capsys, "erase", folder["root"], "--subject", "bob")
    assert rc == 0 and out.strip() == "erased 3 records, 0 feedback entries, 3 images"
    assert _ids(_run(capsys, "query", folder["root"])[1]) == [ids["old"], ids["labelled_unknown"]]
    rc, out, err = _run(capsys, "erase", folder["root"], "--subject", "nobody")
    assert rc == 0 and out.startswith("erased 0 records") and "no record matched" in err


@pytest.mark.parametrize("args, words", [
    (("purge", "{root}", "--retention", "30x"), "expected a duration"),
    (("purge", "{root}", "--retention", "0d"), "expected a duration above 0"),
    (("purge", "{root}", "--max-bytes", "10 parsecs"), "expected a size"),
    (("purge", "{root}", "--max-bytes=-5GB"), "expected a size"),
    (("purge", "{root}", "--max-bytes", "0GB"), "expected a size above 0"),
    (("query", "{root}", "--since", "yesterday"), "expected an ISO time"),
    (("query", "{root}", "--limit", "0"), "expected an integer >= 1"),
    (("query", "{root}", "--limit", "20000"), "1..10000"),
    (("query", "{root}", "--unknown", "--known"), "not allowed with"),
    (("query", "{root}", "--after-id", "nope"), "expected a prediction id"),
    (("erase", "{root}"), "one of the arguments --prediction-id --subject is required"),
    (("erase", "{root}", "--prediction-id", "x", "--subject", "s"), "expected a prediction id"),
    (("export", "{root}"), "--out"),
    (("export", "{root}", "--format", "csv", "--out", "x"), "invalid choice"),
])
def test_usage_errors_exit_2(capsys, folder, args, words) -> None:
    err = _usage_error(capsys, *(a.format(root=folder["root"]) for a in args))
    assert words in err, err


def test_sizes_and_durations_parse() -> None:
    from speciesclf.cli import _capture_duration, _capture_size

    assert _capture_size("10GB") == 10**10 and _capture_size("2GiB") == 2 * 2**30 and _capture_size("1500") == 1500
    assert _capture_size("0.5 mb") == 500_000
    assert _capture_duration("30d") == 30 * DAY and _capture_duration("90m") == 5400 and _capture_duration("2w") == 14 * DAY


def test_errors_are_one_line(capsys, folder, tmp_path) -> None:
    rc, out, err = _run(capsys, "stats", tmp_path / "nowhere")
    assert rc == 1 and "not a capture folder" in _one_error_line(err)
    assert not (tmp_path / "nowhere").exists()  # a mistyped path is not made into an empty store
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "records.sqlite3").write_bytes(b"this is not a database" * 100)
    rc, out, err = _run(capsys, "query", damaged)
    assert rc == 1 and "damaged or not a SQLite database" in _one_error_line(err)
    (tmp_path / "file").write_text("x")
    rc, out, err = _run(capsys, "export", folder["root"], "--out", tmp_path / "file" / "tree", "--labels", "model")
    assert rc == 1 and _one_error_line(err)
