"""The capture store (speciesclf.capture): records, content-addressed images, the writer off the hot path,
consent, retention, erasure, queries, feedback and its trust order, export, and failures of the disk and
the database."""

from __future__ import annotations

import errno
import io
import logging
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from speciesclf import Prediction
from speciesclf.bundles.bundle import read_labels
from speciesclf.capture import (CaptureDatabaseError, CapturePolicy, FeedbackNotFound, InvalidFeedbackLabel,
                                SqliteCaptureStore, new_prediction_id, prediction_id_time)
from speciesclf.capture.feedback import resolve_label, resolved
from speciesclf.errors import CodedError, error_code, error_status

LABELS_TSV = Path(__file__).resolve().parent.parent / "python" / "speciesclf" / "model" / "labels" / "species100.tsv"
LABELS = [("tench", "Tinca tinca"), ("goldfish", "Carassius auratus"), ("great white shark", "Carcharodon carcharias"),
          ("red fox", "Vulpes vulpes")]
ALL = CapturePolicy(sample_rate=1.0, consent="assumed")


def prediction(label="tench", *, score=0.9, unknown=False, model="species100@1.0.0", arm=None, embedding=None,
               error=None) -> Prediction:
    guess = label
    return Prediction(label=None if unknown else label, score=score, index=0, top_k=[(guess, score), ("goldfish", 0.05)],
                      unknown=unknown, model=model, timings={"inference_ms": 1.5}, guess=guess,
                      open_set_score=0.4 if unknown else 0.9, arm=arm, embedding=embedding, error=error)


def jpeg(seed: int, size=(24, 16), exif: Image.Exif | None = None) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **({"exif": exif} if exif is not None else {}))
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path):
    s = SqliteCaptureStore(tmp_path / "capture", policy=ALL, labels=LABELS, flush_interval_s=0.02)
    yield s
    s.close()


def images_on_disk(store) -> list[Path]:
    return [p for p in store.images_dir.rglob("*") if p.is_file()]


# -- ids and policy ---------------------------------------------------------------------------------------

def test_prediction_ids_sort_by_time_and_increase_within_a_millisecond() -> None:
    ids = [new_prediction_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == 2000 and all(len(i) == 26 for i in ids)
    assert abs(prediction_id_time(ids[-1]) - time.time()) < 1.0
    assert new_prediction_id(now=1000.0) < new_prediction_id(now=1000.002)


def test_the_policy_says_why_and_samples_the_rest() -> None:
    policy = CapturePolicy(sample_rate=0.0)
    assert policy.reason(prediction(unknown=True)) == "unknown"
    assert policy.reason(prediction(score=0.3)) == "low_confidence"
    assert policy.reason(prediction(), disagreement=True) == "disagreement"
    from speciesclf.errors import DecodeError
    assert policy.reason(prediction(error=DecodeError("bad"))) == "error"
    assert policy.reason(prediction()) is None
    assert CapturePolicy(sample_rate=1.0).reason(prediction()) == "sample"
    import random
    rng = random.Random(1)
    sampled = sum(CapturePolicy(sample_rate=0.1).reason(prediction(), rng=rng) == "sample" for _ in range(5000))
    assert 400 < sampled < 600
    assert not policy.consents(None) and CapturePolicy(consent="assumed").consents(None) and not ALL.consents(False)
    with pytest.raises(ValueError, match="sample_rate"):
        CapturePolicy(sample_rate=1.5)
    with pytest.raises(ValueError, match="consent"):
        CapturePolicy(consent="maybe")  # type: ignore[arg-type]


# -- records and images -----------------------------------------------------------------------------------

def test_a_real_prediction_is_stored_with_its_image_once_and_its_embedding(species100, sample_photos, tmp_path) -> None:
    photo = sample_photos[0].read_bytes()
    p = species100.predict(photo, return_embedding=True)
    with SqliteCaptureStore(tmp_path / "c", policy=ALL) as store:
        first = store.capture(p, photo, request_id="req-1", metadata={"camera": "trap 4"}, subject="alice")
        second = store.capture(p, photo)
        assert store.flush(timeout=10)
        record = store.get(first)
        assert record["model"] + "@" + record["version"] == p.model
        assert record["label"] == p.label and record["score"] == pytest.approx(p.score)
        assert record["top_k"] == [(name, pytest.approx(score)) for name, score in p.top_k]
        assert record["timings"] == pytest.approx(p.timings)
        assert record["reason"] == "sample" and record["consent"] and record["request_id"] == "req-1"
        assert record["metadata"] == {"camera": "trap 4"} and record["subject"] == "alice"
        with Image.open(io.BytesIO(photo)) as sent:
            assert record["image"]["format"] == "jpeg" and (record["image"]["width"], record["image"]["height"]) == sent.size
        assert record["source_bytes"] == len(photo)
        # float16: about 3 significant digits of the 1280 features
        assert record["embedding"].shape == p.embedding.shape
        np.testing.assert_allclose(record["embedding"], p.embedding, rtol=2e-3, atol=1e-3)
        assert store.image_path(first) == store.image_path(second)  # content-addressed: stored once
        assert store.stats()["images"] == 1 and len(images_on_disk(store)) == 1
        # pixels as sent (the stripping keeps them)
        with Image.open(store.image_path(first)) as kept, Image.open(io.BytesIO(photo)) as sent:
            assert np.array_equal(np.asarray(kept), np.asarray(sent))


def test_stored_images_carry_no_metadata(store) -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x0112] = 6  # orientation: kept in the record, not in the file
    data = jpeg(1, exif=exif)
    assert b"SecretCam" in data
    pid = store.capture(prediction(), data)
    store.flush()
    stored = store.image_path(pid).read_bytes()
    assert b"SecretCam" not in stored and b"Exif" not in stored
    assert store.get(pid)["image"]["orientation"] == 6


