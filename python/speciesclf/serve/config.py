"""ServeConfig: the HTTP service's batching, queueing and input limits, validated up front."""

from __future__ import annotations

import dataclasses

from ..spec import DEFAULT_MAX_PIXELS

__all__ = ["ServeConfig"]


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of :func:`speciesclf.serve.create_app`. Sizes count images, not requests."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32  # images per inference call
    max_wait_ms: float = 5.0  # how long the worker waits for more requests to fill a batch
    max_queue: int = 256  # images waiting for inference; beyond this: 429
    default_timeout_ms: int = 10_000  # per-request deadline, overridable with X-Request-Timeout-Ms
    max_timeout_ms: int = 300_000  # the largest deadline a client may ask for
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 16
    max_batch_request: int = 64  # images in one /v1/predict/batch request
    max_top_k: int = 100
    warmup: bool = True  # one dummy prediction before /readyz says ready
    drain_timeout_s: float = 30.0  # on shutdown, how long accepted work may take to finish

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ServeConfig.{name} must be a positive int, got {value!r}")

        for name in ("max_batch_size", "max_queue", "default_timeout_ms", "max_timeout_ms", "max_body_bytes",
                     "max_pixels", "min_side", "max_batch_request", "max_top_k"):
            positive_int(name)
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"ServeConfig.port must be an int in 0..65535, got {self.port!r}")
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"ServeConfig.host must be a non-empty string, got {self.host!r}")
        for name in ("max_wait_ms", "drain_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"ServeConfig.{name} must be a number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ValueError(f"ServeConfig.default_timeout_ms ({self.default_timeout_ms}) must be <= "
                             f"max_timeout_ms ({self.max_timeout_ms})")
        if self.max_queue < self.max_batch_request:
            # A full batch request must be acceptable by an empty queue, or it could never be served.
            raise ValueError(f"ServeConfig.max_queue ({self.max_queue}) must be >= max_batch_request "
                             f"({self.max_batch_request})")
        if not isinstance(self.warmup, bool):
            raise ValueError(f"ServeConfig.warmup must be a bool, got {self.warmup!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
