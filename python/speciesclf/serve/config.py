"""ServeConfig: the HTTP service's batching, queueing and input limits, validated up front."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from pathlib import Path

from ..sources.fetch import host_pattern
from ..preprocessing.spec import DEFAULT_MAX_PIXELS

__all__ = ["ServeConfig", "parse_duration", "parse_size"]

_DAY_MS = 86_400_000


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of :func:`speciesclf.serve.create_app`. Sizes count images, not requests."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Images per inference call. On CPUs, batches beyond ~16 gain nothing (ONNX Runtime runs them in slices
    # of 8) and a batch as large as the client count makes requests arrive and leave in one convoy, leaving
    # the runtime idle while the responses go out (measured at 32 clients: 488 req/s at 16, 448 at 32).
    max_batch_size: int = 16
    # Batches being decoded or inferred at once. 2 lets the next batch's decoding overlap the current one's
    # inference: on 2 cores at 32 clients it gave +4% throughput (5 paired rounds), but under 4x overload
    # the event loop, left with less CPU, answered 777 of 7872 requests after their deadline (none with 1)
    # and took 2 s instead of 0.5 s to recover. On larger hosts, where the loop keeps a core, try 2.
    batches_in_flight: int = 1
    max_wait_ms: float = 5.0  # how long the worker waits for more requests to fill a batch
    max_queue: int = 256  # images waiting for inference; beyond this: 429
    default_timeout_ms: int = 10_000  # per-request deadline, overridable with X-Request-Timeout-Ms
    max_timeout_ms: int = 300_000  # the largest deadline a client may ask for
    max_body_bytes: int = 20 * 2**20
    # Request bodies being received at once, in bytes over all requests: beyond it, 503 server_busy. Many
    # slow uploads of max_body_bytes each would otherwise hold as much memory as clients care to open.
    max_inflight_body_bytes: int = 256 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 16
    max_batch_request: int = 64  # images in one /v1/predict/batch request
    max_top_k: int = 100
    warmup: bool = True  # one dummy prediction before /readyz says ready
    drain_timeout_s: float = 30.0  # on shutdown, how long accepted work may take to finish
    # URL inputs ({"url": ...}): off unless url_inputs is set, and then only to url_allow_hosts.
    url_inputs: bool = False
    url_allow_hosts: tuple[str, ...] = ()  # "*" (any public host), "*.example.com" or exact names / IPs
    url_allow_networks: tuple[str, ...] = ()  # CIDRs allowed although not public (an internal image store)
    url_connect_timeout_s: float = 3.0
    url_read_timeout_s: float = 5.0  # the longest silence while reading the answer
    url_timeout_s: float = 10.0  # the whole fetch, redirects included (the request's deadline also bounds it)
    url_max_redirects: int = 3
    url_max_bytes: int = 10 * 2**20
    url_max_concurrent: int = 16  # fetches in flight at once, over all requests
    url_max_length: int = 2048
    # A rollout (docs/rollout.md), used when the model is a registry reference (name@alias or name@version):
    # the service then serves a Deployment that follows the registry's aliases.
    rollout: str | None = None  # the policy of rollouts it starts: "canary[:5,25,50,100]" or "shadow[:share]"
    candidate: str | None = None  # a version (or name@version|alias) to start a rollout of at start-up
    # The admin API (/v1/admin/) exists only with a token: the stripped content of this file. The file's
    # path may be shown; the token never is (not in to_dict(), logs or /v1/models).
    admin_token_file: str | None = None
    watch_interval_s: float = 2.0  # how often the registry's aliases are looked at (also on SIGHUP)
    registry: str | None = None  # the registry's folder; default: $SPECIESCLF_HOME/registry
    # Capture (docs/capture.md, docs/serve.md "Capture and feedback"): off unless capture_dir is set.
    capture_dir: str | None = None
    capture_rate: float = 0.1  # the share of ordinary answers kept (unknowns, low scores and errors always are)
    capture_retention: str | float | None = "30d"  # records older than this are purged ("30d", "12h", seconds)
    capture_max_bytes: str | int | None = "10GB"  # the store's budget, images and database ("10GB", "500MB", bytes)
    capture_consent: str = "required"  # what a request that says nothing means: "required" (no) or "assumed"
    capture_optional: bool = False  # a capture store that cannot be opened turns capture off instead of failing
    capture_purge_interval_s: float = 3600.0  # how often retention is enforced (also once at start-up)
    # POST /v1/feedback exists only with its own token, the stripped content of this file (capture needed).
    feedback_token_file: str | None = None
    feedback_rate_per_s: float = 5.0  # feedback calls per second and per source (user, reviewer, expert)
    feedback_burst: int = 20  # calls a source may make at once before the rate applies

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ServeConfig.{name} must be a positive int, got {value!r}")

        for name in ("max_batch_size", "batches_in_flight", "max_queue", "default_timeout_ms", "max_timeout_ms",
                     "max_body_bytes", "max_inflight_body_bytes",
                     "max_pixels", "min_side", "max_batch_request", "max_top_k", "url_max_bytes", "url_max_concurrent",
                     "url_max_length"):
            positive_int(name)
        if isinstance(self.url_max_redirects, bool) or not isinstance(self.url_max_redirects, int) \
                or self.url_max_redirects < 0:
            raise ValueError(f"ServeConfig.url_max_redirects must be an int >= 0, got {self.url_max_redirects!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"ServeConfig.port must be an int in 0..65535, got {self.port!r}")
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"ServeConfig.host must be a non-empty string, got {self.host!r}")
        for name in ("max_wait_ms", "drain_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"ServeConfig.{name} must be a number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.max_timeout_ms > _DAY_MS:  # also keeps ms / 1000 a finite float
            raise ValueError(f"ServeConfig.max_timeout_ms must be at most {_DAY_MS} (one day), got {self.max_timeout_ms}")
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ValueError(f"ServeConfig.default_timeout_ms ({self.default_timeout_ms}) must be <= "
                             f"max_timeout_ms ({self.max_timeout_ms})")
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(f"ServeConfig.max_inflight_body_bytes ({self.max_inflight_body_bytes}) must be >= "
                             f"max_body_bytes ({self.max_body_bytes}), or no largest body could ever be read")
        if self.max_queue < self.max_batch_request:
            # A full batch request must be acceptable by an empty queue, or it could never be served.
            raise ValueError(f"ServeConfig.max_queue ({self.max_queue}) must be >= max_batch_request "
                             f"({self.max_batch_request})")
        if not isinstance(self.warmup, bool):
            raise ValueError(f"ServeConfig.warmup must be a bool, got {self.warmup!r}")
        self._check_urls()
        self._check_rollout()
        self._check_capture()

    def _check_capture(self) -> None:
        for name in ("capture_dir", "feedback_token_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"ServeConfig.{name} must be a non-empty string or None, got {value!r}")
        rate = self.capture_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"ServeConfig.capture_rate must be a number in [0, 1], got {rate!r}")
        object.__setattr__(self, "capture_rate", float(rate))
        if self.capture_retention is not None:
            object.__setattr__(self, "capture_retention", parse_duration(self.capture_retention, "capture_retention"))
        if self.capture_max_bytes is not None:
            object.__setattr__(self, "capture_max_bytes", parse_size(self.capture_max_bytes, "capture_max_bytes"))
        if self.capture_consent not in ("required", "assumed"):
            raise ValueError(f"ServeConfig.capture_consent must be 'required' or 'assumed', got {self.capture_consent!r}")
        if not isinstance(self.capture_optional, bool):
            raise ValueError(f"ServeConfig.capture_optional must be a bool, got {self.capture_optional!r}")
        for name in ("capture_purge_interval_s", "feedback_rate_per_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ServeConfig.{name} must be a number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.feedback_burst, bool) or not isinstance(self.feedback_burst, int) or self.feedback_burst < 1:
            raise ValueError(f"ServeConfig.feedback_burst must be a positive int, got {self.feedback_burst!r}")
        if self.feedback_token_file is not None:
            if self.capture_dir is None:
                raise ValueError("ServeConfig.feedback_token_file needs capture_dir: feedback labels captured predictions")
            self.feedback_token()

    def _check_rollout(self) -> None:
        from ..rollout.policy import parse_rollout

        for name in ("rollout", "candidate", "admin_token_file", "registry"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"ServeConfig.{name} must be a non-empty string or None, got {value!r}")
        if self.rollout is not None:
            parse_rollout(self.rollout)  # RolloutSpecError (a ValueError) says what is wrong
        value = self.watch_interval_s
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"ServeConfig.watch_interval_s must be a number > 0, got {value!r}")
        object.__setattr__(self, "watch_interval_s", float(value))
        if self.admin_token_file is not None:
            self.admin_token()  # the file must be there and hold a token now, not at the first admin call

    def admin_token(self) -> str | None:
        """The admin API's bearer token (read from ``admin_token_file``), or None when it has none."""
        return _read_token(self.admin_token_file, "admin_token_file", "admin")

    def feedback_token(self) -> str | None:
        """POST /v1/feedback's bearer token (read from ``feedback_token_file``), or None when it has none."""
        return _read_token(self.feedback_token_file, "feedback_token_file", "feedback")

    def _check_urls(self) -> None:
        if not isinstance(self.url_inputs, bool):
            raise ValueError(f"ServeConfig.url_inputs must be a bool, got {self.url_inputs!r}")
        for name in ("url_connect_timeout_s", "url_read_timeout_s", "url_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ServeConfig.{name} must be a number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("url_allow_hosts", "url_allow_networks"):
            value = getattr(self, name)
            # A bare string would be iterated as characters: refuse it rather than allow "e", "x", ...
            if isinstance(value, str) or not isinstance(value, (list, tuple)) \
                    or not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"ServeConfig.{name} must be a list of non-empty strings, got {value!r}")
        hosts = [_host_pattern(host) for host in self.url_allow_hosts]
        object.__setattr__(self, "url_allow_hosts", tuple(hosts))
        networks = []
        for net in self.url_allow_networks:
            try:
                networks.append(str(ipaddress.ip_network(net.strip(), strict=True)))
            except ValueError as e:
                raise ValueError(f"ServeConfig.url_allow_networks: {net!r} is not a CIDR network ({e})") from None
        object.__setattr__(self, "url_allow_networks", tuple(networks))
        if self.url_inputs and not self.url_allow_hosts:
            raise ValueError("ServeConfig.url_inputs needs url_allow_hosts (host names, '*.domain', or '*' for any "
                             "public host)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read_token(file: str | None, field: str, what: str) -> str | None:
    if file is None:
        return None
    path = Path(file).expanduser()
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"ServeConfig.{field}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not token:
        raise ValueError(f"ServeConfig.{field}: {path} is empty; put the {what} token in it")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"ServeConfig.{field}: the token in {path} has spaces or control characters")
    return token


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_duration(value: str | float, field: str = "duration") -> float:
    """Seconds from "30d", "12h", "90m", "45s", "2w" or a number of seconds; ValueError naming ``field``."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*", value.lower())
        if match:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"ServeConfig.{field} must be a duration above 0 such as 30d, 12h, 90m or 3600 (seconds), "
                         f"got {value!r}")
    return seconds


def parse_size(value: str | int, field: str = "size") -> int:
    """Bytes from "10GB", "500MB", "2GiB", "4096" or an int; ValueError naming ``field``."""
    size: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", value.lower())
        if match and match.group(2) in _SIZE_UNITS:
            size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size is None or not math.isfinite(size) or int(size) < 1:
        raise ValueError(f"ServeConfig.{field} must be a size above 0 such as 10GB, 500MB, 2GiB or 4096 (bytes), "
                         f"got {value!r}")
    return int(size)


def _host_pattern(given: str) -> str:
    """An allowlist entry in the form URL hosts are matched in (see :func:`speciesclf.sources.fetch.host_pattern`)."""
    try:
        return host_pattern(given)
    except ValueError as e:
        raise ValueError(f"ServeConfig.url_allow_hosts: {e}") from None