def test_without_consent_only_the_numbers_are_stored(tmp_path) -> None:
    with SqliteCaptureStore(tmp_path / "c", policy=CapturePolicy(sample_rate=1.0)) as store:
        pid = store.capture(prediction(embedding=np.ones(8, np.float32)), jpeg(2), metadata={"a": 1},
                            subject="bob", location=(51.5, -0.12))
        given = store.capture(prediction(), jpeg(3), consent=True)
        store.flush()
        record = store.get(pid)
        assert record["label"] == "tench" and not record["consent"]
        assert (record["image"], record["source_sha256"], record["embedding"], record["metadata"], record["subject"],
                record["location"]) == (None, None, None, None, None, None)
        assert store.image_path(pid) is None and store.image_path(given) is not None
        assert store.stats()["not_consented"] == 1


def test_an_undecodable_image_keeps_its_sha256_and_size_only(store) -> None:
    from speciesclf.errors import DecodeError
    broken = jpeg(4)[:60]
    pid = store.capture(prediction(error=DecodeError("truncated")), broken)
    store.flush()
    record = store.get(pid)
    assert record["reason"] == "error" and record["error"]["code"] == "decode_error"
    assert record["image"] is None and record["source_bytes"] == 60 and len(record["source_sha256"]) == 64
    assert record["image_error"]


def test_locations_are_coarsened_and_withheld_for_sensitive_species(tmp_path) -> None:
    with SqliteCaptureStore(tmp_path / "c", policy=ALL, labels=LABELS, sensitive_labels={"Red Fox"},
                            location_grid_km=10) as store:
        plain = store.capture(prediction(), jpeg(5), location=(51.50731, -0.12765))
        sensitive = store.capture(prediction("red fox"), jpeg(6), location=(51.50731, -0.12765))
        later = store.capture(prediction(), jpeg(7), location=(51.50731, -0.12765))
        store.flush()
        lat, lon = store.get(plain)["location"]
        assert (lat, lon) != (51.50731, -0.12765) and abs(lat - 51.50731) < 0.1 and abs(lon + 0.12765) < 0.2
        assert store.get(sensitive)["location"] is None
        store.add_feedback(later, "Vulpes vulpes", source="expert")  # a person says it is the sensitive one
        assert store.get(later)["location"] is None
        with pytest.raises(CodedError) as e:
            store.capture(prediction(), None, location=(95.0, 0.0))
        assert error_status(e.value) == 422


