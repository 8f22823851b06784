"""The capture store's interface, what decides that a prediction is captured, and prediction ids.

A store keeps one record per captured prediction (see docs/capture.md for every field) and, with the
client's consent, the image without its metadata. :class:`SqliteCaptureStore` (speciesclf.capture.sqlite)
is the embedded default; another backend (a shared database, object storage) implements
:class:`CaptureStore`.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import random
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "CaptureError",
    "CaptureDatabaseError",
    "FeedbackNotFound",
    "InvalidFeedbackLabel",
    "CapturePolicy",
    "CaptureStore",
    "new_prediction_id",
    "prediction_id_time",
    "id_floor",
]


class CaptureError(RuntimeError):
    """The capture store cannot do what was asked: its database or folder is unusable, or an optional
    dependency (pyarrow, for Parquet) is missing."""


class CaptureDatabaseError(CaptureError):
    """The capture database cannot be opened: not a SQLite file, damaged (its integrity check failed), or
    written by a newer schema. The message names the file and what to do."""


class FeedbackNotFound(LookupError):
    """Feedback for a prediction id the store does not hold (never captured, purged or erased)."""


class InvalidFeedbackLabel(ValueError):
    """Feedback that cannot be used: a label outside the model's label set (``closest`` holds the nearest
    names), an unknown source, or a comment too long."""

    def __init__(self, message: str, closest: Iterable[str] = ()):
        super().__init__(message)
        self.closest = list(closest)


# Crockford's base32: no I, L, O or U, so an id read aloud or retyped is unambiguous.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_LENGTH = 26  # 10 characters of milliseconds (48 bits) + 16 of randomness (80 bits)
_id_lock = threading.Lock()
_last_ms = 0
_last_random = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_prediction_id(now: float | None = None) -> str:
    """A new 26-character id that sorts by time (a ULID: milliseconds, then 80 random bits).

    Within one process ids are strictly increasing even within one millisecond (the random part is
    incremented), so paging by id never skips a record of this process."""
    global _last_ms, _last_random
    ms = int((time.time() if now is None else now) * 1000)
    with _id_lock:
        if ms <= _last_ms and now is None:
            ms = _last_ms
            _last_random = (_last_random + 1) & ((1 << 80) - 1)
        else:
            _last_ms = max(_last_ms, ms)
            _last_random = int.from_bytes(os.urandom(10), "big") >> 1  # room to increment
        rand = _last_random
    return _encode(ms, 10) + _encode(rand, 16)


def is_prediction_id(value: object) -> bool:
    return (isinstance(value, str) and len(value) == _ID_LENGTH and value[0] in "01234567"
            and all(c in _ALPHABET for c in value))


def prediction_id_time(prediction_id: str) -> float:
    """The time (Unix seconds) a prediction id was made at."""
    ms = 0
    for c in prediction_id[:10]:
        ms = ms * 32 + _ALPHABET.index(c)
    return ms / 1000.0


def id_floor(t: float) -> str:
    """The smallest id made at or after ``t``: ids compare as strings, so a time range is an id range."""
    return _encode(max(0, int(t * 1000)), 10) + "0" * 16


@dataclasses.dataclass(frozen=True)
class CapturePolicy:
    """Which predictions are worth keeping.

    Always captured (each rule can be turned off): errors, unknown answers, disagreement between the
    versions of a rollout, and answers whose score is below ``low_confidence``; the rest with probability
    ``sample_rate``. ``consent`` is what a request that says nothing means: "required" (the default) stores
    only the numbers of such requests, "assumed" treats them as consenting."""

    sample_rate: float = 0.1
    always_unknown: bool = True
    low_confidence: float | None = 0.5
    always_disagreement: bool = True
    always_errors: bool = True
    consent: Literal["required", "assumed"] = "required"

    def __post_init__(self) -> None:
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, (int, float)) \
                or not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be a number in [0, 1], got {self.sample_rate!r}")
        if self.low_confidence is not None and (isinstance(self.low_confidence, bool) or not isinstance(
                self.low_confidence, (int, float)) or not 0.0 <= self.low_confidence <= 1.0):
            raise ValueError(f"low_confidence must be None or a number in [0, 1], got {self.low_confidence!r}")
        if self.consent not in ("required", "assumed"):
            raise ValueError(f"consent must be 'required' or 'assumed', got {self.consent!r}")

    def reason(self, prediction: Any, *, disagreement: bool = False,
               rng: random.Random | None = None) -> str | None:
        """Why ``prediction`` is captured ("error", "unknown", "disagreement", "low_confidence" or
        "sample"), or None when it is not."""
        if prediction.error is not None:
            return "error" if self.always_errors else self._sampled(rng)
        if self.always_unknown and prediction.unknown:
            return "unknown"
        if self.always_disagreement and disagreement:
            return "disagreement"
        if self.low_confidence is not None and prediction.score is not None and prediction.score < self.low_confidence:
            return "low_confidence"
        return self._sampled(rng)

    def _sampled(self, rng: random.Random | None) -> str | None:
        draw = (rng or random).random()
        return "sample" if draw < self.sample_rate else None

    def consents(self, consent: bool | None) -> bool:
        return self.consent == "assumed" if consent is None else bool(consent)


class CaptureStore(abc.ABC):
    """What every capture backend offers. Methods other than :meth:`capture` may block on storage;
    :meth:`capture` never does."""

    root: Path

    @abc.abstractmethod
    def capture(self, prediction: Any, image: bytes | None = None, *, request_id: str | None = None,
                consent: bool | None = None, metadata: Mapping[str, Any] | None = None,
                subject: str | None = None, location: tuple[float, float] | None = None,
                disagreement: bool = False, prediction_id: str | None = None) -> str | None:
        """Queue ``prediction`` for storing; its prediction id when the policy captures it and the queue
        had room, else None. Never blocks and never raises for a storage failure."""

    @abc.abstractmethod
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is stored (or dropped); False on timeout."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush, then stop. Idempotent."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """records, images, bytes, dropped, queue_depth, enabled, write_errors, captured."""

    @abc.abstractmethod
    def purge(self, now: float | None = None) -> dict[str, int]:
        """Enforce retention (maximum age, maximum bytes) and remove images no record names."""

    @abc.abstractmethod
    def erase(self, *, prediction_id: str | None = None, subject: str | None = None) -> dict[str, int]:
        """Remove a prediction's (or a subject's) records, images, embeddings and feedback."""

    @abc.abstractmethod
    def query(self, *, since: float | None = None, until: float | None = None, version: str | None = None,
              arm: str | None = None, label: str | None = None, unknown: bool | None = None,
              has_feedback: bool | None = None, limit: int = 100, after_id: str | None = None
              ) -> list[dict[str, Any]]:
        """Records in id (time) order; page with ``after_id`` = the last id of the previous page."""

    @abc.abstractmethod
    def get(self, prediction_id: str) -> dict[str, Any] | None:
        """One record with its feedback and embedding, or None."""

    @abc.abstractmethod
    def image_path(self, prediction_id: str) -> Path | None:
        """The stored image of a record, or None (no consent, not decodable, or no such record)."""

    @abc.abstractmethod
    def add_feedback(self, prediction_id: str, label: str, *, source: str = "user", comment: str | None = None,
                     labels: Iterable[Any] | None = None) -> dict[str, Any]:
        """Add a person's label; returns the record's feedback summary (resolved label and all labels)."""

    @abc.abstractmethod
    def feedback_accuracy(self, *, version: str | None = None, arm: str | None = None) -> dict[str, Any]:
        """Model answers against resolved feedback labels."""

    def __enter__(self) -> CaptureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
