"""Hostile inputs the HTTP service once answered badly (a 500, a blocked event loop, a wrong status, a bypassed
limit), each found by a review and pinned here: hostile origins, odd JSON, spent deadlines, disconnects,
allowlist entries, header scans, and what reaches the logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import socket
import threading
import time
import warnings

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from serve_server import LiveServer  # noqa: E402
from speciesclf.serve import ServeConfig, create_app  # noqa: E402
from speciesclf.preprocessing.decoding import image_size  # noqa: E402
from speciesclf.sources.fetch import host_allowed  # noqa: E402
from speciesclf.serve._fetch import ServiceFetcher  # noqa: E402
from speciesclf.serve.app import _REQUEST_ID  # noqa: E402
from speciesclf.serve._images import ApiError, check_image  # noqa: E402
from speciesclf.serve.batcher import Batcher, DeadlineExceeded  # noqa: E402
from speciesclf.serve.logs import configure_logging, logger, uvicorn_log_config  # noqa: E402
from speciesclf.serve.metrics import Metrics  # noqa: E402


def encoded(fmt: str, width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 140, 60)).save(buffer, fmt)
    return buffer.getvalue()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- a hostile origin: raw answers, byte for byte ------------------------------------------------------------


HOSTILE_ANSWERS = {
    "/negative-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "/prefixed-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "/superscript-length": "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\nab".encode("latin-1"),
    "/superscript-status": "HTTP/1.1 \u00b2\u00b3\u00b9 OK\r\nContent-Length: 0\r\n\r\n".encode("latin-1"),
    "/broken-location": b"HTTP/1.1 302 Found\r\nLocation: http://[::1\r\nContent-Length: 0\r\n\r\n",
}


class RawOrigin:
    """Answers each path in HOSTILE_ANSWERS with exactly those bytes, then closes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                path = request.split(b" ", 2)[1].decode("ascii", "replace") if request.count(b" ") >= 2 else "/"
                conn.sendall(HOSTILE_ANSWERS.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))

    def __enter__(self) -> RawOrigin:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


def fetcher() -> ServiceFetcher:
    return ServiceFetcher(ServeConfig(url_inputs=True, url_allow_hosts=("127.0.0.1",),
                                  url_allow_networks=("127.0.0.1/32",), url_read_timeout_s=1.0, url_timeout_s=3.0))


@pytest.mark.parametrize("path", sorted(HOSTILE_ANSWERS))
def test_a_hostile_origins_answer_is_a_4xx_for_that_url(path: str) -> None:
    with RawOrigin() as origin:
        with pytest.raises(ApiError) as e:
            asyncio.run(fetcher().fetch(f"http://127.0.0.1:{origin.port}{path}", 3.0))
    assert e.value.status == 400 and e.value.code in ("url_fetch_failed", "url_not_allowed"), e.value.message


@pytest.mark.parametrize("url", ["http://127.0.0.1/\ud800", "http://127.0.0.1/a?q=\udfff"])
def test_a_lone_surrogate_in_a_url_is_refused(url: str) -> None:
    with pytest.raises(ApiError) as e:
        asyncio.run(fetcher().fetch(url, 1.0))
    assert (e.value.status, e.value.code) == (400, "url_not_allowed")


# --- settings that would pass validation and then never work -----------------------------------------------


@pytest.mark.parametrize("entry, url_host, allowed", [
    ("bücher.example", "xn--bcher-kva.example", True),
    ("*.bücher.example", "img.xn--bcher-kva.example", True),
    ("images.example.com.", "images.example.com", True),
    ("[0:0::1]", "::1", True),
    ("Example.COM", "example.com", True),
    ("*.example.com", "example.com", False),
])
def test_allowlist_entries_are_stored_in_the_form_url_hosts_are_matched_in(entry, url_host, allowed) -> None:
    config = ServeConfig(url_inputs=True, url_allow_hosts=(entry,))
    assert host_allowed(url_host, config.url_allow_hosts) is allowed


@pytest.mark.parametrize("entry", ["images.example.com:8080", "http://x.com", "a b", "*.", "*x.com", "[::1"])
def test_allowlist_entries_that_could_never_match_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="url_allow_hosts"):
        ServeConfig(url_inputs=True, url_allow_hosts=(entry,))