def test_client_metadata_is_small_and_validated(store) -> None:
    for bad in ({f"k{i}": 1 for i in range(17)}, {"k": "x" * 257}, {"k": [1, 2]}, {"": 1}, {"k": float("nan")}):
        with pytest.raises(CodedError) as e:
            store.capture(prediction(), None, metadata=bad)
        assert (error_code(e.value), error_status(e.value)) == ("invalid_request", 422)
    with pytest.raises(CodedError):
        store.capture(prediction(), None, subject="line\nbreak")


# -- off the hot path -------------------------------------------------------------------------------------

def test_a_full_queue_drops_and_counts_without_waiting(tmp_path) -> None:
    with SqliteCaptureStore(tmp_path / "c", policy=ALL, queue_size=4, batch_size=1) as store:
        release = threading.Event()
        real_write = store._write

        def stuck(batch):
            release.wait(10)
            real_write(batch)

        store._write = stuck
        start = time.perf_counter()
        ids = [store.capture(prediction(), None) for _ in range(50)]
        elapsed = time.perf_counter() - start
        assert elapsed < 0.5  # 50 captures against a stuck writer: none waited for it
        kept = [i for i in ids if i is not None]
        assert 4 <= len(kept) <= 5 and store.stats()["dropped"] == 50 - len(kept)
        release.set()
        assert store.flush(timeout=10)
        assert store.stats()["records"] == len(kept)


def test_close_flushes_what_was_queued(tmp_path) -> None:
    store = SqliteCaptureStore(tmp_path / "c", policy=ALL, flush_interval_s=5.0, batch_size=10000)
    ids = [store.capture(prediction(), jpeg(i)) for i in range(300)]
    store.close()
    store.close()  # idempotent
    assert store.capture(prediction(), None) is None  # closed: refused, not raised
    with SqliteCaptureStore(tmp_path / "c") as again:
        assert again.stats()["records"] == 300 and again.get(ids[-1]) is not None


def test_a_full_disk_turns_capture_off_with_one_log_line(tmp_path, caplog) -> None:
    with SqliteCaptureStore(tmp_path / "c", policy=ALL, flush_interval_s=0.02) as store:
        def full(data, dirs):
            raise OSError(errno.ENOSPC, "No space left on device")

        store._store_image = full
        with caplog.at_level(logging.ERROR, logger="speciesclf.capture"):
            for i in range(5):
                store.capture(prediction(), jpeg(i))
                store.flush()
            assert store.capture(prediction(), jpeg(9)) is None  # off: predictions go on, nothing is queued
        errors = [r for r in caplog.records if r.name == "speciesclf.capture" and r.levelno == logging.ERROR]
        assert len(errors) == 1 and "disk full" in errors[0].getMessage()
        stats = store.stats()
        assert not stats["enabled"] and stats["write_errors"] == 1 and stats["records"] == 0 and stats["skipped"] >= 1
        store._store_image = SqliteCaptureStore._store_image.__get__(store)
        store.resume()
        assert store.capture(prediction(), jpeg(10)) is not None and store.flush() and store.stats()["records"] == 1


