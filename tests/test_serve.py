"""The HTTP service: a real uvicorn server on 127.0.0.1, spoken to over HTTP with httpx."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from serve_server import LiveServer, undocumented_statuses  # noqa: E402  (tests/serve_server.py, on sys.path)
from speciesclf.serve import ServeConfig, create_app  # noqa: E402

# --- helpers ------------------------------------------------------------------------------------------------


class SlowClassifier:
    """The real classifier, made slow, so that queues fill and deadlines pass on purpose."""

    def __init__(self, clf, delay_s: float):
        self._clf = clf
        self.delay_s = delay_s

    def predict_batch(self, xs, **kw):
        time.sleep(self.delay_s)
        return self._clf.predict_batch(xs, **kw)

    def __getattr__(self, name):
        return getattr(self._clf, name)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{.*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clf(species100):
    return species100


@pytest.fixture(scope="module")
def photos(sample_photos: list[Path], clf) -> list[tuple[bytes, str]]:
    """40 photos with the label the library itself gives them (the server must give the same)."""
    chosen = sample_photos[::10][:40]
    data = [p.read_bytes() for p in chosen]
    return [(d, p.label) for d, p in zip(data, clf.predict_batch(data))]


@pytest.fixture(scope="module")
def server(clf):
    config = ServeConfig(max_body_bytes=2 * 2**20, max_wait_ms=20)
    with LiveServer(create_app(clf, config)) as live:
        yield live


@pytest.fixture(scope="module")
def slow_server(clf):
    # One image at a time, one batch at a time: which request waits and which runs is then certain.
    config = ServeConfig(max_batch_size=1, batches_in_flight=1, max_queue=2, max_batch_request=2, max_wait_ms=0)
    with LiveServer(create_app(SlowClassifier(clf, 0.4), config)) as live:
        yield live


# --- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"max_batch_size": 0}, {"batches_in_flight": 0}, {"max_queue": -1}, {"max_wait_ms": -1}, {"default_timeout_ms": 0},
    {"max_body_bytes": 1.5}, {"min_side": True}, {"host": ""}, {"port": 70000},
    {"max_queue": 8, "max_batch_request": 64}, {"default_timeout_ms": 10, "max_timeout_ms": 5},
])
def test_config_is_validated_up_front(kwargs) -> None:
    with pytest.raises(ValueError, match="ServeConfig"):
        ServeConfig(**kwargs)


def test_config_defaults() -> None:
    c = ServeConfig()
    assert (c.max_batch_size, c.max_wait_ms, c.max_queue, c.default_timeout_ms) == (16, 5.0, 256, 10_000)
    assert (c.max_body_bytes, c.min_side, c.max_batch_request) == (20 * 2**20, 16, 64)
    with pytest.raises(Exception):
        c.max_queue = 1  # frozen


def test_cli_has_serve() -> None:
    from speciesclf.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0


# --- endpoints ------------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_every_endpoint(server: LiveServer, photos, clf) -> None:
    photo, label = photos[0]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        health = c.get("/healthz").json()
        assert health["status"] == "ok" and isinstance(health["pid"], int)
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["model"] == clf.model

        models = c.get("/v1/models").json()["models"][0]
        assert models["model"] == "species100@1.0.0" and models["labels"] == 100
        assert models["preprocessing"]["size"] == 224
        assert models["serving"]["max_batch_size"] == 16 and models["serving"]["max_body_bytes"] == 2 * 2**20

        raw = c.post("/v1/predict", content=photo, headers={"content-type": "application/octet-stream",
                                                             "x-request-id": "my-id-1"})
        assert raw.status_code == 200, raw.text
        assert raw.headers["x-request-id"] == "my-id-1"
        body = raw.json()
        assert body["label"] == label and body["model"] == "species100@1.0.0" and len(body["top_k"]) == 5
        assert body["error"] is None
        # The declared content type does not matter: the format is sniffed.
        assert c.post("/v1/predict", content=photo, headers={"content-type": "image/png"}).json()["label"] == label

        multipart = c.post("/v1/predict?top_k=2", files={"file": ("x.jpg", photo, "image/jpeg")})
        assert multipart.status_code == 200 and multipart.json()["label"] == label
        assert len(multipart.json()["top_k"]) == 2
        assert re.fullmatch(r"[0-9a-f]{32}", multipart.headers["x-request-id"])

        as_json = c.post("/v1/predict", json={"image": b64(photo), "top_k": 3})
        assert as_json.status_code == 200 and as_json.json()["label"] == label and len(as_json.json()["top_k"]) == 3
        uri = c.post("/v1/predict", json={"image": "data:image/jpeg;base64," + b64(photo)})
        assert uri.status_code == 200 and uri.json()["label"] == label

        batch = c.post("/v1/predict/batch", json={"images": [b64(p) for p, _ in photos[:4]] + ["@@@"], "top_k": 1})
        assert batch.status_code == 200
        items = batch.json()["predictions"]
        assert [i["label"] for i in items[:4]] == [lab for _, lab in photos[:4]]
        assert all(len(i["top_k"]) == 1 for i in items[:4])
        assert items[4] == {"error": {"code": "invalid_base64", "message": items[4]["error"]["message"]}}

        files = [("files", (f"{i}.jpg", p, "image/jpeg")) for i, (p, _) in enumerate(photos[:3])]
        files.append(("files", ("bad.jpg", photo[:1000], "image/jpeg")))
        batch = c.post("/v1/predict/batch", files=files)
        assert batch.status_code == 200
        items = batch.json()["predictions"]
        assert [i.get("label") for i in items[:3]] == [lab for _, lab in photos[:3]]
        assert items[3]["error"]["code"] == "decode_error"

        text = c.get("/metrics")
        assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
        m = text.text
        assert metric(m, "speciesclf_requests_total", route="/v1/predict", status="200") >= 5
        assert metric(m, "speciesclf_model_info", model="species100@1.0.0") == 1
        assert metric(m, "speciesclf_predictions_total", label=label) >= 5
        assert metric(m, "speciesclf_errors_total", code="decode_error") >= 1
        assert metric(m, "speciesclf_batch_size_count") >= 1
        assert "speciesclf_request_duration_seconds_bucket" in m and "speciesclf_queue_depth" in m

        missing = c.get("/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def _malformed(photo: bytes) -> list[tuple[str, str, dict, int, str]]:
    """(method path, kind, request kwargs, status, code): about 100 bad requests."""
    rng = random.Random(7)
    cases: list[tuple[str, dict, int, str]] = []
    raw = {"content-type": "application/octet-stream"}
    # bad base64, single and in a data: URI
    for bad in ["!!!!", "abc$def", "a", "====", "ab cd*", "\u00e9t\u00e9", "data:image/jpeg;base64,@@@",
                "data:image/jpeg,plain", "data:nonsense", "QUJD" * 10 + "!"]:
        cases.append(("/v1/predict", {"json": {"image": bad}}, 400, "invalid_base64"))
    # truncated JPEGs, raw and as base64
    for n in [4, 20, 100, 300, 1000, 3000, 8000, 15000, len(photo) // 2, len(photo) * 3 // 4]:
        cases.append(("/v1/predict", {"content": photo[:n], "headers": raw}, 422, "decode_error"))
        cases.append(("/v1/predict", {"json": {"image": b64(photo[:n])}}, 422, "decode_error"))
    # random bytes (not any image signature), whatever the declared type
    for i in range(25):
        junk = b"\x00" + rng.randbytes(rng.randint(1, 5000))
        ctype = ["image/jpeg", "image/png", "application/octet-stream", "text/plain", "image/webp"][i % 5]
        cases.append(("/v1/predict", {"content": junk, "headers": {"content-type": ctype}}, 415, "unsupported_format"))
    cases.append(("/v1/predict", {"files": {"file": ("a.jpg", b"\x00not a jpeg", "image/jpeg")}}, 415,
                  "unsupported_format"))
    # decompression bombs (header says 60000x60000) and tiny images
    for w, h in [(60000, 60000), (100000, 1000), (20000, 20000)]:
        cases.append(("/v1/predict", {"content": png_header_only(w, h), "headers": raw}, 422, "image_too_large"))
        cases.append(("/v1/predict", {"json": {"image": b64(png_header_only(w, h))}}, 422, "image_too_large"))
    for w, h in [(4, 4), (1, 1), (15, 300), (300, 8)]:
        cases.append(("/v1/predict", {"content": png_bytes(w, h), "headers": raw}, 422, "image_too_small"))
    cases.append(("/v1/predict", {"files": {"file": ("a.png", png_bytes(4, 4), "image/png")}}, 422, "image_too_small"))
    # empty input
    cases.append(("/v1/predict", {"content": b"", "headers": raw}, 400, "empty_input"))
    cases.append(("/v1/predict", {"json": {"image": ""}}, 400, "empty_input"))
    cases.append(("/v1/predict/batch", {"json": {"images": []}}, 400, "empty_input"))
    # wrong JSON and fields
    js = {"content-type": "application/json"}
    for body in [b"{not json", b"[1, 2]", b"null", b"", b'"str"', b"\xff\xfe", b'{"image": 5}', b'{"images": "x"}',
                 b'{"picture": "abc"}', b'{"image": "QUJD", "extra": 1}']:
        cases.append(("/v1/predict", {"content": body, "headers": js}, 422, "invalid_request"))
    for body in [{"images": "x"}, {"images": [1]}, {"images": [b64(photo)], "top_k": 0}, {"image": b64(photo)},
                 {"images": [{"url": "http://127.0.0.1:9/a.jpg", "y": 1}]}]:
        cases.append(("/v1/predict/batch", {"json": body}, 422, "invalid_request"))
    for top_k in [0, -1, "x", 1000, 2.5, True, [3]]:
        status = 422
        cases.append(("/v1/predict", {"json": {"image": b64(photo), "top_k": top_k}}, status, "invalid_request"))
    for q in ["0", "abc", "5000", ""]:
        cases.append((f"/v1/predict?top_k={q}", {"content": photo, "headers": raw}, 422, "invalid_request"))
    cases.append(("/v1/predict", {"files": {"other": ("a.jpg", photo, "image/jpeg")}}, 422, "invalid_request"))
    cases.append(("/v1/predict", {"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}},
                  422, "invalid_request"))
    cases.append(("/v1/predict", {"content": photo, "headers": {**raw, "x-request-timeout-ms": "soon"}}, 422,
                  "invalid_request"))
    cases.append(("/v1/predict/batch", {"json": {"images": [b64(png_bytes(32, 32))] * 65}}, 413, "too_many_images"))
    # URL inputs are refused (nothing is fetched)
    cases.append(("/v1/predict", {"json": {"url": "http://127.0.0.1:9/cat.jpg"}}, 400, "url_not_allowed"))
    # bodies over max_body_bytes (2 MiB here): with a Content-Length, and streamed without one
    big = b"\xff\xd8\xff" + bytes(2 * 2**20)
    cases.append(("/v1/predict", {"content": big, "headers": raw}, 413, "image_too_large"))
    cases.append(("/v1/predict", {"content": iter([big[:2**20], big[2**20:]]), "headers": raw}, 413, "image_too_large"))
    return cases


@pytest.mark.shared
def test_malformed_requests_get_precise_4xx_and_never_disturb_valid_ones(server: LiveServer, photos) -> None:
    photo, _ = photos[0]
    cases = _malformed(photo)
    assert len(cases) >= 100
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for i, (path, kwargs, status, code) in enumerate(cases):
            r = c.post(path, **kwargs)
            got = (r.json().get("error") or {}).get("code")
            assert (r.status_code, got) == (status, code), (i, path, r.text[:300])
            assert set(r.json()) == {"error"} and r.json()["error"]["message"]
            if i % 4 == 0:  # valid requests interleaved keep getting correct answers
                good, label = photos[(i // 4) % len(photos)]
                ok = c.post("/v1/predict", content=good, headers={"content-type": "image/jpeg"})
                assert ok.status_code == 200 and ok.json()["label"] == label
        # batch items fail one by one, never the batch
        images = [b64(photos[1][0]), "%%%", b64(png_bytes(4, 4)), b64(png_header_only(60000, 60000)),
                  b64(b"\x00junk"), b64(photo[:500]), "", b64(photos[2][0])]
        items = c.post("/v1/predict/batch", json={"images": images}).json()["predictions"]
        codes = [item["error"]["code"] if "error" in item and "label" not in item else item["label"] for item in items]
        assert codes == [photos[1][1], "invalid_base64", "image_too_small", "image_too_large", "unsupported_format",
                         "decode_error", "empty_input", photos[2][1]]
        # An item that is no image at all (neither a string nor {"url": ...}) is a malformed request.
        wrong = c.post("/v1/predict/batch", json={"images": [b64(photos[1][0]), 7]})
        assert (wrong.status_code, wrong.json()["error"]["code"]) == (422, "invalid_request")
        assert "speciesclf_errors_total" in c.get("/metrics").text
        assert c.get("/readyz").status_code == 200
        assert not undocumented_statuses(c)


@pytest.mark.shared
def test_concurrent_clients_get_their_own_answers_and_batches_form(server: LiveServer, photos) -> None:
    with httpx.Client(base_url=server.url) as c:
        before = c.get("/metrics").text
    barrier = threading.Barrier(32)

    def client(i: int) -> list[str]:
        wrong = []
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait()
            for j in range(4):
                data, label = photos[(i * 4 + j) % len(photos)]
                rid = f"client-{i}-{j}"
                if j % 2:
                    r = c.post("/v1/predict", json={"image": b64(data)}, headers={"x-request-id": rid})
                else:
                    r = c.post("/v1/predict", content=data, headers={"x-request-id": rid,
                                                                     "content-type": "image/jpeg"})
                if r.status_code != 200 or r.json()["label"] != label or r.headers["x-request-id"] != rid:
                    wrong.append(f"{rid}: {r.status_code} {r.text[:200]}")
        return wrong

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        wrong = [w for ws in pool.map(client, range(32)) for w in ws]
    assert not wrong
    with httpx.Client(base_url=server.url) as c:
        after = c.get("/metrics").text
    batches = metric(after, "speciesclf_batch_size_count") - metric(before, "speciesclf_batch_size_count")
    singles = (metric(after, "speciesclf_batch_size_bucket", le="1")
               - metric(before, "speciesclf_batch_size_bucket", le="1"))
    images = metric(after, "speciesclf_batch_size_sum") - metric(before, "speciesclf_batch_size_sum")
    assert images == 128
    assert batches < 128 and singles < batches, (batches, singles)  # batches larger than 1 did form


@pytest.mark.shared
def test_overload_gets_429_with_retry_after_then_serves_normally(slow_server: LiveServer, photos) -> None:
    photo, label = photos[0]

    def one(_):
        with httpx.Client(base_url=slow_server.url, timeout=60) as c:
            return c.post("/v1/predict", content=photo, headers={"content-type": "image/jpeg"})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    statuses = [r.status_code for r in answers]
    assert 429 in statuses and 200 in statuses, statuses
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
        else:
            assert r.status_code == 200 and r.json()["label"] == label
    with httpx.Client(base_url=slow_server.url, timeout=60) as c:
        r = c.post("/v1/predict", content=photo, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["label"] == label
        m = c.get("/metrics").text
        assert metric(m, "speciesclf_requests_total", route="/v1/predict", status="429") >= 1
        assert metric(m, "speciesclf_queue_depth") == 0
        assert not undocumented_statuses(c)


@pytest.mark.shared
def test_short_deadline_is_answered_503_or_504_not_late(slow_server: LiveServer, photos) -> None:
    photo, label = photos[0]

    def one(_):
        with httpx.Client(base_url=slow_server.url, timeout=60) as c:
            start = time.perf_counter()
            r = c.post("/v1/predict", content=photo,
                       headers={"content-type": "image/jpeg", "x-request-timeout-ms": "60"})
            return r, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(one, range(2)))
    codes = sorted((r.status_code, r.json()["error"]["code"]) for r, _ in answers)
    # one starts inference (400 ms) and times out in it, the other times out in the queue
    assert codes == [(503, "deadline_exceeded"), (504, "inference_timeout")], codes
    assert all(seconds < 0.35 for _, seconds in answers), [s for _, s in answers]  # not late
    time.sleep(0.5)
    with httpx.Client(base_url=slow_server.url, timeout=60) as c:
        r = c.post("/v1/predict", content=photo, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["label"] == label
        assert not undocumented_statuses(c)


@pytest.mark.shared
def test_json_logs_with_request_id_and_no_image_bytes(server: LiveServer, photos, caplog) -> None:
    from speciesclf.serve.logs import JsonFormatter

    photo, _ = photos[0]
    with caplog.at_level(logging.INFO, logger="speciesclf.serve"):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            c.post("/v1/predict", json={"image": b64(photo)}, headers={"x-request-id": "log-me"})
            c.post("/v1/predict", content=b"\x00junk", headers={"x-request-id": "bad-one"})
        deadline = time.monotonic() + 5
        while len([r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "bad-one"]) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    lines = {r.fields["request_id"]: json.loads(JsonFormatter().format(r))
             for r in caplog.records if r.name == "speciesclf.serve" and "request_id" in getattr(r, "fields", {})}
    good, bad = lines["log-me"], lines["bad-one"]
    assert good["route"] == "/v1/predict" and good["status"] == 200 and good["model"] == "species100@1.0.0"
    assert good["batch_size"] >= 1 and good["latency_ms"] > 0
    assert bad["status"] == 415
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert b64(photo)[:40] not in text and "junk" not in text


class RecordingClassifier(SlowClassifier):
    """The real classifier, recording the size of every inference call."""

    def __init__(self, clf):
        super().__init__(clf, 0.0)
        self.sizes: list[int] = []

    def predict_batch(self, xs, **kw):
        self.sizes.append(len(xs))
        return super().predict_batch(xs, **kw)


@pytest.mark.shared
def test_a_large_batch_request_is_split_not_allowed_to_overflow_the_batch(clf, photos) -> None:
    recorder = RecordingClassifier(clf)
    config = ServeConfig(max_batch_size=4, max_batch_request=10, max_queue=40)
    with LiveServer(create_app(recorder, config)) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        chosen = photos[:10]
        r = c.post("/v1/predict/batch", json={"images": [b64(p) for p, _ in chosen], "top_k": 1})
        assert r.status_code == 200
        assert [i["label"] for i in r.json()["predictions"]] == [label for _, label in chosen]  # in order
        # and while it runs in slices, single requests still get their own answers
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            singles = list(pool.map(lambda pl: c.post("/v1/predict", content=pl[0],
                                                      headers={"content-type": "image/jpeg"}).json()["label"],
                                    photos[10:18]))
        assert singles == [label for _, label in photos[10:18]]
    assert recorder.sizes and max(recorder.sizes[1:]) <= 4, recorder.sizes  # [0] is the warm-up


@pytest.mark.shared
def test_effective_settings_are_logged_at_start_up(clf, caplog) -> None:
    config = ServeConfig(max_batch_size=7, max_queue=70, max_batch_request=7)
    with caplog.at_level(logging.INFO, logger="speciesclf.serve"):
        with LiveServer(create_app(clf, config)) as live:
            with httpx.Client(base_url=live.url, timeout=30) as c:
                deadline = time.monotonic() + 30
                while c.get("/readyz").status_code != 200:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
    (ready,) = [r for r in caplog.records if r.name == "speciesclf.serve" and r.getMessage() == "ready"]
    settings = ready.fields["settings"]
    assert settings["max_batch_size"] == 7 and settings["max_queue"] == 70
    assert settings == config.to_dict()


@pytest.mark.shared
def test_graceful_shutdown_drains_accepted_work(clf, photos) -> None:
    config = ServeConfig(max_batch_size=2, max_wait_ms=0)
    app = create_app(SlowClassifier(clf, 0.1), config)
    live = LiveServer(app).__enter__()
    metrics = app.state.serve.metrics
    photo, label = photos[0]

    def one(_):
        with httpx.Client(base_url=live.url, timeout=60) as c:
            return c.post("/v1/predict", content=photo, headers={"content-type": "image/jpeg"})

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(one, i) for i in range(6)]
            # Stop only once all six are accepted (queued or running): a loaded machine may take a while.
            deadline = time.monotonic() + 10
            def accepted() -> int:
                return metrics.queue_depth + metrics.in_flight + metrics.predictions_returned

            while accepted() < 6 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert accepted() == 6
            live.server.should_exit = True
            answers = [f.result() for f in futures]
    finally:
        live.__exit__(None, None, None)
    assert [(r.status_code, r.json()["label"]) for r in answers] == [(200, label)] * 6


# --- dispatch: a lone request does not wait for company ------------------------------------------------------


@pytest.fixture(scope="module")
def patient_server(clf):
    config = ServeConfig(max_wait_ms=500)
    with LiveServer(create_app(SlowClassifier(clf, 0.05), config)) as live:
        yield live


@pytest.mark.shared
def test_a_lone_request_is_dispatched_at_once_and_concurrent_ones_still_coalesce(patient_server, photos) -> None:
    photo, label = photos[0]
    with httpx.Client(base_url=patient_server.url, timeout=30) as c:
        c.post("/v1/predict", content=photo)  # the connection is warm
        seconds = []
        for _ in range(5):
            t0 = time.perf_counter()
            r = c.post("/v1/predict", content=photo)
            seconds.append(time.perf_counter() - t0)
            assert r.status_code == 200 and r.json()["label"] == label
        # inference takes 50 ms here; waiting max_wait_ms (500 ms) for company would show
        assert sorted(seconds)[2] < 0.25, seconds
        before = c.get("/metrics").text
    barrier = threading.Barrier(16)

    def client(i: int) -> list[str]:
        with httpx.Client(base_url=patient_server.url, timeout=60) as c:
            barrier.wait()
            out = []
            for j in range(3):
                data, want = photos[(i * 3 + j) % len(photos)]
                r = c.post("/v1/predict", content=data)
                if r.status_code != 200 or r.json()["label"] != want:
                    out.append(f"{i}-{j}: {r.status_code} {r.text[:100]}")
            return out

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert not [w for ws in pool.map(client, range(16)) for w in ws]
    with httpx.Client(base_url=patient_server.url) as c:
        after = c.get("/metrics").text
    batches = metric(after, "speciesclf_batch_size_count") - metric(before, "speciesclf_batch_size_count")
    images = metric(after, "speciesclf_batch_size_sum") - metric(before, "speciesclf_batch_size_sum")
    assert images == 48 and batches < 48 / 2, batches  # requests arriving during an inference ran together


# --- speciesclf serve --workers N ---------------------------------------------------------------------------------


def test_workers_must_be_at_least_one(capsys) -> None:
    from speciesclf.cli import main
    from speciesclf.serve import run

    assert main(["serve", "--workers", "0"]) == 1
    assert "--workers must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="workers"):
        run("species100", ServeConfig(), workers=0)


@pytest.mark.shared
def test_serve_with_two_worker_processes(shared_dir: Path, tmp_path: Path, photos) -> None:
    """Both workers answer, and a scrape of either counts the requests of both (prometheus_client's
    multiprocess mode in a private folder under TMPDIR, removed when the service stops)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, SPECIESCLF_WEIGHTS=str(shared_dir / "models"), SPECIESCLF_HOME=str(tmp_path / "home"),
               TMPDIR=str(tmp_path / "tmp"))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "speciesclf", "serve", "--model", "species100", "--workers", "2",
                             "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    photo, label = photos[0]
    try:
        deadline = time.monotonic() + 120
        ready: set[int] = set()
        while len(ready) < 2:  # each worker loads its own model; a fresh connection may reach either
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"workers ready: {ready}"
            try:
                with httpx.Client(base_url=url, timeout=5) as c:
                    if c.get("/readyz").status_code == 200:
                        ready.add(c.get("/healthz").json()["pid"])  # same connection, same worker
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert proc.pid not in ready  # answered by worker processes, not by the supervisor
        answered: dict[int, int] = {}  # worker pid -> predictions it answered
        sent = 0
        while len(answered) < 2 or sent < 4:
            assert time.monotonic() < deadline, answered
            with httpx.Client(base_url=url, timeout=30) as c:  # a fresh connection: either worker
                pid = c.get("/healthz").json()["pid"]
                r = c.post("/v1/predict", content=photo)
                assert r.status_code == 200 and r.json()["label"] == label
                answered[pid] = answered.get(pid, 0) + 1
                sent += 1
        for _ in range(4):  # whichever worker answers the scrape, it counts both workers' requests
            with httpx.Client(base_url=url, timeout=30) as c:
                text = c.get("/metrics").text
            assert metric(text, "speciesclf_requests_total", route="/v1/predict", status="200") == sent, text[:3000]
            assert metric(text, "speciesclf_predictions_total") == sent
            assert metric(text, "speciesclf_stage_duration_seconds_count", stage="inference") == sent
            assert metric(text, "speciesclf_ready") == 1 and metric(text, "speciesclf_queue_depth") == 0
            assert metric(text, "speciesclf_model_info", model="species100@1.0.0") == 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-2000:]
    assert not list((tmp_path / "tmp").glob("speciesclf-serve-*"))  # the multiprocess folder is gone


