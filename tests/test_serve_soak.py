"""Soak: thousands of requests against the real server on loopback, and the process RSS must not trend upwards.

The server runs as its own process (``speciesclf serve``, as deployed), so its RSS is the service's
alone and not the test process's, whose memory the rest of the suite has shaped. RSS is sampled after a
tenth of the requests (the warm-up) and then after every further tenth.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

from PIL import Image  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.shared]

# 20,000 requests, each a real MobileNetV2 inference (SPECIESCLF_SOAK_REQUESTS changes the count).
TOTAL = int(os.environ.get("SPECIESCLF_SOAK_REQUESTS", "20000"))
STEP = TOTAL // 10  # RSS is sampled every STEP requests; the first STEP are the warm-up
CLIENTS = 4
TIME_LIMIT_S = float(os.environ.get("SPECIESCLF_SOAK_TIME_LIMIT_S", str(max(120.0, TOTAL * 0.025))))
MAX_GROWTH_MIB = 25.0  # last sample minus the post-warm-up sample
MAX_SLOPE_MIB_PER_1K = 0.5  # least-squares slope over the last half of the samples
MIB = 2**20


def _jpeg(size: int = 96) -> bytes:
    image = Image.new("RGB", (size, size))
    image.putdata([((x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256) for y in range(size) for x in range(size)])
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0, 1, 2..."""
    n = len(ys)
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


@pytest.fixture(scope="module")
def imagenet_server(shared_dir: Path, tmp_path_factory):
    """``speciesclf serve --model imagenet1k`` in its own process; yields (url, pid)."""
    import socket
    import subprocess
    import sys

    if not (shared_dir / "models" / "mobilenetv2-12-int8.onnx").is_file():
        pytest.fail(f"missing the model in {shared_dir / 'models'}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SPECIESCLF_WEIGHTS=str(shared_dir / "models"),
               SPECIESCLF_HOME=str(tmp_path_factory.mktemp("home")))
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "speciesclf", "serve", "--model", "imagenet1k", "--host", "127.0.0.1",
                               "--port", str(port), "--max-wait-ms", "2"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "the server exited at start-up"
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready in 60 s"
            time.sleep(0.1)
        yield url, server.pid
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_soak_rss_does_not_grow(imagenet_server) -> None:
    photo = _jpeg()
    photo_b64 = base64.b64encode(photo).decode()
    raw = {"content-type": "image/jpeg"}
    # (request kwargs, expected status, expected error code); every 25th request is one of these
    malformed = [
        ({"content": photo[: len(photo) // 2], "headers": raw}, 422, "decode_error"),
        ({"content": b"\x00not an image", "headers": raw}, 415, "unsupported_format"),
        ({"json": {"image": "@@not base64@@"}}, 400, "invalid_base64"),
        ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 422, "invalid_request"),
    ]
    url, pid = imagenet_server
    with httpx.Client(base_url=url, timeout=30) as c:
        first = c.post("/v1/predict", content=photo, headers=raw)
        assert first.status_code == 200, first.text
        label = first.json()["label"]

    clients = [httpx.Client(base_url=url, timeout=30) for _ in range(CLIENTS)]
    process = psutil.Process(pid)
    start = time.monotonic()

    def work(worker: int, lo: int, hi: int) -> list[str]:
        client, wrong = clients[worker], []
        for i in range(lo + worker, hi, CLIENTS):
            if i % 25 == 24:
                kwargs, status, code = malformed[(i // 25) % len(malformed)]
                r = client.post("/v1/predict", **kwargs)
                if r.status_code != status or r.json().get("error", {}).get("code") != code:
                    wrong.append(f"#{i}: {r.status_code} {r.text[:200]}")
            else:
                if i % 3:
                    r = client.post("/v1/predict", content=photo, headers=raw)
                else:
                    r = client.post("/v1/predict", json={"image": photo_b64, "top_k": 3})
                if r.status_code != 200 or r.json()["label"] != label:
                    wrong.append(f"#{i}: {r.status_code} {r.text[:200]}")
        return wrong

    series: list[tuple[int, float]] = []  # (requests done, RSS MiB)
    try:
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            for lo in range(0, TOTAL, STEP):
                futures = [pool.submit(work, w, lo, lo + STEP) for w in range(CLIENTS)]
                wrong = [w for f in futures for w in f.result()]
                assert not wrong, wrong[:5]
                series.append((lo + STEP, process.memory_info().rss / MIB))
                elapsed = time.monotonic() - start
                print(f"[soak] {lo + STEP:6d} requests  {elapsed:6.1f} s  RSS {series[-1][1]:8.1f} MiB", flush=True)
                assert elapsed < TIME_LIMIT_S, f"soak took over {TIME_LIMIT_S} s after {lo + STEP} requests"
    finally:
        for client in clients:
            client.close()

    elapsed = time.monotonic() - start
    rss = [m for _, m in series]
    half = rss[len(rss) // 2:]
    slope = _slope(half) / (STEP / 1000)  # MiB per 1,000 requests
    print(f"[soak] {TOTAL} requests in {elapsed:.1f} s ({TOTAL / elapsed:.0f}/s); RSS MiB after each "
          f"{STEP}: {[round(m, 1) for m in rss]}; growth since warm-up {rss[-1] - rss[0]:+.1f} MiB; "
          f"slope over the last half {slope:+.3f} MiB per 1,000 requests")
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        m = c.get("/metrics").text
        assert "speciesclf_queue_depth 0" in m or "speciesclf_queue_depth 0.0" in m, m
    assert rss[-1] - rss[0] < MAX_GROWTH_MIB, rss
    assert slope < MAX_SLOPE_MIB_PER_1K, (slope, rss)
