"""The capture store after a crash and on a full disk, in subprocesses: kill -9 under load leaves a database
that opens and checks out, no torn record, every named image present, at most about a second lost; a file
size limit (RLIMIT_FSIZE) turns capture off with one log line while predictions go on."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from speciesclf.capture import SqliteCaptureStore, prediction_id_time

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="kill -9 and RLIMIT_FSIZE are POSIX")

WRITER = textwrap.dedent("""
    import io, os, sys, time
    import numpy as np
    from PIL import Image
    from speciesclf import Prediction
    from speciesclf.capture import CapturePolicy, SqliteCaptureStore

    root = sys.argv[1]
    images = []
    for seed in range(400):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    store = SqliteCaptureStore(root, policy=CapturePolicy(sample_rate=1.0, consent="assumed"))
    embedding = np.random.default_rng(0).standard_normal(1280).astype(np.float32)
    out = os.fdopen(1, "w", buffering=1)
    out.write("ready\\n")
    i = 0
    while True:
        p = Prediction(label="tench", score=0.9, index=0, top_k=[("tench", 0.9), ("goldfish", 0.05)], unknown=False,
                       model="species100@1.0.0", timings={"inference_ms": 1.0}, guess="tench", embedding=embedding)
        pid = store.capture(p, images[i % len(images)], metadata={"i": i})
        if pid is not None:
            out.write(pid + "\\n")
        i += 1
        if i % 4 == 0:
            time.sleep(0.001)  # a busy service's pace: about 2000 captures a second
""")


def test_kill_9_under_load_loses_at_most_the_last_second(tmp_path) -> None:
    root = tmp_path / "capture"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        ids: list[str] = []
        deadline = time.monotonic() + 30
        # Kill it mid-stream, after a couple of seconds of load and with records committed.
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, "the writer died on its own"
            ids.append(line.strip())
            if len(ids) >= 4000 and prediction_id_time(ids[-1]) - prediction_id_time(ids[0]) > 2.0:
                break
        os.kill(child.pid, signal.SIGKILL)
        killed_at = time.time()
        ids.extend(line.strip() for line in child.stdout if line.strip())
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    with sqlite3.connect(root / "records.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with SqliteCaptureStore(root) as store:
        kept = {r["prediction_id"]: r for r in store._iter_records()}
        assert kept
        for record in kept.values():  # every record whole: its JSON parses, its image is there
            assert record["top_k"] == [("tench", pytest.approx(0.9)), ("goldfish", pytest.approx(0.05))]
            assert record["metadata"]["i"] >= 0
            assert record["image"] is not None and store.image_path(record["prediction_id"]).is_file()
        assert all(store.get(pid)["embedding"].shape == (1280,) for pid in list(kept)[-5:])
        lost = [pid for pid in ids if pid not in kept]
        assert not set(kept) - set(ids)
        # what was lost is the tail: nothing captured more than about a second before the kill
        assert all(prediction_id_time(pid) > killed_at - 1.2 for pid in lost), (len(lost), len(ids))
        known = {p for p in store.images_dir.rglob("*") if p.is_file()}
        named = {store.image_path(pid) for pid in kept}
        assert named <= known
        store.purge(now=time.time() + 120)  # past the orphan grace period
        after = {p for p in store.images_dir.rglob("*") if p.is_file()}
        assert after == named  # orphans (written, never committed) and staging files are gone
        print(f"\nkill -9: {len(ids)} captured, {len(kept)} kept, {len(lost)} lost in the last "
              f"{killed_at - min((prediction_id_time(p) for p in lost), default=killed_at):.2f} s")


FULL_DISK = textwrap.dedent("""
    import io, json, logging, resource, signal, sys
    import numpy as np
    from speciesclf import Prediction
    from speciesclf.capture import CapturePolicy, SqliteCaptureStore

    logging.basicConfig(stream=sys.stderr, level=logging.ERROR, format="%(name)s %(levelname)s %(message)s")
    store = SqliteCaptureStore(sys.argv[1], policy=CapturePolicy(sample_rate=1.0, consent="assumed"),
                               flush_interval_s=0.02)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
    limit = 512 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    embedding = np.ones(1280, np.float32)
    answered = 0
    for i in range(3000):
        p = Prediction(label="tench", score=0.9, index=0, top_k=[("tench", 0.9)], unknown=False, model="m@1.0.0",
                       timings={}, guess="tench", embedding=embedding)
        store.capture(p, None, metadata={"i": i})  # the prediction is answered whatever capture does
        answered += 1
        if i % 100 == 0:
            store.flush()
    store.flush()
    stats = store.stats()
    store.close()
    print(json.dumps({"answered": answered, **stats}))
""")


def test_a_file_size_limit_turns_capture_off_and_predictions_go_on(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "capture")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["answered"] == 3000
    assert not stats["enabled"] and stats["write_errors"] == 1 and stats["skipped"] > 0
    assert 0 < stats["records"] < 3000
    errors = [line for line in result.stderr.splitlines() if line.startswith("speciesclf.capture ERROR")]
    assert len(errors) == 1 and "capture turned off" in errors[0], result.stderr
    # the database is whole after the failed write
    with sqlite3.connect(tmp_path / "capture" / "records.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
