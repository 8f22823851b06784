"""speciesclf.model.weights: finding, verifying and downloading the pinned weights.

Everything runs offline against a local HTTP server on 127.0.0.1 that serves a small random payload under
a fake WeightsSpec; only the `shared` test touches the real model, through $SPECIESCLF_WEIGHTS.
Every test gets its own SPECIESCLF_HOME, so nothing is written to the real ~/.cache.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
from pathlib import Path

import pytest

from speciesclf.sources import fetch
from speciesclf.sources.fetch import UrlPolicy
from speciesclf.model import weights as W
from speciesclf.model.weights import MOBILENETV2_INT8, WeightsError, WeightsSpec, cache_dir, weights_path
from url_origin import record_connects

# The test server listens on loopback, which downloads refuse unless their policy allows it.
LOOPBACK = UrlPolicy(allow_networks=("127.0.0.1/32",))

PAYLOAD = os.urandom(40_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
CORRUPT = bytes([PAYLOAD[0] ^ 0xFF]) + PAYLOAD[1:]
FILENAME = "fake-model.onnx"


def fake_spec(*urls: str) -> WeightsSpec:
    return WeightsSpec(filename=FILENAME, sha256=PAYLOAD_SHA, size=len(PAYLOAD), urls=urls)


def download(spec: WeightsSpec, **kwargs) -> Path:
    return weights_path(spec, url_policy=LOOPBACK, **kwargs)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):  # keep the test output clean
        pass

    def _send(self, body: bytes, *, status: int = 200, length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        state = self.server
        state.requests.append(self.path)
        path = self.path
        try:
            if path == "/good":
                self._send(PAYLOAD)
            elif path == "/corrupt":
                self._send(CORRUPT)
            elif path == "/truncated":
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            elif path == "/missing":
                self._send(b"not found", status=404)
            elif path == "/redirect":
                self._redirect("/good")
            elif path == "/redirect-absolute":
                self._redirect(f"{state.base}/good", 301)
            elif path.startswith("/chain/"):
                hops = int(path.rsplit("/", 1)[1])
                self._redirect(f"/chain/{hops - 1}" if hops > 0 else "/good", 307)
            elif path == "/loop":
                self._redirect("/loop")
            elif path == "/to-file":
                self._redirect("file:///etc/passwd")
            elif path == "/to-ftp":
                self._redirect("ftp://127.0.0.1/fake-model.onnx")
            elif path == "/to-private":
                self._redirect("http://10.0.0.1/fake-model.onnx")
            elif path == "/to-metadata":
                self._redirect("http://169.254.169.254/latest/meta-data/")
            elif path == "/slow-headers":
                state.stop.wait(10)
                self._send(PAYLOAD)
            elif path == "/slow-body":
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                self.wfile.write(PAYLOAD[:1000])
                self.wfile.flush()
                state.stop.wait(10)
                self.wfile.write(PAYLOAD[1000:])
            elif path == "/huge":
                self._send(os.urandom(len(PAYLOAD) * 3))
            elif path == "/huge-no-length":
                self._send(os.urandom(len(PAYLOAD) * 3), length=False)
            else:
                self._send(b"no such route", status=500)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as some tests mean it to


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[str] = []
        self.stop = threading.Event()
        self.base = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, route: str) -> str:
        return self.base + route

    def handle_error(self, request, client_address):
        pass  # a client that hung up mid-response is expected here

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()
        self._thread.join(5)


@pytest.fixture
def server():
    srv = _Server()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    home = tmp_path / "speciesclf-home"
    monkeypatch.setenv("SPECIESCLF_HOME", str(home))
    monkeypatch.delenv("SPECIESCLF_WEIGHTS", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    return home


def weights_dir() -> Path:
    return cache_dir() / "weights"


def cache_entries() -> list[str]:
    folder = weights_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_cached() -> Path:
    target = weights_dir() / FILENAME
    assert target.read_bytes() == PAYLOAD
    assert cache_entries() == [FILENAME], "temporary files left behind"
    return target


# --- download ------------------------------------------------------------------------------------------


def test_download_then_cache_hit(server):
    spec = fake_spec(server.url("/good"))
    path = download(spec, timeout=5)
    assert path == weights_dir() / FILENAME
    assert_cached()
    assert server.requests == ["/good"]
    assert path.stat().st_mode & 0o444 == 0o444
    server.close()  # no network from now on: the cache must answer
    assert download(spec, timeout=5) == path
    assert download(spec, download=False) == path


def test_cache_hit_makes_no_request(server):
    weights_dir().mkdir(parents=True)
    (weights_dir() / FILENAME).write_bytes(PAYLOAD)
    assert download(fake_spec(server.url("/good")), timeout=5) == weights_dir() / FILENAME
    assert server.requests == []


def test_corrupt_cache_is_refetched(server):
    weights_dir().mkdir(parents=True)
    (weights_dir() / FILENAME).write_bytes(CORRUPT)
    path = download(fake_spec(server.url("/good")), timeout=5)
    assert path == assert_cached()
    assert server.requests == ["/good"]


def test_corrupt_cache_without_download_is_removed(server):
    weights_dir().mkdir(parents=True)
    (weights_dir() / FILENAME).write_bytes(PAYLOAD[:-1])
    with pytest.raises(WeightsError, match="download=False") as info:
        download(fake_spec(server.url("/good")), download=False)
    assert "SPECIESCLF_WEIGHTS=" in str(info.value)
    assert cache_entries() == []
    assert server.requests == []


def test_hash_mismatch_leaves_nothing(server):
    with pytest.raises(WeightsError) as info:
        download(fake_spec(server.url("/corrupt")), timeout=5)
    message = str(info.value)
    assert PAYLOAD_SHA in message and hashlib.sha256(CORRUPT).hexdigest() in message
    assert "SPECIESCLF_WEIGHTS=" in message
    assert cache_entries() == []


def test_truncated_body_is_rejected(server):
    with pytest.raises(WeightsError):
        download(fake_spec(server.url("/truncated")), timeout=5)
    assert cache_entries() == []


def test_404_falls_back_to_the_next_url(server):
    path = download(fake_spec(server.url("/missing"), server.url("/corrupt"), server.url("/good")), timeout=5)
    assert path == assert_cached()
    assert server.requests == ["/missing", "/corrupt", "/good"]


def test_every_url_failing_says_why_and_what_to_do(server):
    with pytest.raises(WeightsError) as info:
        download(fake_spec(server.url("/missing"), server.url("/corrupt")), timeout=5)
    message = str(info.value)
    assert "404" in message and "sha256 mismatch" in message
    assert server.url("/missing") in message and server.url("/corrupt") in message
    assert f"SPECIESCLF_WEIGHTS=/path/to/{FILENAME}" in message and "../shared/models" in message
    assert cache_entries() == []


def test_no_urls(server):
    with pytest.raises(WeightsError, match="SPECIESCLF_WEIGHTS"):
        download(fake_spec(), timeout=5)


@pytest.mark.parametrize("route", ["/redirect", "/redirect-absolute", "/chain/4"])
def test_redirects_are_followed(server, route):
    assert download(fake_spec(server.url(route)), timeout=5) == assert_cached()
    assert server.requests[-1] == "/good"


@pytest.mark.parametrize("route", ["/chain/5", "/loop"])
def test_too_many_redirects(server, route):
    with pytest.raises(WeightsError, match="(?i)redirect"):
        download(fake_spec(server.url(route)), timeout=5)
    assert len(server.requests) <= W.MAX_REDIRECTS + 1
    assert cache_entries() == []


@pytest.mark.parametrize("route", ["/to-file", "/to-ftp"])
def test_redirect_off_http_is_refused(server, route):
    with pytest.raises(WeightsError, match="(?i)redirect"):
        download(fake_spec(server.url(route)), timeout=5)
    assert cache_entries() == []


def test_non_http_urls_are_not_tried(tmp_path):
    local = tmp_path / "model.onnx"
    local.write_bytes(PAYLOAD)
    with pytest.raises(WeightsError, match="unsupported URL scheme"):
        download(fake_spec(local.as_uri(), "ftp://127.0.0.1/x"), timeout=5)
    assert cache_entries() == []


@pytest.mark.parametrize("route", ["/slow-headers", "/slow-body"])
def test_slow_server_times_out(server, route):
    start = time.monotonic()
    with pytest.raises(WeightsError, match="timed out"):
        download(fake_spec(server.url(route)), timeout=0.5)
    assert time.monotonic() - start < 3
    assert cache_entries() == []


def test_slow_server_falls_back(server):
    path = download(fake_spec(server.url("/slow-headers"), server.url("/good")), timeout=0.5)
    assert path == assert_cached()


@pytest.mark.parametrize("route", ["/huge", "/huge-no-length"])
def test_oversized_body_is_rejected(server, route):
    with pytest.raises(WeightsError, match="cap"):
        download(fake_spec(server.url(route)), timeout=5)
    assert cache_entries() == []


def test_concurrent_downloads(server):
    spec = fake_spec(server.url("/good"))
    barrier = threading.Barrier(8)
    results: list[object] = []

    def fetch():
        barrier.wait()
        try:
            results.append(download(spec, timeout=5))
        except Exception as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [weights_dir() / FILENAME] * 8
    assert_cached()


def test_unwritable_cache_is_a_weights_error(tmp_path, monkeypatch, server):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("SPECIESCLF_HOME", str(blocker / "home"))
    with pytest.raises(WeightsError, match="cache folder"):
        download(fake_spec(server.url("/good")), timeout=5)


def test_the_default_policy_refuses_loopback_without_a_request(server):
    with pytest.raises(WeightsError, match="refused address") as info:
        weights_path(fake_spec(server.url("/good")), timeout=5)
    assert "loopback" in str(info.value)
    assert server.requests == [] and cache_entries() == []


@pytest.mark.parametrize("route", ["/to-private", "/to-metadata"])
def test_a_redirect_to_a_private_address_is_refused_without_connecting(server, route, monkeypatch):
    connected = record_connects(monkeypatch)
    with pytest.raises(WeightsError, match="redirect .* refused") as info:
        download(fake_spec(server.url(route)), timeout=5)
    assert "refused address" in str(info.value)
    assert server.requests == [route] and set(connected) == {"127.0.0.1"}
    assert cache_entries() == []


def test_downloads_go_through_the_one_url_fetcher(server, monkeypatch):
    fetched: list[tuple[str, UrlPolicy]] = []
    real = fetch.UrlFetcher.fetch_into

    async def spy(self, url, sink, **kwargs):
        fetched.append((url, self.policy))
        return await real(self, url, sink, **kwargs)

    monkeypatch.setattr(fetch.UrlFetcher, "fetch_into", spy)
    download(fake_spec(server.url("/good")), timeout=5)
    [(url, policy)] = fetched
    assert url == server.url("/good")
    assert policy.max_bytes == 2 * len(PAYLOAD) and policy.max_redirects == W.MAX_REDIRECTS
    assert policy.allow_networks == ("127.0.0.1/32",) and policy.read_timeout_s == 5


# --- $SPECIESCLF_WEIGHTS -------------------------------------------------------------------------------


def test_env_file(tmp_path, monkeypatch, server):
    local = tmp_path / "any-name.bin"
    local.write_bytes(PAYLOAD)
    monkeypatch.setenv("SPECIESCLF_WEIGHTS", str(local))
    assert download(fake_spec(server.url("/good")), timeout=5) == local
    assert server.requests == [] and cache_entries() == []


def test_env_directory(tmp_path, monkeypatch, server):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / FILENAME).write_bytes(PAYLOAD)
    monkeypatch.setenv("SPECIESCLF_WEIGHTS", str(folder))
    assert download(fake_spec(server.url("/good")), timeout=5) == folder / FILENAME
    assert server.requests == [] and cache_entries() == []


def test_env_wrong_hash(tmp_path, monkeypatch, server):
    local = tmp_path / FILENAME
    local.write_bytes(CORRUPT)
    monkeypatch.setenv("SPECIESCLF_WEIGHTS", str(local))
    with pytest.raises(WeightsError) as info:
        download(fake_spec(server.url("/good")), timeout=5)
    message = str(info.value)
    assert PAYLOAD_SHA in message and hashlib.sha256(CORRUPT).hexdigest() in message
    assert server.requests == [] and cache_entries() == []  # an explicit setting is not overridden


@pytest.mark.parametrize("form", ["missing file", "folder without the file"])
def test_env_missing(tmp_path, monkeypatch, server, form):
    target = tmp_path / "nothing-here.onnx" if form == "missing file" else tmp_path
    monkeypatch.setenv("SPECIESCLF_WEIGHTS", str(target))
    with pytest.raises(WeightsError, match="no such file"):
        download(fake_spec(server.url("/good")), timeout=5)
    assert server.requests == []


def test_env_beats_a_good_cache(tmp_path, monkeypatch):
    weights_dir().mkdir(parents=True)
    (weights_dir() / FILENAME).write_bytes(PAYLOAD)
    local = tmp_path / "elsewhere.onnx"
    local.write_bytes(PAYLOAD)
    monkeypatch.setenv("SPECIESCLF_WEIGHTS", str(local))
    assert download(fake_spec()) == local


# --- cache folder and the spec -------------------------------------------------------------------------


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECIESCLF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "home"
    monkeypatch.delenv("SPECIESCLF_HOME")
    assert cache_dir() == tmp_path / "xdg" / "speciesclf"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cache_dir() == tmp_path / "user" / ".cache" / "speciesclf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "user" / ".cache" / "speciesclf"


def test_default_spec():
    spec = MOBILENETV2_INT8
    assert spec.filename == "mobilenetv2-12-int8.onnx"
    assert spec.sha256 == "83530ad811bc31d2b60a5599a21265a5057608c9b044b4ee758cc22f2309f54f"
    assert spec.size == 3_655_640
    assert spec.urls[0] == (
        "https://github.com/onnx/models/raw/main/validated/vision/classification/mobilenet/model/"
        "mobilenetv2-12-int8.onnx"
    )
    assert all(url.startswith("https://") and url.endswith("/" + spec.filename) for url in spec.urls)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"filename": "../escape.onnx"},
        {"filename": ""},
        {"sha256": "abc"},
        {"size": 0},
        {"size": True},
    ],
)
def test_spec_validation(kwargs):
    fields = {"filename": FILENAME, "sha256": PAYLOAD_SHA, "size": len(PAYLOAD)} | kwargs
    with pytest.raises(ValueError):
        WeightsSpec(**fields)


def test_spec_urls_must_be_a_sequence():
    with pytest.raises(TypeError):
        WeightsSpec(FILENAME, PAYLOAD_SHA, len(PAYLOAD), urls="http://127.0.0.1/x")


def test_bad_timeout():
    with pytest.raises(ValueError):
        download(fake_spec(), timeout=0)


# --- the real model, from the shared assets ------------------------------------------------------------


@pytest.mark.shared
def test_real_model_from_shared_assets(shared_dir, monkeypatch):
    models = shared_dir / "models"
    model = models / MOBILENETV2_INT8.filename
    assert model.is_file(), f"{model} is missing from the shared assets"
    for setting in (models, model):
        monkeypatch.setenv("SPECIESCLF_WEIGHTS", str(setting))
        path = weights_path(download=False)
        assert path == model.absolute()
        assert path.stat().st_size == MOBILENETV2_INT8.size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == MOBILENETV2_INT8.sha256
    assert cache_entries() == []
