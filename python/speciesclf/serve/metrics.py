"""Prometheus text-format metrics, written by hand (no extra dependency). Updated on the event loop only."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """The service's counters, histograms and gauges; :meth:`render` gives the /metrics page."""

    def __init__(self, prefix: str = "speciesclf") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (route, status)
        self.latency: dict[str, _Histogram] = {}  # route
        self.batch_sizes = _Histogram(BATCH_BUCKETS)
        self.errors: dict[str, int] = defaultdict(int)  # code
        self.predictions: dict[str, int] = defaultdict(int)  # label
        self.rejected: dict[str, int] = defaultdict(int)  # reason: queue_full, deadline_queued, ...
        self.queue_depth = 0  # images waiting
        self.in_flight = 0  # images in the running inference
        self.model = ""
        self.ready = False

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, str(status))] += 1
            hist = self.latency.get(route)
            if hist is None:
                hist = self.latency[route] = _Histogram(LATENCY_BUCKETS)
            hist.observe(seconds)

    def batch(self, size: int) -> None:
        with self._lock:
            self.batch_sizes.observe(size)

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def prediction(self, label: str) -> None:
        with self._lock:
            self.predictions[label] += 1

    def render(self) -> str:
        p = self.prefix
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {p}_{name} {help_text}")
            out.append(f"# TYPE {p}_{name} {kind}")

        def histogram(name: str, names: tuple, values: tuple, hist: _Histogram) -> None:
            running = 0
            for bound, count in zip(hist.buckets, hist.counts):
                running += count
                out.append(f"{p}_{name}_bucket{_labels(names + ('le',), values + (_number(bound),))} {running}")
            out.append(f"{p}_{name}_bucket{_labels(names + ('le',), values + ('+Inf',))} {hist.count}")
            out.append(f"{p}_{name}_sum{_labels(names, values)} {_number(hist.sum)}")
            out.append(f"{p}_{name}_count{_labels(names, values)} {hist.count}")

        with self._lock:
            family("requests_total", "counter", "HTTP requests by route and status code.")
            for (route, status), n in sorted(self.requests.items()):
                out.append(f"{p}_requests_total{_labels(('route', 'status'), (route, status))} {n}")
            family("request_duration_seconds", "histogram", "HTTP request latency by route.")
            for route, hist in sorted(self.latency.items()):
                histogram("request_duration_seconds", ("route",), (route,), hist)
            family("batch_size", "histogram", "Images per inference call.")
            histogram("batch_size", (), (), self.batch_sizes)
            family("queue_depth", "gauge", "Images waiting for inference.")
            out.append(f"{p}_queue_depth {self.queue_depth}")
            family("inflight_images", "gauge", "Images in the running inference call.")
            out.append(f"{p}_inflight_images {self.in_flight}")
            family("errors_total", "counter", "Error responses (whole requests or batch items) by error code.")
            for code, n in sorted(self.errors.items()):
                out.append(f"{p}_errors_total{_labels(('code',), (code,))} {n}")
            family("predictions_total", "counter", "Predictions returned, by top label.")
            for label, n in sorted(self.predictions.items()):
                out.append(f"{p}_predictions_total{_labels(('label',), (label,))} {n}")
            family("model_info", "gauge", "The model being served (name@version).")
            if self.model:
                out.append(f"{p}_model_info{_labels(('model',), (self.model,))} 1")
            family("ready", "gauge", "1 once the model is loaded and warmed up.")
            out.append(f"{p}_ready {int(self.ready)}")
        return "\n".join(out) + "\n"