def test_a_corrupt_database_is_a_clear_typed_error(tmp_path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    (root / "records.sqlite3").write_bytes(b"this is not a database" * 200)
    with pytest.raises(CaptureDatabaseError, match="records.sqlite3.*damaged or not a SQLite database") as e:
        SqliteCaptureStore(root)
    assert (error_code(e.value), error_status(e.value)) == ("capture_error", 500)
    # a real database with a damaged page
    other = tmp_path / "d"
    with SqliteCaptureStore(other, policy=ALL) as store:
        for i in range(2000):
            store.capture(prediction(), None, metadata={"n": i})
    path = other / "records.sqlite3"
    data = bytearray(path.read_bytes())
    data[4096 * 3:4096 * 3 + 2000] = b"\xff" * 2000
    path.write_bytes(bytes(data))
    with pytest.raises(CaptureDatabaseError):
        SqliteCaptureStore(other)


# -- queries ----------------------------------------------------------------------------------------------

def test_queries_filter_and_page_by_id(store) -> None:
    now = time.time()
    ids = {}
    for i in range(30):
        p = prediction("tench" if i % 3 else "goldfish", unknown=i % 5 == 0, arm="candidate" if i % 2 else "primary",
                       model="species100@2.0.0" if i >= 20 else "species100@1.0.0")
        ids[i] = store.capture(p, None, prediction_id=new_prediction_id(now=now - 3600 * (30 - i)))
    store.flush()
    assert [r["prediction_id"] for r in store.query(limit=100)] == [ids[i] for i in range(30)]
    assert len(store.query(since=now - 3600 * 10.5)) == 10
    assert len(store.query(until=now - 3600 * 25.5)) == 5
    assert {r["version"] for r in store.query(version="2.0.0")} == {"2.0.0"} and len(store.query(version="species100@2.0.0")) == 10
    assert all(r["arm"] == "candidate" for r in store.query(arm="candidate")) and len(store.query(arm="candidate")) == 15
    assert len(store.query(label="goldfish")) == 8  # the 10 with i % 3 == 0 less the unknown ones (0, 15)
    assert [r["prediction_id"] for r in store.query(unknown=True)] == [ids[i] for i in range(0, 30, 5)]
    store.add_feedback(ids[5], "goldfish")
    assert [r["prediction_id"] for r in store.query(unknown=True, has_feedback=False)] == [ids[i] for i in (0, 10, 15, 20, 25)]
    assert [r["prediction_id"] for r in store.query(has_feedback=True)] == [ids[5]]
    pages, after = [], None
    while page := store.query(limit=7, after_id=after):
        pages.append(page)
        after = page[-1]["prediction_id"]
    assert [len(p) for p in pages] == [7, 7, 7, 7, 2]
    assert [r["prediction_id"] for p in pages for r in p] == [ids[i] for i in range(30)]
    with pytest.raises(ValueError, match="limit"):
        store.query(limit=0)


# -- feedback ---------------------------------------------------------------------------------------------

def test_feedback_labels_resolve_by_name_and_trust() -> None:
    assert resolve_label("  Great White SHARK ", LABELS) == "great white shark"
    assert resolve_label("carcharodon carcharias", LABELS) == "great white shark"
    assert resolve_label("not_an_animal", LABELS) == "not_an_animal"
    with pytest.raises(InvalidFeedbackLabel) as e:
        resolve_label("goldfsh", LABELS)
    assert e.value.closest[0] == "goldfish" and "closest: goldfish" in str(e.value)
    assert (error_code(e.value), error_status(e.value)) == ("invalid_label", 422)
    entries = [{"id": 1, "label": "a", "source": "expert", "time": 1.0}, {"id": 2, "label": "b", "source": "user", "time": 2.0},
               {"id": 3, "label": "c", "source": "reviewer", "time": 3.0}]
    assert resolved(entries) == "a" and resolved([]) is None
    # with the real label table, scientific names included
    labels = read_labels(LABELS_TSV)
    assert resolve_label("VULPES VULPES", labels) == "red fox"


def test_feedback_keeps_every_label_and_the_most_trusted_latest_wins(store) -> None:
    pid = store.capture(prediction("tench"), None)
    store.flush()
    assert store.add_feedback(pid, "Goldfish", source="user")["resolved_label"] == "goldfish"
    assert store.add_feedback(pid, "tench", source="expert", comment="fins")["resolved_label"] == "tench"
    assert store.add_feedback(pid, "goldfish", source="user")["resolved_label"] == "tench"  # a user after an expert
    assert store.add_feedback(pid, "unknown_species", source="expert")["resolved_label"] == "unknown_species"
    record = store.get(pid)
    assert [(f["label"], f["source"]) for f in record["feedback"]] == [
        ("goldfish", "user"), ("tench", "expert"), ("goldfish", "user"), ("unknown_species", "expert")]
    assert record["feedback"][1]["comment"] == "fins" and record["feedback_label"] == "unknown_species"
    with pytest.raises(FeedbackNotFound) as e:
        store.add_feedback(new_prediction_id(), "tench")
    assert (error_code(e.value), error_status(e.value)) == ("prediction_not_found", 404)
    with pytest.raises(InvalidFeedbackLabel, match="source"):
        store.add_feedback(pid, "tench", source="admin")
    with pytest.raises(InvalidFeedbackLabel):
        store.add_feedback(pid, "salmon")
    assert len(store.get(pid)["feedback"]) == 4  # the refused ones left nothing


def test_feedback_accuracy_per_version_and_arm(store) -> None:
    truth = [("tench", "tench", "primary"), ("tench", "goldfish", "primary"), ("goldfish", "goldfish", "candidate"),
             (None, "not_an_animal", "candidate")]
    for model_label, person, arm in truth:
        p = prediction(model_label or "tench", unknown=model_label is None, arm=arm)
        pid = store.capture(p, None)
        store.flush()
        store.add_feedback(pid, person, source="reviewer")
    store.capture(prediction(), None)  # no feedback: not counted
    store.flush()
    assert store.feedback_accuracy() == {"labelled": 4, "correct": 3, "accuracy": 0.75}
    assert store.feedback_accuracy(arm="primary")["accuracy"] == 0.5
    assert store.feedback_accuracy(arm="candidate", version="species100@1.0.0")["accuracy"] == 1.0
    assert store.feedback_accuracy(version="9.9.9") == {"labelled": 0, "correct": 0, "accuracy": None}


# -- retention and erasure --------------------------------------------------------------------------------

def test_erasure_by_prediction_id_and_by_subject(store) -> None:
    shared_image = jpeg(20)
    a = store.capture(prediction(embedding=np.ones(4, np.float32)), shared_image, subject="alice")
    b = store.capture(prediction(), jpeg(21), subject="alice")
    c = store.capture(prediction(), shared_image, subject="carol")  # the same bytes from someone else
    d = store.capture(prediction(), jpeg(22))
    store.flush()
    store.add_feedback(a, "goldfish")
    store.add_feedback(b, "goldfish")
    assert store.erase(subject="alice") == {"records": 2, "feedback": 2, "images": 1}
    assert store.get(a) is None and store.get(b) is None
    assert store.image_path(c).exists()  # still named by carol's record
    assert store.erase(prediction_id=c) == {"records": 1, "feedback": 0, "images": 1}
    assert len(images_on_disk(store)) == 1 and store.get(d) is not None
    with sqlite3.connect(store.db_path) as db:
        assert db.execute("SELECT count(*) FROM feedback").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM records WHERE subject IS NOT NULL").fetchone()[0] == 0
    assert b"alice" not in store.db_path.read_bytes()  # secure_delete + checkpoint: no copy left in the file
    with pytest.raises(TypeError):
        store.erase()


def test_a_purge_enforces_age_and_bytes_and_removes_orphans(tmp_path) -> None:
    now = time.time()
    with SqliteCaptureStore(tmp_path / "c", policy=ALL, max_age_s=86400, labels=LABELS) as store:
        old = store.capture(prediction(), jpeg(30), prediction_id=new_prediction_id(now=now - 2 * 86400))
        new = store.capture(prediction(), jpeg(31))
        store.flush()
        store.add_feedback(old, "goldfish")
        orphan = store.images_dir / "ab" / ("c" * 62)
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"left by a crash")
        assert store.purge(now=now) == {"records": 1, "feedback": 1, "images": 1, "orphans": 0}  # orphan too young
        assert store.get(old) is None and store.get(new) is not None and orphan.exists()
        assert store.purge(now=now + 120)["orphans"] == 1 and not orphan.exists()
        assert store.image_path(new).exists()  # a named image is never an orphan
    with SqliteCaptureStore(tmp_path / "b", policy=ALL, max_bytes=200_000) as store:
        ids = [store.capture(prediction(), jpeg(100 + i, size=(128, 128))) for i in range(60)]
        store.flush()
        before = store.stats()["bytes"]
        assert before > 200_000
        result = store.purge()
        after = store.stats()
        assert after["bytes"] <= 200_000 and result["records"] > 0 and after["records"] == 60 - result["records"]
        assert store.get(ids[0]) is None and store.get(ids[-1]) is not None  # the oldest went first
        assert len(images_on_disk(store)) == after["images"]


