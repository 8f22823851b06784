"""Capture and feedback in the HTTP service (issue 14, "Service and CLI", "Bad input and faults"): a real
server on 127.0.0.1 with the real model and a capture store in a temporary folder.

prediction_id in the body and X-Prediction-Id; consent (no image without it; with it the stored image has no
metadata and the same pixels); feedback's token, errors, latest-most-trusted rule and rate limit; erasure
by subject and by id; a failing store never fails a prediction; a damaged database at start."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from serve_server import LiveServer, b64, jpeg  # noqa: E402

from speciesclf.capture import CaptureDatabaseError, new_prediction_id  # noqa: E402
from speciesclf.serve import ServeConfig, create_app  # noqa: E402

pytestmark = pytest.mark.shared

ADMIN = "capture-admin-token"
FEEDBACK = "capture-feedback-token"
DEADLINE_S = 20


def with_exif_gps(data: bytes) -> bytes:
    """``data`` re-saved with an EXIF block holding a GPS position and a camera serial."""
    image = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0xA431] = "SERIAL-12345"  # BodySerialNumber
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)}  # GPS IFD
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif, quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tokens")
    (folder / "admin").write_text(ADMIN + "\n")
    (folder / "feedback").write_text(FEEDBACK + "\n")
    return {"admin_token_file": str(folder / "admin"), "feedback_token_file": str(folder / "feedback")}


def capture_config(folder: Path, tokens: dict[str, str], **fields) -> ServeConfig:
    settings = dict(capture_dir=str(folder), capture_rate=1.0, feedback_burst=4, feedback_rate_per_s=0.01, **tokens)
    settings.update(fields)
    return ServeConfig(**settings)


@pytest.fixture(scope="module")
def server(species100, tokens, tmp_path_factory):
    app = create_app(species100, capture_config(tmp_path_factory.mktemp("capture"), tokens))
    with LiveServer(app) as live:
        yield live


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def admin(client: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    return client.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"}, **kwargs)


def feedback(client: httpx.Client, body: dict, token: str | None = FEEDBACK) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return client.post("/v1/feedback", json=body, headers=headers)


def record(client: httpx.Client, prediction_id: str) -> dict:
    """The capture record, once the store's writer has committed it (it writes off the request's path)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        r = admin(client, "GET", f"/v1/captures/{prediction_id}")
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 404, r.text
        assert time.monotonic() < deadline, f"{prediction_id} not stored within {DEADLINE_S} s"
        time.sleep(0.05)


