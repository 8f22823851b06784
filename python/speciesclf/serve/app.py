"""The FastAPI application: endpoints, validation, request ids, metrics and logs around the Batcher."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ._fetch import ServiceFetcher
from ._images import ApiError, check_image, decode_base64, error_for_prediction
from .capture_routes import CaptureFields, capture_fields
from .batcher import Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from .config import ServeConfig
from .logs import log
from .metrics import Metrics
from .openapi import openapi_document
from .schemas import (ADMIN_ROUTES, DEFAULT_TOP_K, ROUTES, Health, ModelsBody, NotReady, Ready, RequestModels,
                      UrlInput, too_many_items, validation_message)
from .._version import __version__

__all__ = ["create_app"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # used with fullmatch: "$" would let a trailing "\n" in
_ROUTING_KEY = re.compile(r"[\x20-\x7e]{1,256}")  # printable ASCII, with fullmatch
# Settings /v1/models does not show: where files are on the server (the token itself is in no setting).
_PRIVATE_SETTINGS = ("host", "port", "admin_token_file", "registry", "capture_dir", "feedback_token_file")


class _State:
    def __init__(self, source: Any, config: ServeConfig, on_load_failure: Callable[[str], None] | None,
                 reload_signal: bool = False):
        self.source = source
        self.config = config
        self.deployment: Any = None  # the Deployment served (the same object as classifier), if it is one
        self.reload_signal = reload_signal  # SIGHUP makes the deployment look at the registry now
        self.signal_installed = False
        self.routes = set(ROUTES)  # the route label of metrics and logs; admin routes join when they exist
        self.models = RequestModels.build(config.max_top_k, config.max_batch_request)
        self.metrics = Metrics()
        self.classifier: Any = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.load_error: str | None = None  # the whole reason, for the log and the operator only
        self.public_load_error: str | None = None  # what clients are told: no paths, no reference
        self.on_load_failure = on_load_failure
        self.owns_classifier = False
        self.loader: asyncio.Task | None = None
        self.fetcher: ServiceFetcher | None = None
        self.inflight_body_bytes = 0  # bodies being received or held by requests not yet answered
        self.predict_handlers: dict[str, Any] = {}  # POST path -> handler, called by _RequestMiddleware itself
        self.capture: Any = None  # a capture_routes.ServiceCapture when the service captures


def _error_response(error: ApiError, state: _State) -> JSONResponse:
    state.metrics.error(error.code)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(classifier_or_ref: Any, config: ServeConfig | None = None, *,
               on_load_failure: Callable[[str], None] | None = None, reload_signal: bool = False) -> FastAPI:
    """A FastAPI app serving ``classifier_or_ref`` (a :class:`~speciesclf.Classifier`, a
    :class:`~speciesclf.rollout.Deployment`, or anything ``Classifier.load`` takes, loaded in the background
    at startup). /readyz answers 200 once the model is loaded and has made one warm-up prediction. Run it
    with uvicorn (``speciesclf serve``).

    A registry reference (``name@production``, ``name@1.2.0`` of a name in the registry) is served as a
    Deployment that follows the registry's aliases (a moved ``production`` is hot-reloaded, a ``candidate``
    alias starts ``config.rollout``) and starts ``config.candidate``; with ``reload_signal`` (what
    :func:`~speciesclf.serve.run` sets) SIGHUP makes it look at the aliases at once. With
    ``config.admin_token_file`` the admin API exists under /v1/admin/.

    If the model cannot be loaded or warmed up, /readyz answers 503 "failed" and ``on_load_failure`` (if
    given) is called once, on the event loop, with a one-line reason: :func:`~speciesclf.serve.run` uses it
    to end the process, so that an orchestrator sees the failure instead of a live process never ready."""
    config = config if config is not None else ServeConfig()
    if not isinstance(config, ServeConfig):
        raise TypeError(f"config must be a ServeConfig, got {type(config).__name__}")
    state = _State(classifier_or_ref, config, on_load_failure, reload_signal)
    admin_token = config.admin_token()  # read now: a file removed since the config was made is an error here
    feedback_token = config.feedback_token()
    if config.capture_dir is not None:
        from .capture_routes import open_capture

        # Opened now, not in the background: a damaged database is a start-up error (CaptureDatabaseError).
        state.capture = open_capture(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loader = asyncio.get_running_loop().create_task(_load(state))
        if config.url_inputs:  # its semaphore belongs to this loop
            state.fetcher = ServiceFetcher(config)
        if state.capture is not None:
            state.capture.purger = asyncio.get_running_loop().create_task(state.capture.purge_forever())
        try:
            yield
        finally:
            if not state.loader.done():
                state.loader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await state.loader
            if state.signal_installed:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            if state.batcher is not None:
                await state.batcher.stop(config.drain_timeout_s)
            if state.capture is not None:  # after the batcher: the predictions it drained are offered first
                await state.capture.close()
            if state.owns_classifier and state.classifier is not None:
                state.classifier.close()
            state.ready = state.metrics.ready = False
            state.metrics.close()
            log("shutdown", model=state.metrics.model)

    app = FastAPI(title="speciesclf", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    # The predict handlers read the raw request (three body forms), which FastAPI cannot see: the document
    # is generated from the models in schemas.py, which those handlers validate with.
    app.openapi = lambda: app.openapi_schema or _cache_openapi(app, state.models)
    app.state.serve = state
    app.add_middleware(_RequestMiddleware, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_response(exc, state)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return _error_response(ApiError(exc.status_code, code, str(exc.detail)), state)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error_response(ApiError(422, "invalid_request", str(exc.errors())[:500]), state)

    # Bodies are built through their response models where it costs nothing that matters (not the predict
    # routes' hot path, whose answers the contract tests hold to PredictionBody and BatchResponse).
    @app.get("/healthz")
    async def healthz():
        # The pid tells apart the worker processes of `speciesclf serve --workers N` behind one port.
        return _body(Health(status="ok", pid=os.getpid()))

    @app.get("/readyz")
    async def readyz():
        if state.ready:
            return _body(Ready(status="ready", model=state.classifier.model))
        if state.public_load_error is None:
            return _body(NotReady(status="loading"), 503)
        return _body(NotReady(status="failed", error=state.public_load_error), 503)

    @app.get("/metrics")
    async def metrics():
        if state.ready:
            state.metrics.model = state.classifier.model  # a reload may have changed it
        if state.capture is not None:
            state.metrics.capture_failures = state.capture.failures
            state.metrics.capture_stats(await asyncio.to_thread(state.capture.store.stats))
        elif config.capture_dir is not None:
            state.metrics.capture_stats(None)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        clf = _require_ready(state)
        spec = clf.spec
        info = {
            "model": clf.model,
            "labels": len(clf.labels),
            "device": clf.device,
            "preprocessing": {
                "size": spec.size, "resize": spec.resize, "crop": spec.crop, "mean": list(spec.mean),
                "std": list(spec.std), "interpolation": spec.interpolation, "dtype": spec.dtype,
                "layout": spec.layout, "max_pixels": spec.max_pixels, "max_bytes": spec.max_bytes,
            },
            "serving": {k: v for k, v in config.to_dict().items() if k not in _PRIVATE_SETTINGS},
        }
        if state.deployment is None:
            return _body(ModelsBody(models=[info]))
        listed = [{**info, "arm": "primary"}]
        candidate = state.deployment.candidate_model
        if candidate is not None:
            # A candidate gets traffic only once check_contract found its labels and preprocessing equal
            # to the primary's, and it was loaded by the same loader on the same device.
            listed.append({**info, "model": candidate, "arm": "candidate"})
        return _body(ModelsBody(models=listed, rollout=_rollout_info(state.deployment)))

    @app.post("/v1/predict")
    async def predict(request: Request):
        deadline, query_top_k, body, kind = await _start(state, request, "/v1/predict")
        payload = None
        if kind == "json":
            payload = _validate(state, state.models.predict_json, body)
            top_k = _one_top_k(query_top_k, payload.top_k, "in the body")
            if payload.url is not None:
                image = await _fetch_url(state, payload.url, deadline, "url")
            else:
                image = decode_base64(payload.image)
        elif kind == "multipart":
            form = await _form(request, config)
            try:
                _only_fields(form, state.models.predict_form)
                files = [v for k, v in form.multi_items() if k == "file"]
                if len(files) != 1 or not hasattr(files[0], "read"):
                    raise ApiError(422, "invalid_request", "multipart body needs exactly one file field 'file'")
                top_k = _one_top_k(query_top_k, _form_top_k(state, form), "in the multipart field")
                image = await files[0].read()
            finally:
                await form.close()
        else:
            top_k = query_top_k or DEFAULT_TOP_K
            image = body
        fields = _capture_fields(request, payload)
        check_image(image, min_side=config.min_side, max_pixels=config.max_pixels)
        predictions, batch_size = await _infer(state, request, [image], top_k, deadline)
        p = predictions[0]
        prediction_id = _offer(state, request, p, image, fields)
        if p.error is not None:
            error = error_for_prediction(p.error)
            if prediction_id is not None:
                error.headers["X-Prediction-Id"] = prediction_id
            raise error
        _count(state, p)
        headers = {"X-Model-Version": p.model}
        if state.deployment is not None:  # outside a rollout the primary answers everything
            headers["X-Model-Arm"] = p.arm or "primary"
        answer = _prediction_dict(p, top_k)
        if prediction_id is not None:
            answer["prediction_id"] = headers["X-Prediction-Id"] = prediction_id
        return JSONResponse(answer, headers=headers)

    @app.post("/v1/predict/batch")
    async def predict_batch(request: Request):
        deadline, query_top_k, body, kind = await _start(state, request, "/v1/predict/batch")
        items: list[Any] = []  # bytes, or an ApiError for the item
        payload = None
        if kind == "json":
            payload = _validate(state, state.models.batch_json, body)
            top_k = _one_top_k(query_top_k, payload.top_k, "in the body")
            _batch_count(len(payload.images), config)
            fetches: dict[int, Any] = {}
            for i, value in enumerate(payload.images):
                if isinstance(value, UrlInput):
                    fetches[i] = _fetch_url(state, value.url, deadline, f"images[{i}].url")
                    items.append(None)
                    continue
                try:
                    items.append(decode_base64(value, field=f"images[{i}]"))
                except ApiError as e:  # the item's own error: the others still run
                    items.append(e)
            if fetches:  # concurrently; each failure stays the item's own
                fetched = await asyncio.gather(*fetches.values(), return_exceptions=True)
                for i, result in zip(fetches, fetched):
                    if isinstance(result, BaseException) and not isinstance(result, ApiError):
                        raise result
                    items[i] = result
        else:
            form = await _form(request, config)
            try:
                _only_fields(form, state.models.batch_form)
                files = [v for k, v in form.multi_items() if k in ("files", "file")]
                if not all(hasattr(f, "read") for f in files):
                    raise ApiError(422, "invalid_request", "the multipart fields 'files' must be files")
                top_k = _one_top_k(query_top_k, _form_top_k(state, form), "in the multipart field")
                _batch_count(len(files), config)
                for f in files:
                    items.append(await f.read())
            finally:
                await form.close()
        fields = _capture_fields(request, payload)
        good: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, bytes):
                try:
                    check_image(item, min_side=config.min_side, max_pixels=config.max_pixels, field=f"images[{i}]")
                    good.append(i)
                except ApiError as e:
                    items[i] = e
        results: list[Any] = list(items)
        prediction_ids: dict[int, str] = {}
        if good:
            predictions, _ = await _infer(state, request, [items[i] for i in good], top_k, deadline)
            for i, p in zip(good, predictions):
                prediction_id = _offer(state, request, p, items[i], fields)
                if prediction_id is not None:
                    prediction_ids[i] = prediction_id
                results[i] = error_for_prediction(p.error, field=f"images[{i}]") if p.error is not None else p
        out = []
        for i, r in enumerate(results):
            if isinstance(r, ApiError):
                state.metrics.error(r.code)
                out.append(r.body())
            else:
                _count(state, r)
                answer = _prediction_dict(r, top_k)
                if i in prediction_ids:
                    answer["prediction_id"] = prediction_ids[i]
                out.append(answer)
        return JSONResponse({"predictions": out})

    state.predict_handlers = {"/v1/predict": predict, "/v1/predict/batch": predict_batch}
    if admin_token is not None:
        from .admin import add_admin_routes

        add_admin_routes(app, state, admin_token)
        state.routes |= set(ADMIN_ROUTES)
    if state.capture is not None:
        from .capture_routes import add_capture_routes

        state.routes |= add_capture_routes(app, state, state.capture, admin_token, feedback_token)
    return app


# --- helpers ------------------------------------------------------------------------------------------------


async def _load(state: _State) -> None:
    from ..model.classifier import Classifier
    from ..rollout.deployment import Deployment
    from ._deployment import build_deployment, is_registry_reference, registry_of

    loop = asyncio.get_running_loop()
    config = state.config
    try:
        if isinstance(state.source, Classifier) or hasattr(state.source, "predict_batch"):
            clf = state.source
            if isinstance(clf, Deployment):
                state.metrics.watch(clf)
        elif is_registry_reference(state.source, registry_of(config)):
            clf = await loop.run_in_executor(None, build_deployment, state.source, config, _load_classifier,
                                             state.metrics.observe_rollout)
            state.owns_classifier = True
            state.metrics.watch(clf)
        elif config.candidate is not None or config.rollout is not None:
            raise ValueError(f"a candidate or a rollout needs the model to be a registry reference "
                             f"(name@production or name@VERSION of a name in the registry), not {state.source!r}")
        else:
            registry = registry_of(config) if config.registry is not None else None
            clf = await loop.run_in_executor(None, _load_classifier, state.source, registry)
            state.owns_classifier = True
        state.classifier = clf
        if isinstance(clf, Deployment):
            state.deployment = clf
            if state.reload_signal and threading.current_thread() is threading.main_thread() \
                    and hasattr(signal, "SIGHUP"):
                loop.add_signal_handler(signal.SIGHUP, clf.wake)
                state.signal_installed = True
        if state.config.warmup:
            import numpy as np

            dummy = np.full((64, 64, 3), 127, dtype=np.uint8)
            warm = await loop.run_in_executor(None, lambda: clf.predict_batch([dummy], top_k=1))
            if warm[0].error is not None:
                raise RuntimeError(f"warm-up prediction failed: {warm[0].error}")
        state.batcher = Batcher(clf, state.config, state.metrics)
        state.batcher.start()
        state.metrics.model = clf.model
        state.ready = state.metrics.ready = True
        # The effective settings, once, so that a log alone says how this instance batches and what it refuses.
        log("ready", model=clf.model, settings={k: v for k, v in state.config.to_dict().items()})
    except Exception as e:
        # One line, whole, for the log and the operator: it may name paths (a registry's, a bundle's), so
        # clients are told only that the load failed and what kind of error it was.
        state.load_error = " ".join(f"{type(e).__name__}: {e}".split())
        state.public_load_error = f"the model failed to load ({type(e).__name__}); the server's log has the reason"
        log("model load failed", level=40, error=state.load_error)
        if state.on_load_failure is not None:
            state.on_load_failure(state.load_error)


def _load_classifier(source: Any, registry: Any = None):
    from ..model.classifier import Classifier

    # The runtime shares this process's cores with the event loop and image decoding: ONNX Runtime's
    # busy-waiting intra-op threads would take CPU from them between ops (measured: slower per image once
    # anything else runs). Runtimes without that option (torch) refuse the keyword before loading anything.
    try:
        return Classifier.load(source, registry=registry, runtime_options={"allow_spinning": False})
    except TypeError:
        return Classifier.load(source, registry=registry)


def _rollout_info(deployment: Any) -> dict:
    """The "rollout" object of /v1/models: the shared state as this process last read it, and the last
    candidate refused. Reasons name no server paths (a registry's folder is shown as <registry>)."""
    status = deployment.status()
    state = status.get("rollout") or {}
    policy = state.get("policy") or {}
    refused = status.get("refused")
    root = str(getattr(deployment.rollout.registry, "root", "") or "")

    def public(text: Any) -> Any:
        return text.replace(root, "<registry>") if isinstance(text, str) and root else text

    return {
        "mode": policy.get("mode"), "phase": state.get("phase"), "candidate": state.get("candidate"),
        "weight": deployment.rollout.weight, "step": state.get("step"), "steps": list(policy.get("steps") or []),
        "reason": public(state.get("reason")), "gates": state.get("gates") or {},
        "refused": None if refused is None else {**refused, "reason": public(refused.get("reason"))},
    }


async def _start(state: _State, request: Request, route: str) -> tuple[float, int | None, bytes, str]:
    """What both predict routes do first: (deadline, top_k from the query or None, body, body kind)."""
    _require_ready(state)
    config = state.config
    deadline = asyncio.get_running_loop().time() + _timeout(request, config)
    given = request.query_params.getlist("top_k")
    if len(given) > 1:  # as for a multipart field: one value, not whichever of several came last
        raise ApiError(422, "invalid_request", "the query parameter top_k must be given once")
    try:
        top_k = state.models.top_k_text(given[0] if given else None, "the query parameter")
    except ValueError as e:
        raise ApiError(422, "invalid_request", str(e)) from None
    key = request.headers.get("x-routing-key")
    if key is not None and not _ROUTING_KEY.fullmatch(key):
        problem = f"got {len(key)}" if len(key) > 256 else "got an empty one" if not key else \
            "got other characters"
        raise ApiError(422, "invalid_request", f"X-Routing-Key must be 1 to 256 printable ASCII characters; {problem}")
    request.scope.setdefault("speciesclf", {})["routing_key"] = key
    kind = _body_kind(request)
    if kind not in ROUTES[route].bodies:  # the same table the OpenAPI document lists the body types from
        raise ApiError(415, "invalid_request", f"{route} takes a JSON or multipart body, not "
                       f"{request.headers.get('content-type', 'a body without a content type')[:60]!r}")
    body = await _read_body(request, config)
    return deadline, top_k, body, kind


def _require_ready(state: _State):
    if not state.ready or state.batcher is None:
        raise ApiError(503, "not_ready", state.public_load_error or "the model is loading", {"Retry-After": "1"})
    return state.classifier


def _body(model: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json", exclude_unset=True), status_code=status)


def _timeout(request: Request, config: ServeConfig) -> float:
    raw = request.headers.get("x-request-timeout-ms")
    if raw is None:
        return config.default_timeout_ms / 1000
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if not 1 <= value <= config.max_timeout_ms:
        raise ApiError(422, "invalid_request",
                       f"X-Request-Timeout-Ms must be an integer in 1..{config.max_timeout_ms}, got {raw[:40]!r}")
    return value / 1000


def _one_top_k(query: int | None, given: int | None, where: str) -> int:
    """The one top_k of a request: from the query or the body, which must agree when both give it."""
    if query is not None and given is not None and query != given:
        raise ApiError(422, "invalid_request", f"top_k is given twice and the two differ: {query} in the query "
                       f"and {given} {where}; give it once (or the same in both)")
    return given if given is not None else query if query is not None else DEFAULT_TOP_K


def _body_kind(request: Request) -> str:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        return "json"
    if ctype.startswith("multipart/"):
        return "multipart"
    return "raw"


async def _read_body(request: Request, config: ServeConfig) -> bytes:
    too_large = ApiError(413, "image_too_large", f"the request body is larger than max_body_bytes={config.max_body_bytes}")
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > config.max_body_bytes:
        raise too_large
    state: _State = request.app.state.serve
    info = request.scope.setdefault("speciesclf", {})
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise too_large
            # Counted as it arrives, released when the request is answered (_RequestMiddleware).
            info["body_bytes"] = info.get("body_bytes", 0) + len(chunk)
            state.inflight_body_bytes += len(chunk)
            if state.inflight_body_bytes > config.max_inflight_body_bytes:
                raise ApiError(503, "server_busy", "too many request bodies are being received at once "
                               f"(max_inflight_body_bytes={config.max_inflight_body_bytes}); retry shortly",
                               {"Retry-After": "1"})
            chunks.append(chunk)
    except ClientDisconnect:  # nobody reads the answer; 499 keeps it out of the server-error counts
        raise ApiError(499, "client_closed", "the client closed the connection before sending the whole body") from None
    body = b"".join(chunks)
    request._body = body  # starlette re-reads a consumed body from here (request.form())
    return body


async def _form(request: Request, config: ServeConfig):
    try:
        return await request.form(max_files=config.max_batch_request + 1, max_fields=100,
                                  max_part_size=config.max_body_bytes)
    except Exception as e:  # multipart parse errors of every kind
        detail = getattr(e, "detail", None) or str(e) or type(e).__name__
        raise ApiError(422, "invalid_request", f"malformed multipart body: {detail}") from None


def _validate(state: _State, model: type[BaseModel], body: bytes) -> Any:
    """A JSON body validated into its documented model: wrong types, unknown fields (in items too) and bad
    JSON are one answer, 422 invalid_request naming the place."""
    if not body:
        raise ApiError(422, "invalid_request", "empty JSON body")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        count = too_many_items(e)
        if count is not None:
            # The answer of a multipart batch of as many files.
            _batch_count(max(count, state.config.max_batch_request + 1), state.config)
        raise ApiError(422, "invalid_request", validation_message(e, state.config.max_top_k)) from None


def _only_fields(form: Any, model: type[BaseModel]) -> None:
    unknown = sorted({k for k, _ in form.multi_items()} - set(model.model_fields))
    if unknown:
        raise ApiError(422, "invalid_request",
                       "unknown multipart field(s): " + ", ".join(repr(k[:60]) for k in unknown[:10]))


def _form_top_k(state: _State, form: Any) -> int | None:
    values = form.getlist("top_k")
    if len(values) > 1 or (values and not isinstance(values[0], str)):
        raise ApiError(422, "invalid_request", "the multipart field top_k must be given once, as text")
    try:
        return state.models.top_k_text(values[0] if values else None, "the multipart field")
    except ValueError as e:
        raise ApiError(422, "invalid_request", str(e)) from None


def _batch_count(n: int, config: ServeConfig) -> None:
    if n == 0:
        raise ApiError(400, "empty_input", "no images in the batch")
    if n > config.max_batch_request:
        raise ApiError(413, "too_many_images", f"{n} images; at most max_batch_request={config.max_batch_request}")


async def _fetch_url(state: _State, url: Any, deadline: float, field: str) -> bytes:
    if state.fetcher is None:
        raise ApiError(400, "url_not_allowed", f"{field}: URL inputs are off in this service; send the image bytes")
    return await state.fetcher.fetch(url, deadline - asyncio.get_running_loop().time(), field=field)


async def _infer(state: _State, request: Request, images: list[bytes], top_k: int, deadline: float):
    info = request.scope.setdefault("speciesclf", {})
    timeout_s = deadline - asyncio.get_running_loop().time()
    try:
        predictions, batch_size = await state.batcher.predict(images, top_k, timeout_s, info.get("routing_key"))
    except QueueFull as e:
        raise ApiError(429, "queue_full", str(e), {"Retry-After": str(e.retry_after_s)}) from None
    except DeadlineExceeded as e:
        raise ApiError(503 if e.stage == "queued" else 504,
                       "deadline_exceeded" if e.stage == "queued" else "inference_timeout", str(e)) from None
    except ShuttingDown as e:
        raise ApiError(503, "shutting_down", str(e), {"Retry-After": "1"}) from None
    info["batch_size"] = batch_size
    info["images"] = len(images)
    return predictions, batch_size


def _prediction_dict(p: Any, top_k: int) -> dict:
    d = p.to_dict()
    d["top_k"] = d["top_k"][:top_k]
    return d


def _templated_route(state: _State, path: str) -> str:
    """The route label of a path with an id in it (/v1/captures/{prediction_id}...), else "other": one label
    per route, not per id."""
    if path.startswith("/v1/captures/") and "/v1/captures/{prediction_id}" in state.routes:
        return "/v1/captures/{prediction_id}/image" if path.endswith("/image") else "/v1/captures/{prediction_id}"
    return "other"


def _capture_fields(request: Request, payload: Any) -> CaptureFields:
    state: _State = request.app.state.serve
    # The header is checked whether or not the service captures: what a request may send does not change.
    fields = capture_fields(request, payload)
    return fields if state.capture is not None else CaptureFields()


def _offer(state: _State, request: Request, p: Any, image: bytes, fields: CaptureFields) -> str | None:
    """The prediction offered to the capture store (which only queues it); its prediction id, if recorded."""
    if state.capture is None:
        return None
    return state.capture.offer(p, image, request.scope.get("speciesclf", {}).get("request_id"), fields)


def _count(state: _State, p: Any) -> None:
    state.metrics.prediction("unknown" if p.unknown else (p.label or ""))


class _RequestMiddleware:
    """Request ids (X-Request-Id in and out), per-route metrics and one JSON log line per request."""

    def __init__(self, app, state: _State):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        path = scope.get("path", "")
        root_path = scope.get("root_path", "")
        # Mounted under a prefix, or served behind one (--root-path): the route is what follows it, cut at
        # a "/" as Starlette's router cuts it ("/v" is no prefix of "/v1/predict").
        if root_path and (path == root_path or path.startswith(root_path + "/")):
            path = path[len(root_path):]
        route = path if path in self.state.routes else _templated_route(self.state, path)
        info = scope.setdefault("speciesclf", {})
        info["request_id"] = request_id
        status = {"code": 500, "started": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        handler = self.state.predict_handlers.get(path) if scope.get("method") == "POST" else None
        try:
            if handler is None:
                await self.app(scope, receive, send_wrapper)
            else:
                await self._predict(handler, scope, receive, send_wrapper)
        except Exception as e:
            # Answered here rather than by Starlette's outermost error layer, so that a 500 too carries the
            # request id, is counted and logged as one JSON line, and leaves no traceback on stderr.
            log("internal error", level=40, request_id=request_id, route=route, error=f"{type(e).__name__}: {e}")
            if status["started"]:
                return  # the answer is under way: nothing more can be sent on it
            error = ApiError(500, "internal", "internal error")
            self.state.metrics.error(error.code)
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send_wrapper)
        finally:
            self.state.inflight_body_bytes -= info.get("body_bytes", 0)
            seconds = time.perf_counter() - start
            self.state.metrics.request(route, status["code"], seconds)
            log("request", request_id=request_id, method=scope.get("method"), route=route, status=status["code"],
                latency_ms=round(seconds * 1000, 3), model=self.state.metrics.model or None,
                batch_size=info.get("batch_size"), images=info.get("images"))

    async def _predict(self, handler, scope, receive, send) -> None:
        """A predict route called straight from here, past FastAPI's exception, routing and dependency layers:
        with an instant model they were a quarter of the server's CPU per request (205 -> 151 us), and the
        handler needs none of them. Its answers and errors are the same as through FastAPI's router (a test
        holds them to each other), where the routes stay registered for the OpenAPI document."""
        try:
            response = await handler(Request(scope, receive))
        except ApiError as e:
            response = _error_response(e, self.state)
        await response(scope, receive, send)


def _cache_openapi(app: FastAPI, models: RequestModels) -> dict:
    app.openapi_schema = openapi_document(app, models)
    return app.openapi_schema