# -- export -----------------------------------------------------------------------------------------------

def test_export_imagefolder_applies_orientation_and_parquet_holds_feedback(store, tmp_path) -> None:
    pytest.importorskip("pyarrow")  # the test extra installs it; without it this is a broken setup, not a pass
    import pyarrow.parquet as pq

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    turned = store.capture(prediction(embedding=np.arange(4, dtype=np.float32)), jpeg(40, size=(24, 16), exif=exif))
    plain = store.capture(prediction(), jpeg(41))
    unlabelled = store.capture(prediction(), jpeg(42))
    special = store.capture(prediction(), jpeg(43))
    store.flush()
    store.add_feedback(turned, "goldfish")
    store.add_feedback(plain, "Tinca tinca")
    store.add_feedback(special, "not_an_animal")
    out = tmp_path / "folder"
    assert store.export_imagefolder(out) == {"images": 2, "skipped": 2}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*")) == sorted(
        [f"goldfish/{turned}.png", f"tench/{plain}.jpg"])
    with Image.open(out / "goldfish" / f"{turned}.png") as shown:
        assert shown.size == (16, 24)  # shown the right way up
    assert (out / "tench" / f"{plain}.jpg").read_bytes() == store.image_path(plain).read_bytes()
    assert store.export_imagefolder(tmp_path / "all", labels="model")["images"] == 3  # unlabelled: the model's
    assert store.export_parquet(tmp_path / "x.parquet") == 4
    table = pq.read_table(tmp_path / "x.parquet").to_pylist()
    by_id = {row["prediction_id"]: row for row in table}
    assert by_id[turned]["feedback_label"] == "goldfish" and by_id[turned]["feedback"][0]["source"] == "user"
    assert by_id[turned]["embedding"] == [0.0, 1.0, 2.0, 3.0] and by_id[turned]["orientation"] == 6
    assert by_id[unlabelled]["feedback"] == [] and by_id[plain]["top_k"][0] == {"label": "tench", "score": 0.9}
    assert (store.root / by_id[plain]["image_path"]).exists() and "subject" not in by_id[plain]