@pytest.mark.shared
def test_two_batches_in_flight_keep_answers_apart(clf, photos) -> None:
    # Batches overlap, and a large request's slices may finish out of order: every answer must still be the
    # request's own, in its order.
    config = ServeConfig(max_batch_size=3, batches_in_flight=2, max_batch_request=12, max_queue=64)
    with LiveServer(create_app(SlowClassifier(clf, 0.02), config)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as c:
        def one(k: int):
            if k % 3 == 0:
                chosen = [photos[(k + j) % len(photos)] for j in range(7)]
                r = c.post("/v1/predict/batch", json={"images": [b64(p) for p, _ in chosen], "top_k": 1})
                return [i["label"] for i in r.json()["predictions"]], [label for _, label in chosen]
            photo, label = photos[k % len(photos)]
            r = c.post("/v1/predict", content=photo, headers={"content-type": "image/jpeg"})
            return r.json()["label"], label

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for got, expected in pool.map(one, range(24)):
                assert got == expected


def test_mounted_under_a_prefix_and_through_fastapi_routing(clf, photos):
    """The same answers, errors, request ids and metrics at the root, under a prefix (a mounted app), and with
    the predict handlers reached through FastAPI's routing layers instead of the middleware's direct call."""
    config = ServeConfig(max_body_bytes=2 * 2**20)
    child = create_app(clf, config)

    @contextlib.asynccontextmanager
    async def lifespan(parent):  # Starlette runs no lifespan of a mounted app by itself
        async with child.router.lifespan_context(child):
            yield

    parent = fastapi.FastAPI(lifespan=lifespan)
    parent.mount("/svc", child)
    routed = create_app(clf, config)
    routed.state.serve.predict_handlers = {}  # every request through FastAPI's router
    image, label = photos[0]
    with LiveServer(create_app(clf, config)) as root, LiveServer(parent, ready_path="/svc/readyz") as mounted, \
            LiveServer(routed) as through_router:
        for base in (root.url, mounted.url + "/svc", through_router.url):
            with httpx.Client(base_url=base, timeout=60) as c:
                ok = c.post("/v1/predict?top_k=3", content=image, headers={"x-request-id": "mount-test-1"})
                assert ok.status_code == 200, (base, ok.text)
                assert ok.json()["label"] == label and len(ok.json()["top_k"]) == 3
                assert ok.headers["x-request-id"] == "mount-test-1"
                batch = c.post("/v1/predict/batch", json={"images": [b64(image), "not base64!"]})
                assert batch.status_code == 200
                assert batch.json()["predictions"][0]["label"] == label
                assert batch.json()["predictions"][1]["error"]["code"] == "invalid_base64"
                bad = c.post("/v1/predict", content=b"\xff\xd8\xff" + b"\0" * 100)
                assert bad.status_code in (415, 422) and "code" in bad.json()["error"], bad.text
                bad_top_k = c.post("/v1/predict?top_k=0", content=image)
                assert bad_top_k.status_code == 422
                assert bad_top_k.json()["error"]["code"] == "invalid_request"
                wrong_method = c.get("/v1/predict")
                assert wrong_method.status_code == 405
                assert wrong_method.json()["error"]["code"] == "method_not_allowed"
                text = c.get("/metrics").text
                assert metric(text, "speciesclf_predictions_total") == 2
                # Counted under its route, not "other", wherever the app is mounted.
                assert metric(text, "speciesclf_requests_total", route="/v1/predict", status="200") == 1
                assert metric(text, "speciesclf_requests_total", route="/v1/predict", status="422") == 2


def test_root_path_is_cut_at_a_slash(clf, photos):
    """A root_path that is a mere string prefix of the path ("/v" of "/v1/predict") is not the route's
    prefix: Starlette routes "/v1/predict", and metrics must count it there, not under "other"."""
    app = create_app(clf, ServeConfig())
    image, label = photos[0]

    async def main():
        async with app.router.lifespan_context(app):
            for root_path in ("/v", "/svc"):
                prefix = "" if root_path == "/v" else root_path  # "/svc": a real prefix, in front of the path
                transport = httpx.ASGITransport(app=app, root_path=root_path)
                async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                    while (await c.get(prefix + "/readyz")).status_code != 200:
                        await asyncio.sleep(0.02)
                    r = await c.post(prefix + "/v1/predict", content=image)
                    assert r.status_code == 200 and r.json()["label"] == label, (root_path, r.text)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
                return (await c.get("/metrics")).text

    text = asyncio.run(main())
    assert metric(text, "speciesclf_requests_total", route="/v1/predict", status="200") == 2
    assert metric(text, "speciesclf_requests_total", route="other") == 0
