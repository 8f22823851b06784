"""Capture and feedback over HTTP: the service's side of :mod:`speciesclf.capture`.

This module only adapts the library to HTTP: the store decides what is kept, strips images, enforces
retention and resolves labels. Here a prediction answered is offered to the store (which only queues it),
``POST /v1/feedback`` (its own bearer token, rate-limited per source) adds a person's label and feeds a
rollout's accuracy gate, and the admin-token routes under ``/v1/captures`` read, delete and erase records.
See docs/serve.md ("Capture and feedback") and docs/capture.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from ..capture import CaptureDatabaseError, CapturePolicy, FeedbackNotFound, InvalidFeedbackLabel, SqliteCaptureStore
from ..capture import new_prediction_id
from ..capture.feedback import is_correct
from ..errors import CodedError, error_code, error_status
from ._images import ApiError
from .admin import bearer_authorizer
from .config import ServeConfig
from .logs import log
from .schemas import EraseRequest, FeedbackRequest, validation_message

__all__ = ["CaptureFields", "ServiceCapture", "add_capture_routes", "capture_fields", "open_capture"]

_IMAGE_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_QUERY_PARAMS = ("since", "until", "version", "arm", "label", "unknown", "has_feedback", "after_id", "limit")
_MAX_PAGE = 1000


@dataclasses.dataclass(frozen=True)
class CaptureFields:
    """What one request tells the store: consent (None: the service's default), metadata, subject, location."""

    consent: bool | None = None
    metadata: dict[str, Any] | None = None
    subject: str | None = None
    location: tuple[float, float] | None = None


def capture_fields(request: Request, payload: Any = None) -> CaptureFields:
    """The capture fields of a request: the X-Capture-Consent header, and a JSON body's fields (validated by
    its schema already). A header and a body that disagree on consent are refused, as top_k given twice is."""
    raw = request.headers.get("x-capture-consent")
    header = None
    if raw is not None:
        header = {"yes": True, "no": False}.get(raw.strip().lower())
        if header is None:
            raise ApiError(422, "invalid_request", f"X-Capture-Consent must be yes or no, got {raw[:40]!r}")
    body = getattr(payload, "consent", None)
    if header is not None and body is not None and header != body:
        raise ApiError(422, "invalid_request", "consent is given twice and the two differ: in the X-Capture-Consent "
                       "header and in the body; give it once (or the same in both)")
    location = getattr(payload, "location", None)
    return CaptureFields(consent=body if body is not None else header, metadata=getattr(payload, "metadata", None),
                         subject=getattr(payload, "subject", None),
                         location=None if location is None else (location.lat, location.lon))


class _TokenBuckets:
    """``rate`` calls a second per key, ``burst`` at once."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when a call of ``key`` may go now (its token taken), else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0


class ServiceCapture:
    """The service's capture store and what the routes share."""

    def __init__(self, store: SqliteCaptureStore, config: ServeConfig):
        self.store = store
        self.config = config
        self.buckets = _TokenBuckets(config.feedback_rate_per_s, config.feedback_burst)
        self.failures = 0  # captures the store raised on: counted, never the prediction's failure
        self.purger: asyncio.Task | None = None

    def offer(self, prediction: Any, image: bytes | None, request_id: str | None, fields: CaptureFields) -> str | None:
        """Queue ``prediction`` (the store decides whether it is kept); its prediction id when a record will be
        made. Never raises for the store's sake: a failing store must not fail the prediction it records."""
        try:
            return self.store.capture(prediction, image, request_id=request_id, consent=fields.consent,
                                      metadata=fields.metadata, subject=fields.subject, location=fields.location,
                                      prediction_id=new_prediction_id())
        except CodedError as e:
            if 400 <= e.status < 500:  # the client's metadata, subject or location: the request's own fault
                raise ApiError(e.status, e.code, str(e)) from None
            self._failed(e)
        except Exception as e:  # noqa: BLE001 - see the docstring
            self._failed(e)
        return None

    def _failed(self, error: BaseException) -> None:
        self.failures += 1
        if self.failures == 1 or math.log2(self.failures).is_integer():  # 1, 2, 4, 8, ...: not one line each
            log("capture failed", level=40, error=f"{type(error).__name__}: {error}", failures=self.failures)

    async def purge_forever(self) -> None:
        """Retention, now and then every capture_purge_interval_s (off the event loop)."""
        while True:
            try:
                removed = await asyncio.to_thread(self.store.purge)
                if any(removed.values()):
                    log("capture purge", **removed)
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log("capture purge failed", level=40, error=f"{type(e).__name__}: {e}")
            await asyncio.sleep(self.config.capture_purge_interval_s)

    async def close(self) -> None:
        if self.purger is not None:
            self.purger.cancel()
            try:
                await self.purger
            except BaseException:  # noqa: BLE001 - cancelled (or failed): either way it has stopped
                pass
        await asyncio.to_thread(self.store.close)  # flushes what is queued


def open_capture(config: ServeConfig) -> ServiceCapture | None:
    """The capture store of ``config`` (None without capture_dir). A database that cannot be opened raises
    CaptureDatabaseError naming the file, or with capture_optional turns capture off with one log line."""
    if config.capture_dir is None:
        return None
    try:
        store = SqliteCaptureStore(
            config.capture_dir, policy=CapturePolicy(sample_rate=config.capture_rate, consent=config.capture_consent),
            max_age_s=config.capture_retention, max_bytes=config.capture_max_bytes)
    except (CaptureDatabaseError, OSError) as e:
        if not config.capture_optional:
            if isinstance(e, CaptureDatabaseError):
                raise
            raise CaptureDatabaseError(f"the capture folder {config.capture_dir} cannot be used: {e}") from e
        log("capture off", level=40, error=f"{type(e).__name__}: {e}",
            reason="the capture store cannot be opened and capture is optional (--capture-optional)")
        return None
    return ServiceCapture(store, config)


def add_capture_routes(app: FastAPI, state: Any, capture: ServiceCapture, admin_token: str | None,
                       feedback_token: str | None) -> set[str]:
    """Register the feedback route (with ``feedback_token``) and the /v1/captures routes (with
    ``admin_token``); the paths registered."""
    store = capture.store
    routes: set[str] = set()

    def library_error(e: Exception) -> ApiError:
        return ApiError(error_status(e), error_code(e), str(e))

    if feedback_token is not None:
        authorize_feedback = bearer_authorizer(feedback_token, "feedback")

        @app.post("/v1/feedback")
        async def feedback(request: Request):
            authorize_feedback(request)
            body = await _json_body(request, FeedbackRequest)
            wait = capture.buckets.take(body.source)
            if wait > 0:
                raise ApiError(429, "rate_limited", f"too much feedback from source {body.source!r}: at most "
                               f"{capture.config.feedback_rate_per_s:g} a second (bursts of "
                               f"{capture.config.feedback_burst})", {"Retry-After": str(max(1, math.ceil(wait)))})
            if not state.ready:
                raise ApiError(503, "not_ready", "the model is loading", {"Retry-After": "1"})
            labels = _label_names(state.classifier)
            try:
                summary = await asyncio.to_thread(store.add_feedback, body.prediction_id, body.label,
                                                  source=body.source, comment=body.comment, labels=labels)
            except (FeedbackNotFound, InvalidFeedbackLabel) as e:
                raise library_error(e) from None
            await asyncio.to_thread(_after_feedback, state, store, body.source, summary)
            return JSONResponse(summary)

        routes.add("/v1/feedback")

    if admin_token is None:
        return routes
    authorize = bearer_authorizer(admin_token, "admin")

    @app.get("/v1/captures")
    async def list_captures(request: Request):
        authorize(request)
        filters = _query_filters(request)
        limit = filters.pop("limit")
        records = await asyncio.to_thread(store.query, limit=limit, **filters)
        last = records[-1]["prediction_id"] if len(records) == limit else None
        return JSONResponse({"captures": records, "next_after_id": last})

    @app.post("/v1/captures/erase")
    async def erase_subject(request: Request):
        authorize(request)
        body = await _json_body(request, EraseRequest)
        erased = await asyncio.to_thread(store.erase, subject=body.subject)
        log("capture erase", by="subject", **erased)
        return JSONResponse(erased)

    @app.get("/v1/captures/{prediction_id}")
    async def get_capture(request: Request, prediction_id: str):
        authorize(request)
        record = await asyncio.to_thread(store.get, prediction_id)
        if record is None:
            raise _not_found(prediction_id)
        embedding = record.pop("embedding", None)
        record["embedding_size"] = None if embedding is None else int(embedding.shape[0])
        return JSONResponse(record)

    @app.get("/v1/captures/{prediction_id}/image")
    async def get_capture_image(request: Request, prediction_id: str):
        authorize(request)
        record = await asyncio.to_thread(store.get, prediction_id)
        path = None if record is None or record["image"] is None else store.image_path(prediction_id)
        try:
            data = None if path is None else await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            data = None
        if data is None:
            raise ApiError(404, "prediction_not_found", f"no stored image for prediction {prediction_id[:64]!r} "
                           "(no such record, no consent, or the image could not be read)")
        media = _IMAGE_TYPES.get(record["image"]["format"], "application/octet-stream")
        return Response(data, media_type=media, headers={"Cache-Control": "no-store"})

    @app.delete("/v1/captures/{prediction_id}")
    async def delete_capture(request: Request, prediction_id: str):
        authorize(request)
        erased = await asyncio.to_thread(store.erase, prediction_id=prediction_id)
        if not erased["records"]:
            raise _not_found(prediction_id)
        log("capture erase", by="prediction_id", **erased)
        return JSONResponse(erased)

    return routes | {"/v1/captures", "/v1/captures/erase", "/v1/captures/{prediction_id}",
                     "/v1/captures/{prediction_id}/image"}


def _after_feedback(state: Any, store: SqliteCaptureStore, source: str, summary: dict[str, Any]) -> None:
    """The metrics of a feedback, and a rollout's accuracy gate.

    The gate gets each prediction once, at its first label (later labels would count one image several
    times), and by the store's rule of right and wrong: an unknown answer is right for not_an_animal and
    unknown_species, a species answer is wrong for them. Only predictions of a rollout's arms count."""
    record = store.get(summary["prediction_id"])
    if record is None:  # erased meanwhile
        return
    version = f"{record['model']}@{record['version']}" if record["version"] else record["model"]
    accuracy = store.feedback_accuracy(version=version, arm=record["arm"])["accuracy"]
    state.metrics.feedback(source, version, record["arm"], accuracy)
    deployment = state.deployment
    if deployment is not None and summary["feedback"] == 1 and record["arm"] in ("primary", "candidate"):
        deployment.rollout.record_feedback(record["arm"], is_correct(record["label"], summary["resolved_label"]))


def _label_names(classifier: Any) -> list[tuple[str, str | None]]:
    """(common, scientific) names of the served model's labels: feedback may use either. A Classifier keeps
    its scientific names on its engine; a Deployment's are its primary's (check_contract holds the
    candidate's labels to them)."""
    inner = getattr(getattr(classifier, "_primary", None), "classifier", classifier)
    scientific = getattr(getattr(inner, "_engine", None), "scientific", None) or ()
    names = classifier.labels
    return [(name, scientific[i] if i < len(scientific) else None) for i, name in enumerate(names)]


def _not_found(prediction_id: str) -> ApiError:
    return ApiError(404, "prediction_not_found", f"no captured prediction {prediction_id[:64]!r} (never captured, "
                    "purged or erased)")


async def _json_body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        raise ApiError(422, "invalid_request", validation_message(e, 0)) from None


def _query_filters(request: Request) -> dict[str, Any]:
    params = request.query_params
    unknown = sorted(set(params) - set(_QUERY_PARAMS))
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown query parameter(s): {', '.join(k[:40] for k in unknown[:5])}; "
                       f"the filters are {', '.join(_QUERY_PARAMS)}")
    out: dict[str, Any] = {"limit": 100}
    for name in params:
        values = params.getlist(name)
        if len(values) > 1:
            raise ApiError(422, "invalid_request", f"the query parameter {name} must be given once")
        value = values[0]
        if name in ("since", "until"):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise ApiError(422, "invalid_request", f"{name} must be a Unix time in seconds, got {value[:40]!r}")
            out[name] = number
        elif name in ("unknown", "has_feedback"):
            flag = {"true": True, "1": True, "false": False, "0": False}.get(value.lower())
            if flag is None:
                raise ApiError(422, "invalid_request", f"{name} must be true or false, got {value[:40]!r}")
            out[name] = flag
        elif name == "limit":
            if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= _MAX_PAGE:
                raise ApiError(422, "invalid_request", f"limit must be an integer in 1..{_MAX_PAGE}, got {value[:40]!r}")
            out[name] = int(value)
        else:
            out[name] = value
    return out