# -- scale ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_100k_records_query_speed_and_bytes_per_record(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    now = time.time()
    with SqliteCaptureStore(tmp_path / "c", policy=ALL, queue_size=200_000, batch_size=2000, labels=LABELS) as store:
        span = 7 * 86400
        times = np.sort(now - rng.uniform(0, span, 100_000))
        for i, t in enumerate(times):
            unknown = rng.random() < 0.1
            store.capture(prediction(LABELS[i % 4][0], unknown=bool(unknown), score=float(rng.uniform(0.5, 1))),
                          None, prediction_id=new_prediction_id(now=float(t)), request_id=f"r{i}")
        assert store.flush(timeout=120)
        stats = store.stats()
        assert stats["records"] == 100_000
        for pid in [r["prediction_id"] for r in store.query(since=now - 86400, unknown=True, limit=50)]:
            store.add_feedback(pid, "tench")
        timings = []
        for _ in range(20):
            start = time.perf_counter()
            page = store.query(since=now - 86400, unknown=True, has_feedback=False, limit=100)
            timings.append((time.perf_counter() - start) * 1000)
        assert len(page) == 100 and all(r["unknown"] and not r["has_feedback"] for r in page)
        per_record = stats["database_bytes"] / stats["records"]
        with capsys.disabled():
            print(f"\n100k records: {per_record:.0f} bytes/record (no image or embedding), "
                  f"unlabelled unknowns of the last 24 h: median {sorted(timings)[10]:.2f} ms, max {max(timings):.2f} ms")
        assert sorted(timings)[10] < 50
