"""The service's Prometheus metrics, through prometheus_client.

Each app has its own registry, so several apps in one process never share counts. Under
``speciesclf serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set before the worker imported
prometheus_client, as :func:`speciesclf.serve.run` does) every worker writes its values to files there and
a scrape of any worker reads them all: counters and histograms sum every worker that ever ran, gauges
count the live workers only (the files of a worker that died without saying so are dropped at the next
scrape).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

__all__ = ["Metrics", "LATENCY_BUCKETS", "BATCH_BUCKETS", "STAGE_BUCKETS"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Prediction.timings key -> the stage label; "queue" is measured by the batcher.
_TIMED_STAGES = (("decode_ms", "decode"), ("preprocess_ms", "preprocess"), ("inference_ms", "inference"))
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db$")


def _multiprocess_dir() -> str | None:
    """The folder of multiprocess mode, if prometheus_client chose it (that happens when it is imported)."""
    if getattr(values.ValueClass, "_multiprocess", False):
        return os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return None


class Metrics:
    """The service's counters, histograms and gauges; :meth:`render` gives the /metrics page.

    The names are those of the page the service always had: ``speciesclf_requests_total{route,status}``,
    ``speciesclf_request_duration_seconds{route}``, ``speciesclf_batch_size``, ``speciesclf_queue_depth``,
    ``speciesclf_inflight_images``, ``speciesclf_errors_total{code}``, ``speciesclf_predictions_total{label}``,
    ``speciesclf_model_info{model}``, ``speciesclf_ready``; and ``speciesclf_stage_duration_seconds{stage}``
    (queue, decode, preprocess, inference).

    Serving a Deployment (a rollout), :meth:`observe_rollout` is its observer and adds, per version and arm,
    ``speciesclf_version_images_total``, ``speciesclf_version_errors_total`` and
    ``speciesclf_version_call_duration_seconds``; per candidate version ``speciesclf_rollout_compared_total``,
    ``speciesclf_rollout_disagreements_total``, ``speciesclf_rollout_shed_total`` and
    ``speciesclf_rollout_fallbacks_total``; the gauges ``speciesclf_rollout_weight`` and
    ``speciesclf_rollout_gate_llr{gate}``; and ``speciesclf_rollout_verdicts_total{verdict}`` (each process
    counts the verdicts it decided, so the sum over workers counts each verdict once)."""

    content_type = CONTENT_TYPE_PLAIN_0_0_4

    def __init__(self, prefix: str = "speciesclf") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._dir = _multiprocess_dir()
        r = self.registry
        self._requests = Counter(f"{prefix}_requests", "HTTP requests by route and status code.",
                                 ("route", "status"), registry=r)
        self._latency = Histogram(f"{prefix}_request_duration_seconds", "HTTP request latency by route.",
                                  ("route",), buckets=LATENCY_BUCKETS, registry=r)
        self._batch = Histogram(f"{prefix}_batch_size", "Images per inference call.", buckets=BATCH_BUCKETS,
                                registry=r)
        self._stages = Histogram(f"{prefix}_stage_duration_seconds",
                                 "Seconds per request waiting in the queue (stage=queue), and per image decoding, "
                                 "preprocessing and in inference (its share of the batch).",
                                 ("stage",), buckets=STAGE_BUCKETS, registry=r)
        self._errors = Counter(f"{prefix}_errors", "Error responses (whole requests or batch items) by error code.",
                               ("code",), registry=r)
        self._predictions = Counter(f"{prefix}_predictions", "Predictions returned, by top label.", ("label",),
                                    registry=r)
        # Live gauges: with several workers, the queues and the images in inference of the live ones add up; the
        # service is ready when every live worker is; a model is served if any live worker serves it.
        self._queue_depth = Gauge(f"{prefix}_queue_depth", "Images waiting for inference.", registry=r,
                                  multiprocess_mode="livesum")
        self._in_flight = Gauge(f"{prefix}_inflight_images", "Images in the running inference call.", registry=r,
                                multiprocess_mode="livesum")
        self._model_info = Gauge(f"{prefix}_model_info", "The model being served (name@version).", ("model",),
                                 registry=r, multiprocess_mode="livemax")
        self._ready = Gauge(f"{prefix}_ready", "1 once the model is loaded and warmed up.", registry=r,
                            multiprocess_mode="livemin")
        versioned = ("version", "arm")
        self._version_images = Counter(f"{prefix}_version_images", "Images answered (or, in a shadow, copied) per "
                                       "model version and arm.", versioned, registry=r)
        self._version_errors = Counter(f"{prefix}_version_errors", "Images a version failed on (the primary then "
                                       "answered those of a candidate), per version and arm.", versioned, registry=r)
        self._version_latency = Histogram(f"{prefix}_version_call_duration_seconds", "Seconds per inference call, per "
                                          "model version and arm.", versioned, buckets=STAGE_BUCKETS, registry=r)
        self._compared = Counter(f"{prefix}_rollout_compared", "Images both versions answered, compared, per "
                                 "candidate version.", ("version",), registry=r)
        self._disagreements = Counter(f"{prefix}_rollout_disagreements", "Compared images whose top-1 differed, per "
                                      "candidate version.", ("version",), registry=r)
        self._shed = Counter(f"{prefix}_rollout_shed", "Images not compared because the comparison queue was full, "
                             "per candidate version.", ("version",), registry=r)
        self._fallbacks = Counter(f"{prefix}_rollout_fallbacks", "Candidate requests that failed and were answered "
                                  "by the primary, per candidate version.", ("version",), registry=r)
        self._verdicts = Counter(f"{prefix}_rollout_verdicts", "Rollout verdicts (start, advance, promote, "
                                 "rollback, pause, ...) decided by this service.", ("verdict",), registry=r)
        # Every worker reads the same shared rollout state: the live workers' largest value is that value.
        self._weight = Gauge(f"{prefix}_rollout_weight", "The share of routing keys sent to the candidate (0..1).",
                             registry=r, multiprocess_mode="livemax")
        self._gate_llr = Gauge(f"{prefix}_rollout_gate_llr", "Each gate's log-likelihood ratio (it trips at "
                               "ln(1/alpha)).", ("gate",), registry=r, multiprocess_mode="livemax")
        # Capture (docs/capture.md): the store's own counts, brought here at each scrape (capture_stats).
        self._captured = Counter(f"{prefix}_capture_records", "Predictions queued for the capture store.", registry=r)
        self._capture_dropped = Counter(f"{prefix}_capture_dropped", "Captures dropped: the store's queue was full, "
                                        "or the store failed to take them.", registry=r)
        self._capture_write_errors = Counter(f"{prefix}_capture_write_errors", "Capture writes that failed (capture "
                                             "then turns itself off).", registry=r)
        self._capture_enabled = Gauge(f"{prefix}_capture_enabled", "1 while the capture store takes records.",
                                      registry=r, multiprocess_mode="livemin")
        self._capture_queue = Gauge(f"{prefix}_capture_queue_depth", "Captures waiting for the store's writer.",
                                    registry=r, multiprocess_mode="livesum")
        self._feedback = Counter(f"{prefix}_feedback", "Feedback labels accepted, per source.", ("source",),
                                 registry=r)
        self._feedback_accuracy = Gauge(f"{prefix}_feedback_accuracy", "The share of labelled predictions the model "
                                        "got right (resolved feedback labels), per version and arm.",
                                        versioned, registry=r, multiprocess_mode="livemax")
        self._capture_seen = {"captured": 0, "dropped": 0, "write_errors": 0}
        self.capture_failures = 0  # captures the store raised on (counted as dropped)
        self._rollout: Any = None  # the Deployment observed
        self._verdicts_seen: dict[str, int] = {}
        self._fallbacks_seen = 0
        self._last_candidate = "none"
        # The label children of the hot path, looked up once (prometheus_client's .labels() takes a lock).
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._error_children: dict[str, Any] = {}
        self._prediction_children: dict[str, Any] = {}  # at most one per class of the model, and "unknown"
        self._stage_children = {stage: self._stages.labels(stage) for stage in ("queue", "decode", "preprocess",
                                                                                 "inference")}
        self._queued = 0
        self._inflight = 0
        self._model = ""
        self._is_ready = False
        self.predictions_returned = 0  # in this process, for tests and Retry-After estimates

    # --- gauges as attributes, which the batcher updates -------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._queued

    @queue_depth.setter
    def queue_depth(self, n: int) -> None:
        self._queued = n
        self._queue_depth.set(n)

    @property
    def in_flight(self) -> int:
        return self._inflight

    @in_flight.setter
    def in_flight(self, n: int) -> None:
        self._inflight = n
        self._in_flight.set(n)

    @property
    def model(self) -> str:
        return self._model

    @model.setter
    def model(self, name: str) -> None:
        if name == self._model:
            return
        if self._model:
            self._model_info.labels(self._model).set(0)
        self._model = name
        if name:
            self._model_info.labels(name).set(1)

    @property
    def ready(self) -> bool:
        return self._is_ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._is_ready = bool(value)
        self._ready.set(int(self._is_ready))

    # --- events ----------------------------------------------------------------------------------------

    def request(self, route: str, status: int, seconds: float) -> None:
        children = self._request_children.get((route, status))
        if children is None:
            children = self._request_children[(route, status)] = (self._requests.labels(route, str(status)),
                                                                  self._latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def batch(self, size: int) -> None:
        self._batch.observe(size)

    def queue_wait(self, seconds: float) -> None:
        self._stage_children["queue"].observe(seconds)

    def stages(self, predictions: Iterable[Any]) -> None:
        """Each prediction's own timings (its decoding; its share of the batch's preprocessing and inference)."""
        children = self._stage_children
        for p in predictions:
            timings = getattr(p, "timings", None) or {}
            for key, stage in _TIMED_STAGES:
                ms = timings.get(key)
                if ms is not None and (stage != "inference" or p.error is None):
                    children[stage].observe(ms / 1000)

    def error(self, code: str) -> None:
        child = self._error_children.get(code)
        if child is None:
            child = self._error_children[code] = self._errors.labels(code)
        child.inc()

    def prediction(self, label: str) -> None:
        child = self._prediction_children.get(label)
        if child is None:
            child = self._prediction_children[label] = self._predictions.labels(label)
        child.inc()
        self.predictions_returned += 1

    # --- capture ---------------------------------------------------------------------------------------

    def capture_stats(self, stats: dict[str, Any] | None) -> None:
        """The capture store's ``stats()`` (None: capture off): counters move by what is new since the last."""
        if stats is None:
            self._capture_enabled.set(0)
            return
        totals = {"captured": stats.get("captured", 0), "write_errors": stats.get("write_errors", 0),
                  "dropped": stats.get("dropped", 0) + self.capture_failures}
        for name, counter in (("captured", self._captured), ("dropped", self._capture_dropped),
                              ("write_errors", self._capture_write_errors)):
            new = totals[name] - self._capture_seen[name]
            if new > 0:
                counter.inc(new)
            self._capture_seen[name] = totals[name]
        self._capture_enabled.set(int(bool(stats.get("enabled"))))
        self._capture_queue.set(stats.get("queue_depth", 0))

    def feedback(self, source: str, version: str | None, arm: str | None, accuracy: float | None) -> None:
        self._feedback.labels(source).inc()
        if accuracy is not None:
            self._feedback_accuracy.labels(version or "", arm or "primary").set(accuracy)

    # --- a rollout ---------------------------------------------------------------------------------------

    def watch(self, deployment: Any) -> None:
        """Observe ``deployment``: its events come to :meth:`observe_rollout` (another observer it had is kept)."""
        self._rollout = deployment
        previous = deployment.observer
        if previous == self.observe_rollout:  # built with this observer already
            return
        if previous is None:
            deployment.observer = self.observe_rollout
        else:
            def both(event: str, **fields: Any) -> None:
                self.observe_rollout(event, **fields)
                previous(event, **fields)

            deployment.observer = both

    def observe_rollout(self, event: str, **fields: Any) -> None:
        """A Deployment's observer: ``batch``, ``shed``, ``compare``, ``verdicts`` and ``sync`` events. Never
        raises: a metric must not fail the request it counts."""
        try:
            self._observe(event, fields)
        except Exception:  # noqa: BLE001
            pass

    def _observe(self, event: str, fields: dict) -> None:
        if event == "batch":
            key = (fields["version"], fields["arm"])
            if fields["arm"] == "candidate":
                self._last_candidate = fields["version"]
            self._version_images.labels(*key).inc(fields["images"])
            if fields["errors"]:
                self._version_errors.labels(*key).inc(fields["errors"])
            self._version_latency.labels(*key).observe(fields["seconds"])
        elif event == "shed":
            self._shed.labels(self._candidate_version()).inc(fields["images"])
        elif event == "compare":
            version = self._candidate_version()
            self._compared.labels(version).inc(fields["images"])
            if fields["disagreements"]:
                self._disagreements.labels(version).inc(fields["disagreements"])
        elif event == "verdicts":
            # ``total`` is what this process decided so far; the counter moves by what is new.
            verdict, total = fields["verdict"], int(fields["total"])
            new = total - self._verdicts_seen.get(verdict, 0)
            if new > 0:
                self._verdicts.labels(verdict).inc(new)
            self._verdicts_seen[verdict] = total
        elif event == "sync":
            self._sync(fields.get("status"))

    def _sync(self, status: dict | None) -> None:
        deployment = self._rollout
        if deployment is not None:
            fallbacks = int(deployment.local.get("fallbacks", 0))
            if fallbacks > self._fallbacks_seen:
                self._fallbacks.labels(self._candidate_version()).inc(fallbacks - self._fallbacks_seen)
            self._fallbacks_seen = fallbacks
            self._weight.set(deployment.rollout.weight)
        for gate, value in ((status or {}).get("gates") or {}).items():
            self._gate_llr.labels(gate).set(value.get("llr") or 0.0)

    def _candidate_version(self) -> str:
        """The candidate's version, or the last one seen: counts that arrive just after it was dropped (a
        rollback) still name it."""
        model = getattr(self._rollout, "candidate_model", None)
        if model:
            self._last_candidate = model.rpartition("@")[2]
        return self._last_candidate

    # --- the page --------------------------------------------------------------------------------------

    def render(self) -> str:
        if self._dir is None:
            return generate_latest(self.registry).decode()
        _forget_dead_workers(self._dir)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self._dir)
        return generate_latest(merged).decode()

    def close(self) -> None:
        """This process stops serving: its live gauges leave the other workers' scrapes."""
        if self._dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self._dir)


def _forget_dead_workers(path: str) -> None:
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        match = _LIVE_GAUGE_FILE.search(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _alive(pid):
            multiprocess.mark_process_dead(pid, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