def test_timeouts_are_bounded() -> None:
    with pytest.raises(ValueError, match="max_timeout_ms"):
        ServeConfig(default_timeout_ms=10**400, max_timeout_ms=10**400)
    ServeConfig(default_timeout_ms=86_400_000, max_timeout_ms=86_400_000)  # one day is fine


# --- header scans on the event loop -------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"\xff\xd8" + b"\xff" * 20_000_000,  # fill bytes
    b"\xff\xd8" + b"\xff\xd0" * 10_000_000,  # empty markers
    b"\xff\xd8" + b"\xff\xfe\x00\x02" * 5_000_000,  # empty comments
])
def test_the_jpeg_header_scan_is_bounded_on_hostile_input(body: bytes) -> None:
    start = time.perf_counter()
    assert image_size(body) is None
    assert time.perf_counter() - start < 0.05


def test_the_jpeg_header_scan_still_reads_real_files() -> None:
    data = encoded("JPEG", 300, 200)
    assert image_size(data) == (300, 200)
    padded = data[:2] + b"\xff" * 1000 + data[2:]  # fill bytes before a marker are legal
    assert image_size(padded) == (300, 200)


def test_tiff_is_held_to_the_same_size_limits_as_other_formats() -> None:
    big, small = encoded("TIFF", 400, 400), encoded("TIFF", 8, 8)
    assert image_size(big) == (400, 400)
    with pytest.raises(ApiError) as e:
        check_image(big, min_side=16, max_pixels=100_000)
    assert e.value.code == "image_too_large"
    with pytest.raises(ApiError) as e:
        check_image(small, min_side=16, max_pixels=100_000)
    assert e.value.code == "image_too_small"
    check_image(encoded("TIFF", 100, 100), min_side=16, max_pixels=100_000)


# --- deadlines spent before queueing --------------------------------------------------------------------------


def test_a_deadline_spent_before_queueing_is_503_queued_and_runs_nothing() -> None:
    class Counting:
        calls = 0

        def predict_batch(self, xs, **kw):
            Counting.calls += 1
            return [None] * len(xs)

    async def scenario() -> None:
        batcher = Batcher(Counting(), ServeConfig(), Metrics())
        batcher.start()
        try:
            for timeout_s in (0.0, -1.0):
                with pytest.raises(DeadlineExceeded) as e:
                    await batcher.predict([b"x"], 5, timeout_s)
                assert e.value.stage == "queued"
            await asyncio.sleep(0.05)
        finally:
            await batcher.stop(1.0)
        assert Counting.calls == 0 and batcher.queued_images == 0

    asyncio.run(scenario())


# --- the live server ------------------------------------------------------------------------------------------


class FailingClassifier:
    """The real classifier, whose inference fails: what a runtime crash looks like to the service."""

    def __init__(self, clf):
        self._clf = clf

    def predict_batch(self, xs, **kw):
        raise RuntimeError("the runtime fell over")

    def __getattr__(self, name):
        return getattr(self._clf, name)


@pytest.fixture(scope="module")
def server(species100):
    with LiveServer(create_app(species100)) as live:
        yield live


@pytest.fixture(scope="module")
def photo(sample_photos) -> bytes:
    return sample_photos[0].read_bytes()


