"""/metrics through prometheus_client (issue 12, item 14): the same metric names, per-stage histograms from
each prediction's timings, and multiprocess aggregation (counters of every worker, live gauges of live
workers only). The --workers 2 scrape that sums both workers is in test_serve.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

from serve_server import LiveServer, b64, jpeg  # noqa: E402
from speciesclf.serve import ServeConfig, create_app  # noqa: E402

STAGES = {"queue", "decode", "preprocess", "inference"}


def families(text: str) -> dict:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def sample(family, suffix: str, **labels: str) -> float:
    return sum(s.value for s in family.samples
               if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.shared
def test_metrics_keep_their_names_and_add_per_stage_histograms(species100) -> None:
    with LiveServer(create_app(species100, ServeConfig())) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        for _ in range(3):
            assert c.post("/v1/predict", content=jpeg()).status_code == 200
        assert c.post("/v1/predict/batch", json={"images": [b64(jpeg())] * 4}).status_code == 200
        assert c.post("/v1/predict", content=b"\x00junk").status_code == 415
        scrape = c.get("/metrics")
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    got = families(scrape.text)
    # The names the hand-written page had (prometheus_client names counters without their _total).
    for name, kind in [("speciesclf_requests", "counter"), ("speciesclf_request_duration_seconds", "histogram"),
                       ("speciesclf_batch_size", "histogram"), ("speciesclf_queue_depth", "gauge"),
                       ("speciesclf_inflight_images", "gauge"), ("speciesclf_errors", "counter"),
                       ("speciesclf_predictions", "counter"), ("speciesclf_model_info", "gauge"),
                       ("speciesclf_ready", "gauge"), ("speciesclf_stage_duration_seconds", "histogram")]:
        assert name in got and got[name].type == kind, (name, sorted(got))
    assert sample(got["speciesclf_requests"], "_total", route="/v1/predict", status="200") == 3
    assert sample(got["speciesclf_requests"], "_total", route="/v1/predict", status="415") == 1
    assert sample(got["speciesclf_errors"], "_total", code="unsupported_format") == 1
    assert sample(got["speciesclf_predictions"], "_total") == 7
    assert sample(got["speciesclf_model_info"], "", model="species100@1.0.0") == 1
    assert sample(got["speciesclf_ready"], "") == 1
    stages = got["speciesclf_stage_duration_seconds"]
    assert {s.labels["stage"] for s in stages.samples} == STAGES
    # The warm-up prediction runs outside the service's batches: 7 images, 4 requests queued.
    for stage in ("decode", "preprocess", "inference"):
        assert sample(stages, "_count", stage=stage) == 7, stage
        assert sample(stages, "_sum", stage=stage) > 0, stage
    assert sample(stages, "_count", stage="queue") == 4


MULTIPROCESS_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
    from prometheus_client.parser import text_string_to_metric_families
    from speciesclf.serve.metrics import Metrics

    def value(text, name, **labels):
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    children = []
    for n in (2, 3):
        pid = os.fork()
        if pid == 0:  # a worker: counts requests, holds queued images, then dies without saying so
            m = Metrics()
            for _ in range(n):
                m.request("/v1/predict", 200, 0.01)
            m.queue_depth = 5
            m.ready = True
            m.model = "dead@1"
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    alive = Metrics()
    alive.request("/v1/predict", 200, 0.02)
    alive.queue_depth = 1
    alive.model = "live@1"
    text = alive.render()
    print(value(text, "speciesclf_requests_total", route="/v1/predict", status="200"),
          value(text, "speciesclf_request_duration_seconds_count", route="/v1/predict"),
          value(text, "speciesclf_queue_depth"), value(text, "speciesclf_ready"),
          value(text, "speciesclf_model_info", model="dead@1"), value(text, "speciesclf_model_info", model="live@1"))
    """)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the script forks its workers")
def test_multiprocess_counters_sum_every_worker_and_live_gauges_only_live_ones(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run([sys.executable, "-c", MULTIPROCESS_SCRIPT], capture_output=True, text=True, timeout=120,
                          env=dict(env, TMPDIR=str(tmp_path)))
    assert done.returncode == 0, done.stderr[-2000:]
    requests, latency_count, queue_depth, ready, dead_model, live_model = map(float, done.stdout.split())
    assert (requests, latency_count) == (6, 6)  # 2 + 3 from the dead workers, 1 from the live one
    assert queue_depth == 1  # the dead workers' 5 + 5 queued images are gone with them
    assert ready == 0  # the live one is not ready
    assert (dead_model, live_model) == (0, 1)