def metric(client: httpx.Client, name: str, absent: float | None = None) -> float:
    """A sample of /metrics by its name and labels as written there; ``absent`` if it is not (yet) there."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    assert absent is not None, f"{name} not in /metrics"
    return absent


def test_prediction_id_round_trip_and_no_image_without_consent(client, one_photo) -> None:
    r = client.post("/v1/predict", content=one_photo, headers={"X-Capture-Consent": "no", "X-Request-Id": "req-1"})
    assert r.status_code == 200, r.text
    pid = r.json()["prediction_id"]
    assert r.headers["X-Prediction-Id"] == pid and len(pid) == 26
    stored = record(client, pid)
    assert stored["prediction_id"] == pid and stored["request_id"] == "req-1"
    assert stored["label"] == r.json()["label"] and stored["model"] + "@" + stored["version"] == r.json()["model"]
    assert stored["consent"] is False and stored["image"] is None and stored["source_sha256"] is None
    assert admin(client, "GET", f"/v1/captures/{pid}/image").status_code == 404
    listed = admin(client, "GET", "/v1/captures", params={"after_id": pid[:-1] + "0", "limit": 1000}).json()
    assert pid in [c["prediction_id"] for c in listed["captures"]]


def test_with_consent_the_stored_image_has_no_metadata_and_the_same_pixels(client, one_photo) -> None:
    sent = with_exif_gps(one_photo)
    assert b"SERIAL-12345" in sent
    r = client.post("/v1/predict", json={"image": b64(sent), "consent": True, "subject": "camera-7",
                                         "metadata": {"site": "north", "trap": 3}, "location": {"lat": 51.5, "lon": -0.12}})
    assert r.status_code == 200, r.text
    stored = record(client, r.json()["prediction_id"])
    assert stored["consent"] is True and stored["subject"] == "camera-7" and stored["metadata"] == {"site": "north", "trap": 3}
    assert stored["location"] is not None and stored["location"] != [51.5, -0.12]  # coarsened
    image = admin(client, "GET", f"/v1/captures/{stored['prediction_id']}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert b"SERIAL-12345" not in image.content and b"Exif" not in image.content
    assert Image.open(io.BytesIO(image.content)).getexif().get(0x8825) is None
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.content))), np.asarray(Image.open(io.BytesIO(sent))))


def test_a_batch_answers_a_prediction_id_each_and_erasure_by_subject_removes_them(client, one_photo) -> None:
    r = client.post("/v1/predict/batch", json={"images": [b64(one_photo), b64(jpeg()), "not base64!"],
                                               "consent": True, "subject": "erase-me"})
    assert r.status_code == 200, r.text
    answers = r.json()["predictions"]
    ids = [a["prediction_id"] for a in answers[:2]]
    assert len(set(ids)) == 2 and "error" in answers[2] and "prediction_id" not in answers[2]
    assert all(record(client, pid)["subject"] == "erase-me" for pid in ids)
    assert admin(client, "GET", f"/v1/captures/{ids[0]}/image").status_code == 200
    erased = admin(client, "POST", "/v1/captures/erase", json={"subject": "erase-me"})
    assert erased.status_code == 200 and erased.json()["records"] == 2, erased.text
    for pid in ids:
        assert admin(client, "GET", f"/v1/captures/{pid}").status_code == 404
        assert admin(client, "GET", f"/v1/captures/{pid}/image").status_code == 404
    assert admin(client, "DELETE", f"/v1/captures/{ids[0]}").status_code == 404


def test_feedback_token_errors_and_the_latest_label_of_the_most_trusted_source(client, one_photo) -> None:
    pid = client.post("/v1/predict", content=one_photo).json()["prediction_id"]
    record(client, pid)
    assert feedback(client, {"prediction_id": pid, "label": "goldfish"}, token=None).status_code == 401
    assert feedback(client, {"prediction_id": pid, "label": "goldfish"}, token=ADMIN).status_code == 403
    missing = feedback(client, {"prediction_id": new_prediction_id(), "label": "goldfish"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "prediction_not_found"
    bad = feedback(client, {"prediction_id": pid, "label": "goldfsh"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_label"
    assert "goldfish" in bad.json()["error"]["message"]
    before = metric(client, 'speciesclf_feedback_total{source="expert"}', absent=0.0)
    expert = feedback(client, {"prediction_id": pid, "label": "Carassius auratus", "source": "expert"})
    assert expert.status_code == 200 and expert.json()["resolved_label"] == "goldfish", expert.text
    later_user = feedback(client, {"prediction_id": pid, "label": "tench", "comment": "looks like a tench"})
    assert later_user.status_code == 200 and later_user.json()["resolved_label"] == "goldfish"
    stored = record(client, pid)
    assert stored["feedback_label"] == "goldfish" and [f["label"] for f in stored["feedback"]] == ["goldfish", "tench"]
    assert admin(client, "GET", "/v1/captures", params={"has_feedback": "true", "limit": 1000}).json()["captures"]
    assert metric(client, 'speciesclf_feedback_total{source="expert"}') == before + 1


def test_feedback_is_rate_limited_per_source(client, one_photo) -> None:
    pid = client.post("/v1/predict", content=one_photo).json()["prediction_id"]
    record(client, pid)
    answers = [feedback(client, {"prediction_id": pid, "label": "tench", "source": "reviewer"}) for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 429]
    assert answers[-1].json()["error"]["code"] == "rate_limited" and int(answers[-1].headers["Retry-After"]) >= 1


def test_oversized_or_bad_capture_fields_are_refused(client) -> None:
    image = b64(jpeg())
    too_many = client.post("/v1/predict", json={"image": image, "metadata": {f"k{i}": i for i in range(17)}})
    assert too_many.status_code == 422
    long_value = client.post("/v1/predict", json={"image": image, "metadata": {"k": "x" * 257}})
    assert long_value.status_code == 422
    assert client.post("/v1/predict", content=jpeg(), headers={"X-Capture-Consent": "maybe"}).status_code == 422
    both = client.post("/v1/predict", json={"image": image, "consent": True}, headers={"X-Capture-Consent": "no"})
    assert both.status_code == 422
    assert client.post("/v1/predict", json={"image": image, "location": {"lat": 91, "lon": 0}}).status_code == 422
    assert admin(client, "GET", "/v1/captures", params={"limit": "0"}).status_code == 422
    assert admin(client, "GET", "/v1/captures", params={"colour": "red"}).status_code == 422
    assert client.get("/v1/captures").status_code == 401


def test_a_failing_store_never_fails_a_prediction(server, client, monkeypatch) -> None:
    store = server.server.config.app.state.serve.capture.store

    def broken(*args, **kwargs):
        raise RuntimeError("the disk is on fire")

    before = metric(client, "speciesclf_capture_dropped_total")
    monkeypatch.setattr(store, "capture", broken)
    r = client.post("/v1/predict", content=jpeg())
    assert r.status_code == 200 and "prediction_id" not in r.json() and "X-Prediction-Id" not in r.headers
    batch = client.post("/v1/predict/batch", json={"images": [b64(jpeg())]})
    assert batch.status_code == 200 and "prediction_id" not in batch.json()["predictions"][0]
    assert metric(client, "speciesclf_capture_dropped_total") == before + 2
    assert metric(client, "speciesclf_capture_enabled") == 1


def test_a_damaged_database_stops_start_up_unless_capture_is_optional(species100, tokens, tmp_path) -> None:
    (tmp_path / "records.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(CaptureDatabaseError, match="records.sqlite3"):
        create_app(species100, capture_config(tmp_path, tokens))
    # In its own process: `serve` sets up the service's logging (and routes warnings) process-wide.
    cli = subprocess.run([sys.executable, "-m", "speciesclf", "serve", "--capture", str(tmp_path), "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and "serve did not start" in cli.stderr and "records.sqlite3" in cli.stderr, cli.stderr
    app = create_app(species100, capture_config(tmp_path, tokens, capture_optional=True))
    with LiveServer(app) as live, httpx.Client(base_url=live.url) as c:
        r = c.post("/v1/predict", content=jpeg())
        assert r.status_code == 200 and "prediction_id" not in r.json()
        assert feedback(c, {"prediction_id": new_prediction_id(), "label": "tench"}).status_code == 404  # no route
        assert metric(c, "speciesclf_capture_enabled") == 0


def test_capture_settings_are_checked(tmp_path) -> None:
    for bad in ({"capture_retention": "3 fortnights"}, {"capture_max_bytes": "10QB"}, {"capture_rate": 1.5},
                {"capture_consent": "sometimes"}):
        with pytest.raises(ValueError, match="ServeConfig.capture_"):
            ServeConfig(capture_dir=str(tmp_path), **bad)
    with pytest.raises(ValueError, match="needs capture_dir"):
        ServeConfig(feedback_token_file=str(tmp_path))
    parsed = ServeConfig(capture_dir=str(tmp_path), capture_retention="12h", capture_max_bytes="2GiB")
    assert parsed.capture_retention == 12 * 3600 and parsed.capture_max_bytes == 2**30 * 2
    assert ServeConfig(**parsed.to_dict()) == parsed


def test_the_first_label_of_a_rollout_prediction_feeds_its_arm_accuracy_gate(tmp_path) -> None:
    from types import SimpleNamespace

    from speciesclf.capture import CapturePolicy, SqliteCaptureStore
    from speciesclf.model.classifier import Prediction
    from speciesclf.serve.capture_routes import _after_feedback
    from speciesclf.serve.metrics import Metrics

    gate: list[tuple[str, bool]] = []
    rollout = SimpleNamespace(record_feedback=lambda arm, correct: gate.append((arm, correct)))
    state = SimpleNamespace(deployment=SimpleNamespace(rollout=rollout), metrics=Metrics())
    with SqliteCaptureStore(tmp_path, policy=CapturePolicy(sample_rate=1.0), labels=["tench", "goldfish"]) as store:
        def answered(label: str | None, arm: str) -> str:
            p = Prediction(label=label, score=0.9, index=0, top_k=[(label or "tench", 0.9)], unknown=label is None,
                           model="m@1.1.0", timings={}, guess=label or "tench", arm=arm)
            return store.capture(p)

        right, wrong, unknown = answered("tench", "candidate"), answered("goldfish", "primary"), answered(None, "candidate")
        store.flush()
        for pid, label in ((right, "tench"), (wrong, "tench"), (unknown, "not_an_animal"), (right, "goldfish")):
            _after_feedback(state, store, "user", store.add_feedback(pid, label))
    # The relabel of ``right`` (its second label) is not counted again.
    assert gate == [("candidate", True), ("primary", False), ("candidate", True)]
    assert 'speciesclf_feedback_accuracy{arm="primary",version="m@1.1.0"} 0.0' in state.metrics.render()


def test_every_status_the_capture_routes_answered_is_documented(server, client) -> None:
    from serve_server import undocumented_statuses

    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/feedback", "/v1/captures", "/v1/captures/erase", "/v1/captures/{prediction_id}",
            "/v1/captures/{prediction_id}/image"} <= set(paths)
    assert set(paths["/v1/captures/{prediction_id}"]) == {"get", "delete"}
    assert undocumented_statuses(client) == set()


def test_shutdown_flushes_the_store_after_the_batcher_drains(species100, tokens, tmp_path) -> None:
    from speciesclf.capture import SqliteCaptureStore

    app = create_app(species100, capture_config(tmp_path, tokens))
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        ids = [c.post("/v1/predict", content=jpeg(), headers={"X-Capture-Consent": "yes"}).json()["prediction_id"]
               for _ in range(5)]
    with SqliteCaptureStore(tmp_path) as reopened:  # the service's store is closed: this reads its files
        assert [r["prediction_id"] for r in reopened.query(limit=100)] == ids
        assert all(r["image"] is not None for r in reopened.query(limit=100))


def test_feedback_on_a_rollout_feeds_the_candidate_accuracy_gate(home, tokens, tmp_path) -> None:
    from rollout_bundles import GOOD, make_registry

    registry = make_registry(tmp_path / "registry", versions=("1.0.0", GOOD))
    config = capture_config(tmp_path / "capture", tokens, registry=str(registry.root), candidate=GOOD,
                            rollout="canary:50,100", watch_interval_s=0.2)
    with LiveServer(create_app("species100@production", config)) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        for key in range(64):  # half of the routing keys go to the candidate
            r = c.post("/v1/predict", content=jpeg(), headers={"X-Routing-Key": f"key-{key}"})
            if r.headers["X-Model-Arm"] == "candidate":
                break
        assert r.headers["X-Model-Arm"] == "candidate", "no routing key of 64 reached the candidate"
        pid = r.json()["prediction_id"]
        assert record(c, pid)["arm"] == "candidate"
        assert feedback(c, {"prediction_id": pid, "label": "not_an_animal", "source": "expert"}).status_code == 200
        deadline = time.monotonic() + DEADLINE_S
        while True:  # the gate's counts reach the shared rollout state at the deployment's next sync
            gate = (admin(c, "GET", "/v1/admin/rollout").json()["rollout"].get("gates") or {}).get("accuracy") or {}
            if gate.get("n", 0) >= 1:
                break
            assert time.monotonic() < deadline, f"the accuracy gate saw no feedback within {DEADLINE_S} s: {gate}"
            time.sleep(0.1)
        assert gate["n"] == 1


def test_an_image_the_model_cannot_decode_is_captured_as_an_error(client, one_photo) -> None:
    truncated = one_photo[:len(one_photo) // 3]
    r = client.post("/v1/predict", content=truncated, headers={"X-Capture-Consent": "yes"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "decode_error", r.text
    stored = record(client, r.headers["X-Prediction-Id"])
    assert stored["reason"] == "error" and stored["error"]["code"] == "decode_error"
    assert stored["image"] is None and stored["source_bytes"] == len(truncated)