def test_deeply_nested_json_is_a_422(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for route in ("/v1/predict", "/v1/predict/batch"):
            r = client.post(route, content=b"[" * 100_000, headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
            assert "nested too deeply" in r.json()["error"]["message"]


def test_a_deadline_spent_on_a_slow_upload_is_503_not_a_late_answer(server, photo) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nX-Request-Timeout-Ms: 200\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(photo))
        half = len(photo) // 2
        s.sendall(photo[:half])
        time.sleep(0.4)
        s.sendall(photo[half:])
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            body += s.recv(65536)
    assert head.startswith(b"HTTP/1.1 503"), head
    assert json.loads(body)["error"]["code"] == "deadline_exceeded"


def test_a_client_leaving_mid_upload_is_a_499_not_a_server_error(server, photo) -> None:
    def counts() -> tuple[float, float]:
        text = httpx.get(server.url + "/metrics").text
        return (metric(text, "speciesclf_requests_total", status="499"),
                metric(text, "speciesclf_requests_total", status="500"))

    before = counts()
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: %d\r\n\r\n" % (len(photo) * 4))
        s.sendall(photo[:1000])
    deadline = time.monotonic() + 5
    while counts()[0] == before[0]:
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
    after = counts()
    assert after == (before[0] + 1, before[1])
    assert httpx.post(server.url + "/v1/predict", content=photo).status_code == 200  # and it serves on


def test_a_500_carries_the_request_id_and_is_one_json_log_line(species100, photo) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logger.addHandler(keep)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        with LiveServer(create_app(FailingClassifier(species100), ServeConfig(warmup=False))) as live:
            r = httpx.post(live.url + "/v1/predict", content=photo, headers={"X-Request-Id": "rid-500-check"})
            text = httpx.get(live.url + "/metrics").text
    finally:
        logger.removeHandler(keep)
        logger.setLevel(previous)
    assert r.status_code == 500 and r.json() == {"error": {"code": "internal", "message": "internal error"}}
    assert r.headers["x-request-id"] == "rid-500-check"
    assert metric(text, "speciesclf_errors_total", code="internal") == 1
    errors = [rec for rec in records if rec.getMessage() == "internal error"]
    assert len(errors) == 1 and errors[0].fields["request_id"] == "rid-500-check"
    assert "fell over" in errors[0].fields["error"]
    finished = [rec.fields for rec in records if rec.getMessage() == "request" and rec.fields["route"] == "/v1/predict"]
    assert finished == [pytest.approx(finished[0])] and finished[0]["status"] == 500


@pytest.mark.parametrize("given", ["a" * 129, "ünïcode", "a b", "a;b", ""])
def test_unusable_request_ids_are_replaced(server, given: str) -> None:
    r = httpx.get(server.url + "/healthz", headers={"X-Request-Id": given.encode("utf-8")})
    assert r.status_code == 200 and r.headers["x-request-id"] != given
    assert len(r.headers["x-request-id"]) == 32
    assert _REQUEST_ID.fullmatch("rid\n") is None  # what a server that let a newline through would hand over


# --- logs ------------------------------------------------------------------------------------------------------


def test_warnings_and_uvicorn_lines_go_out_as_json(capsys) -> None:
    stream = io.StringIO()
    touched = ("speciesclf.serve", "py.warnings", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate,
                    logging.getLogger(name).level) for name in touched}
    configure_logging(stream=stream)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("Corrupt EXIF data", UserWarning, stacklevel=1)
        logging.config.dictConfig(uvicorn_log_config("info"))
        logging.getLogger("uvicorn.error").info("Started server process")
    finally:  # the process's logging as it was, for the tests that come after
        logging.captureWarnings(False)
        for name, (handlers, propagate, level) in saved.items():
            log = logging.getLogger(name)
            log.handlers[:] = handlers
            log.propagate = propagate
            log.setLevel(level)
    (warning,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert warning["logger"] == "py.warnings" and "Corrupt EXIF data" in warning["msg"]
    (started,) = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert started["logger"] == "uvicorn.error" and started["msg"] == "Started server process"


def test_bodies_received_at_once_are_bounded_and_released(species100, photo) -> None:
    app = create_app(species100, ServeConfig(max_body_bytes=200_000, max_inflight_body_bytes=300_000))
    state = app.state.serve
    with LiveServer(app) as live:
        port = int(live.url.rsplit(":", 1)[1])
        stalled = []
        try:
            for _ in range(2):  # two uploads of 150 kB of their 200 kB, then silence
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                stalled.append(s)
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                          b"Content-Length: 200000\r\n\r\n" + bytes(150_000))
            deadline = time.monotonic() + 5
            while state.inflight_body_bytes < 300_000 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert state.inflight_body_bytes == 300_000
            r = httpx.post(live.url + "/v1/predict", content=bytes(100_000), timeout=10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy", r.text
            assert r.headers["retry-after"] == "1"
        finally:
            for s in stalled:
                s.close()
        deadline = time.monotonic() + 5
        while state.inflight_body_bytes and time.monotonic() < deadline:  # released once answered (499)
            time.sleep(0.02)
        assert state.inflight_body_bytes == 0
        assert httpx.post(live.url + "/v1/predict", content=photo, timeout=10).status_code == 200


def test_inflight_body_limit_is_validated() -> None:
    with pytest.raises(ValueError, match="max_inflight_body_bytes"):
        ServeConfig(max_body_bytes=1000, max_inflight_body_bytes=999)
