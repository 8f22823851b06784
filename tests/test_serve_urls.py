"""URL inputs of the HTTP service: its url_* settings, the service's use of the library's one fetcher
(speciesclf.sources.fetch, tested on its own in tests/test_fetch.py), and the live server fetching from a local
origin server on 127.0.0.1 that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from speciesclf.serve import ServeConfig  # noqa: E402
from speciesclf.serve._fetch import ServiceFetcher, url_policy  # noqa: E402
from speciesclf.serve._images import ApiError  # noqa: E402
from url_origin import FakeDNS, Origin, jpeg  # noqa: E402


# --- the settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"url_inputs": True}, {"url_inputs": 1, "url_allow_hosts": ("a.com",)},
    {"url_allow_hosts": "example.com"}, {"url_allow_hosts": ("http://example.com/",)},
    {"url_allow_hosts": ("a*.com",)}, {"url_allow_networks": ("10.0.0.1/8",)},
    {"url_allow_networks": ("not-a-net",)}, {"url_timeout_s": 0}, {"url_read_timeout_s": -1},
    {"url_max_redirects": -1}, {"url_max_bytes": 0}, {"url_max_concurrent": 0},
])
def test_url_settings_are_validated_up_front(kwargs) -> None:
    with pytest.raises(ValueError, match="ServeConfig.url_"):
        ServeConfig(**kwargs)


def test_url_inputs_are_off_by_default() -> None:
    c = ServeConfig()
    assert c.url_inputs is False and c.url_allow_hosts == () and c.url_allow_networks == ()


# --- the service's fetcher: the library's, with the service's errors and deadline --------------------------


def config(**kw) -> ServeConfig:
    base = dict(url_inputs=True, url_allow_hosts=("*",), url_read_timeout_s=1.0, url_timeout_s=3.0)
    return ServeConfig(**{**base, **kw})


def test_the_url_settings_are_the_fetchers_policy() -> None:
    cfg = config(url_allow_hosts=("Images.Example.com", "*.cdn.example"), url_allow_networks=("10.20.0.0/16",),
                 url_connect_timeout_s=1.5, url_max_redirects=2, url_max_bytes=12345, url_max_length=100)
    policy = url_policy(cfg)
    assert policy.allow_hosts == ("images.example.com", "*.cdn.example")
    assert policy.allow_networks == ("10.20.0.0/16",)
    assert (policy.connect_timeout_s, policy.read_timeout_s, policy.timeout_s) == (1.5, 1.0, 3.0)
    assert (policy.max_redirects, policy.max_bytes, policy.max_length) == (2, 12345, 100)
    assert ServiceFetcher(cfg).fetcher.policy == policy


def service_fetch(fetcher: ServiceFetcher, url, timeout_s: float = 5.0) -> bytes:
    return asyncio.run(fetcher.fetch(url, timeout_s))


def service_refused(fetcher: ServiceFetcher, url, timeout_s: float = 5.0) -> ApiError:
    with pytest.raises(ApiError) as e:
        service_fetch(fetcher, url, timeout_s)
    return e.value


def test_the_service_answers_url_errors_from_the_one_table() -> None:
    image = jpeg()
    with Origin(image) as origin:
        dns = FakeDNS({"intranet.example": ["10.1.2.3"], "public.example": ["93.184.215.14"]}, origin.port)
        fetcher = ServiceFetcher(config(url_max_bytes=2**16), resolver=dns.resolve, connector=dns.connect)
        e = service_refused(fetcher, "http://intranet.example/cat.jpg")
        assert (e.status, e.code) == (400, "url_not_allowed") and e.message.startswith("url: ")
        e = service_refused(fetcher, "http://public.example/missing")
        assert (e.status, e.code) == (400, "url_fetch_failed") and "404" in e.message
        e = service_refused(fetcher, "http://public.example/big")
        assert (e.status, e.code) == (413, "image_too_large")
        for not_a_url in (None, 7, ""):
            assert (service_refused(fetcher, not_a_url).status, service_refused(fetcher, not_a_url).code) == (
                422, "invalid_request")
        assert service_fetch(fetcher, "http://public.example/cat.jpg") == image
        e = service_refused(fetcher, "http://public.example/slow-start", timeout_s=0.2)
        assert (e.status, e.code) == (503, "deadline_exceeded")  # the request's deadline, not the fetch's


# --- the live server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clf(species100):
    return species100


@pytest.fixture(scope="module")
def photo(sample_photos: list[Path], clf) -> tuple[bytes, str]:
    data = sample_photos[0].read_bytes()
    return data, clf.predict(data).label


@pytest.fixture(scope="module")
def origin(photo):
    with Origin(photo[0]) as o:
        yield o


@pytest.fixture(scope="module")
def server(clf):
    from serve_server import LiveServer

    from speciesclf.serve import create_app

    # Loopback is refused by default: the test allows exactly 127.0.0.1 (where the origin listens).
    cfg = ServeConfig(url_inputs=True, url_allow_networks=("127.0.0.1/32",),
                      url_allow_hosts=("127.0.0.1", "127.0.0.2", "10.0.0.1", "169.254.169.254", "::1",
                                       "::ffff:169.254.169.254", "0.0.0.0", "224.0.0.1"),
                      url_max_bytes=2**20, url_read_timeout_s=0.5, url_timeout_s=1.5, url_max_redirects=3)
    with LiveServer(create_app(clf, cfg)) as live:
        yield live


def _url_cases(base: str, port: int) -> list[tuple[str, int, str]]:
    redirect = lambda to: f"{base}/redirect?to={quote(to, safe='')}"  # noqa: E731
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    not_allowed = [
        "ftp://127.0.0.1/cat.jpg", "file:///etc/passwd", "gopher://127.0.0.1:70/", "javascript:alert(1)",
        "//127.0.0.1/cat.jpg", "http://", "http:///cat.jpg", f"http://user:pw@127.0.0.1:{port}/cat.jpg",
        "http://example.com/cat.jpg", f"http://localhost:{port}/cat.jpg", "http://10.0.0.1/cat.jpg",
        "http://169.254.169.254/latest/meta-data/", f"http://127.0.0.2:{port}/cat.jpg",
        f"http://[::1]:{port}/cat.jpg", "http://[::ffff:169.254.169.254]/", "http://0.0.0.0/",
        "http://224.0.0.1/", f"http://127.0.0.1:{port}/cat.jpg\r\nX-Injected: 1", "http://127.0.0.1:99999/",
        "http://" + "a" * 3000 + ".com/",
        redirect("http://10.0.0.1/cat.jpg"), redirect("http://169.254.169.254/latest/meta-data/iam"),
        redirect("ftp://127.0.0.1/cat.jpg"), redirect("http://example.com/"),
        redirect(f"http://127.0.0.2:{port}/cat.jpg"), redirect(f"http://[::1]:{port}/cat.jpg"),
    ]
    cases = [(u, 400, "url_not_allowed") for u in not_allowed]
    cases += [(f"{base}/{p}", 400, "url_fetch_failed") for p in
              ("missing", "500", "loop", "chain/5", "no-location", "slow-start", "drip")]
    cases.append((f"http://127.0.0.1:{closed_port}/cat.jpg", 400, "url_fetch_failed"))
    cases += [(f"{base}/{p}", 413, "image_too_large") for p in ("big", "big-chunked", "huge-length")]
    cases.append((f"{base}/text", 415, "unsupported_format"))
    return cases


@pytest.mark.shared
def test_url_inputs_fetch_valid_images(server, origin, photo) -> None:
    data, label = photo
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("cat.jpg", "chunked.jpg", "nolength.jpg", "chain/3", "redirect?to=/cat.jpg"):
            r = c.post("/v1/predict", json={"url": f"{origin.base}/{path}", "top_k": 2})
            assert r.status_code == 200 and r.json()["label"] == label and len(r.json()["top_k"]) == 2, (path, r.text)
        items = c.post("/v1/predict/batch", json={"images": [
            {"url": f"{origin.base}/cat.jpg"}, base64.b64encode(data).decode(), {"url": "http://10.0.0.1/x.jpg"},
            {"url": f"{origin.base}/missing"}, {"url": f"{origin.base}/big"}]}).json()["predictions"]
        assert [i.get("label") or i["error"]["code"] for i in items] == [
            label, label, "url_not_allowed", "url_fetch_failed", "image_too_large"]
        both = c.post("/v1/predict", json={"url": f"{origin.base}/cat.jpg", "image": "QUJD"})
        assert both.status_code == 422 and both.json()["error"]["code"] == "invalid_request"


@pytest.mark.shared
def test_bad_urls_get_precise_4xx_while_valid_requests_keep_being_served(server, origin, photo) -> None:
    data, label = photo
    cases = _url_cases(origin.base, origin.port)
    assert len(cases) >= 35
    stop = threading.Event()
    good: list[tuple[int, str | None]] = []

    def valid_traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", content=data, headers={"content-type": "image/jpeg"})
                good.append((r.status_code, r.json().get("label")))

    def bad(case):
        url, status, code = case
        with httpx.Client(base_url=server.url, timeout=30) as c:
            t0 = time.perf_counter()
            r = c.post("/v1/predict", json={"url": url})
            return case, r.status_code, r.json().get("error", {}).get("code"), time.perf_counter() - t0

    feeder = threading.Thread(target=valid_traffic)
    feeder.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(bad, cases))
        # while slow origins hold fetches open, the event loop still answers at once
        with httpx.Client(base_url=server.url, timeout=30) as c:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                slow = [pool.submit(bad, (f"{origin.base}/drip", 400, "url_fetch_failed")) for _ in range(4)]
                time.sleep(0.3)
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                assert time.perf_counter() - t0 < 0.25
                answers += [f.result() for f in slow]
    finally:
        stop.set()
        feeder.join()
    wrong = [(case[0][:80], status, code) for case, status, code, _ in answers if (status, code) != case[1:]]
    assert not wrong
    assert max(seconds for *_, seconds in answers) < 1.5 + 1.0  # url_timeout_s bounds every fetch
    assert good and all(g == (200, label) for g in good), good[:5]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        m = c.get("/metrics").text
        assert 'speciesclf_errors_total{code="url_not_allowed"}' in m
        assert 'speciesclf_requests_total{route="/v1/predict",status="500"}' not in m


@pytest.mark.shared
def test_the_request_deadline_bounds_the_fetch(server, origin) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        # the client's deadline (300 ms) runs out first: 503, as for any request that cannot meet its deadline
        t0 = time.perf_counter()
        r = c.post("/v1/predict", json={"url": f"{origin.base}/drip"}, headers={"x-request-timeout-ms": "300"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "deadline_exceeded"
        assert time.perf_counter() - t0 < 0.3 + 0.4
        # the service's own fetch limit (url_timeout_s 1.5 s) runs out first: the fetch failed
        r = c.post("/v1/predict", json={"url": f"{origin.base}/drip"}, headers={"x-request-timeout-ms": "5000"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "url_fetch_failed"
