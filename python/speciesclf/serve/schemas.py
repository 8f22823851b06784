"""The service's bodies as pydantic models: what each route takes and answers.

The OpenAPI document is generated from these (serve/openapi.py), and the predict handlers validate their
JSON bodies into them and dispatch on :data:`ROUTES`, so what is documented is what is accepted.
Integers are strict: ``"top_k": 2`` is one, ``"2"`` and ``2.0`` are not (in a query string or a multipart
field, where every value is text, it is decimal digits).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag,
                      ValidationError,
                      create_model, model_validator)

__all__ = [
    "ADMIN_ROUTES", "BatchResponse", "CAPTURE_ROUTES", "EraseRequest", "FeedbackRequest", "Location", "ErrorBody", "ErrorDetail", "Health", "ModelsBody", "NotReady",
    "PredictionBody", "Ready", "ReasonRequest", "RequestModels", "RolloutInfo", "RouteDoc", "ROUTES",
    "StartRequest", "TopKEntry", "UrlInput", "WeightRequest", "too_many_items", "validation_message",
]

DEFAULT_TOP_K = 5
_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() would take "٢" and "²"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests ------------------------------------------------------------------------------------------------

_IMAGE_TEXT = ("the image: base64 (standard or URL-safe alphabet, padding optional) or a data: URI with "
               ";base64, of a JPEG, PNG, WebP, GIF, BMP or TIFF")
_URL_TEXT = ("an http(s) URL of the image, fetched by the service; refused (url_not_allowed) unless the service "
             "enables URL inputs and allows its host")


class UrlInput(_Body):
    """An image given by URL."""

    url: StrictStr = Field(description=_URL_TEXT)


def _item_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "base64"
    if isinstance(value, (dict, UrlInput)):
        return "url"
    return None


# A batch item: a string is an image, an object is {"url": ...}; anything else refuses the request.
BatchItem = Annotated[
    Union[Annotated[StrictStr, Tag("base64")], Annotated[UrlInput, Tag("url")]],
    Discriminator(_item_kind, custom_error_type="invalid_item",
                  custom_error_message='must be a base64 string or {"url": ...}'),
    Field(description=_IMAGE_TEXT + '; or {"url": ...}'),
]


class Location(_Body):
    """Where the photo was taken, in degrees: stored coarsened to a grid cell, never for sensitive species."""

    lat: float = Field(ge=-90, le=90, strict=True, allow_inf_nan=False)
    lon: float = Field(ge=-180, le=180, strict=True, allow_inf_nan=False)


_MetadataValue = Union[Annotated[StrictStr, Field(max_length=256)], StrictBool, StrictInt,
                       Annotated[float, Field(strict=True, allow_inf_nan=False)], None]


class _CaptureFields(_Body):
    """What a JSON request may tell the capture store (ignored when the service captures nothing)."""

    consent: StrictBool | None = Field(None, description="whether the image may be stored (also the header "
                                       "X-Capture-Consent: yes|no; given both ways, the two must agree); default: "
                                       "the service's --capture-consent")
    metadata: dict[Annotated[str, Field(min_length=1, max_length=64)], _MetadataValue] | None = Field(
        None, max_length=16, description="at most 16 keys of 1..64 characters; values null, booleans, numbers or "
                                         "strings of at most 256 characters; stored with consent only")
    subject: Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$")] | None = Field(
        None, description="the client's id of a person or device, for erasure (POST /v1/captures/erase); stored "
                          "with consent only")
    location: Location | None = Field(None, description="stored with consent only, coarsened")


class _PredictRequest(_CaptureFields):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [{"required": ["image"]},
                                                                          {"required": ["url"]}]})

    image: StrictStr = Field(None, description=_IMAGE_TEXT, json_schema_extra=lambda s: s.pop("default", None))
    url: StrictStr = Field(None, description=_URL_TEXT, json_schema_extra=lambda s: s.pop("default", None))

    @model_validator(mode="after")
    def _one_image(self) -> _PredictRequest:
        if (self.image is None) == (self.url is None):
            raise ValueError("give exactly one of 'image' (base64 or a data: URI) or 'url'")
        return self


class _BatchRequest(_CaptureFields):
    images: list[BatchItem] = Field(description="the images, in the order of the answers (at least 1, at most "
                                                "the service's max_batch_request)")


def _top_k_field(max_top_k: int, as_text: bool) -> Any:
    kind = "decimal digits" if as_text else "a JSON integer, not a string or 2.0"
    return Field(None, ge=1, le=max_top_k, json_schema_extra=lambda s: s.pop("default", None),
                 description=f"how many guesses to return, 1..{max_top_k} (default {DEFAULT_TOP_K}): {kind}. It may "
                             "be given as ?top_k= instead; given both ways, the two must agree")


class _PredictForm(_Body):
    file: bytes = Field(description="the image file")


class _BatchForm(_Body):
    files: list[bytes] = Field(None, description="the image files, one part each, in the order of the answers")
    file: list[bytes] = Field(None, description="accepted as files are")


@dataclasses.dataclass(frozen=True)
class RequestModels:
    """The request models of one app: ``top_k``'s upper bound is its ``max_top_k``."""

    max_top_k: int
    predict_json: type[BaseModel]
    batch_json: type[BaseModel]
    predict_form: type[BaseModel]
    batch_form: type[BaseModel]
    max_batch_request: int | None = None

    @classmethod
    def build(cls, max_top_k: int, max_batch_request: int | None = None) -> RequestModels:
        """``max_batch_request`` bounds a JSON batch's ``images`` in the schema itself, so that pydantic refuses
        a longer list by its length alone instead of validating (and listing the problems of) every item."""
        def with_top_k(name: str, base: type[BaseModel], doc: str, as_text: bool, **fields: Any) -> type[BaseModel]:
            top_k_type = int if as_text else StrictInt  # a multipart field is text: digits, checked by top_k_text
            return create_model(name, __base__=base, __doc__=doc,
                                top_k=(top_k_type, _top_k_field(max_top_k, as_text)), **fields)

        images = _BatchRequest.model_fields["images"]
        bounded = {} if max_batch_request is None else {
            "images": (list[BatchItem], Field(description=images.description, max_length=max_batch_request))}
        return cls(
            max_top_k=max_top_k,
            max_batch_request=max_batch_request,
            predict_json=with_top_k("PredictRequest", _PredictRequest,
                                    "One image: exactly one of image or url.", False),
            batch_json=with_top_k("BatchRequest", _BatchRequest, "Several images, each answered on its own.", False,
                                  **bounded),
            predict_form=with_top_k("PredictForm", _PredictForm, "One image file.", True),
            batch_form=with_top_k("BatchForm", _BatchForm, "Several image files.", True),
        )

    def top_k_text(self, value: str | None, where: str) -> int | None:
        """``top_k`` from a query string or a multipart field: decimal digits in range, or None if absent."""
        if value is None:
            return None
        if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= self.max_top_k:
            raise ValueError(f"{where} top_k must be an integer in 1..{self.max_top_k} (decimal digits), "
                             f"got {value[:40]!r}")
        return int(value)


# pydantic lists every problem (a 20 MiB body of unknown keys holds two million), and turning them into
# Python objects costs seconds on the event loop: past this many, the answer gives their number only.
_LISTED_AT_MOST = 100


def too_many_items(error: ValidationError) -> int | None:
    """The length of a JSON batch's ``images`` that its model refused as longer than max_batch_request, or None."""
    if error.error_count() > _LISTED_AT_MOST:
        return None
    for e in error.errors(include_url=False, include_input=False):
        if e["type"] == "too_long" and tuple(e["loc"]) == ("images",):
            return int((e.get("ctx") or {}).get("actual_length") or 0)
    return None


def validation_message(error: ValidationError, max_top_k: int) -> str:
    """One line naming each problem by its place in the body (``images[1]``, ``top_k``)."""
    count = error.error_count()
    if count > _LISTED_AT_MOST:
        return (f"the body has {count} problems (unknown fields or values of the wrong type): too many to list; "
                "the OpenAPI document at /openapi.json gives its schema")
    parts = []
    for e in error.errors(include_url=False):
        # pydantic puts the union's tag after a list index (images, 1, "url", "y"): not a place in the body.
        loc = [p for i, p in enumerate(e["loc"]) if not (i and isinstance(e["loc"][i - 1], int) and p in _TAGS)]
        kind = e["type"]
        if kind == "json_invalid":
            detail = str((e.get("ctx") or {}).get("error", e["msg"]))
            parts.append("invalid JSON: " + ("nested too deeply" if "recursion limit" in detail else detail))
        elif kind == "extra_forbidden":
            container = _place(loc[:-1])
            parts.append(f"unknown field {str(loc[-1])[:60]!r}" + (f" in {container}" if container else ""))
        elif loc == ["top_k"]:
            parts.append(f"top_k must be an integer in 1..{max_top_k} (a JSON integer, not a string or 2.0)")
        elif kind == "missing":
            parts.append(f"{_place(loc)} is required")
        else:
            message = e["msg"].removeprefix("Value error, ")
            parts.append(f"{_place(loc)}: {message}" if loc else message)
    return "; ".join(dict.fromkeys(parts))[:500]


_TAGS = ("base64", "url")


def _place(loc: list) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))


# --- responses -----------------------------------------------------------------------------------------------

ERROR_CODES_TEXT = ("stable: invalid_base64, empty_input, url_not_allowed, url_fetch_failed, unsupported_format, "
                    "image_too_large, image_too_small, decode_error, invalid_request, too_many_images, queue_full, "
                    "deadline_exceeded, inference_timeout, not_ready, shutting_down, server_busy, client_closed, "
                    "model_error, internal, not_found, method_not_allowed; the admin API's: unauthorized, forbidden, "
                    "rollout_conflict, candidate_refused, invalid_rollout; capture's: prediction_not_found, invalid_label, "
                    "rate_limited, capture_error (see docs/serve.md)")


class ErrorDetail(_Body):
    code: str = Field(description=ERROR_CODES_TEXT)
    message: str = Field(description="for people; never carries server paths")


class ErrorBody(_Body):
    """Every error answer, and a batch item that failed."""

    error: ErrorDetail


class TopKEntry(_Body):
    label: str
    score: float


class PredictionBody(_Body):
    """``Prediction.to_dict()``: label is null when the open-set rule says unknown; guess stays visible."""

    label: str | None = Field(description="the reported class; null when unknown")
    guess: str | None = Field(description="the best class whatever the open-set rule said")
    score: float | None = Field(description="the probability of guess among the reported classes")
    index: int | None = Field(description="the model output index of guess")
    scientific_name: str | None = Field(description="of label (null when unknown)")
    open_set_score: float | None = Field(description="what the open-set rule compared with its threshold")
    unknown: bool
    top_k: list[TopKEntry] = Field(description="guesses, best first")
    model: str = Field(description="name@version")
    timings: dict[str, float] = Field(description="decode_ms, preprocess_ms, inference_ms")
    error: ErrorDetail | None = Field(description="null in a prediction the service answers")
    arm: Literal["primary", "candidate"] | None = Field(
        default=None, description="with a rollout: which version answered, the primary or the candidate")
    prediction_id: str | None = Field(
        default=None, description="with capture on, when the answer was captured: its id, for POST /v1/feedback")


class BatchResponse(_Body):
    predictions: list[Union[PredictionBody, ErrorBody]] = Field(
        description="one per image, in order: a prediction, or that image's own error")


class Health(_Body):
    status: Literal["ok"]
    pid: int = Field(description="the worker process that answered")


class Ready(_Body):
    status: Literal["ready"]
    model: str


class NotReady(_Body):
    status: Literal["loading", "failed"]
    error: str = Field(None, description="why the model failed to load (the server's log has the details)",
                       json_schema_extra=lambda s: s.pop("default", None))


class Preprocessing(_Body):
    size: int
    resize: int | None
    crop: str
    mean: list[float]
    std: list[float]
    interpolation: str
    dtype: str
    layout: str
    max_pixels: int
    max_bytes: int


class ModelInfo(_Body):
    model: str
    labels: int
    device: str
    preprocessing: Preprocessing
    serving: dict[str, Any] = Field(description="the effective ServeConfig, host, port and file paths aside")
    arm: Literal["primary", "candidate"] | None = Field(
        default=None, description="with a rollout: which arm this version serves")


class GateInfo(_Body):
    n: int = Field(description="events the gate has seen")
    events: int
    rate: float | None
    p0: float
    p1: float
    llr: float = Field(description="the sequential test's log-likelihood ratio; it trips at threshold")
    threshold: float
    active: bool
    tripped: bool


class RefusedInfo(_Body):
    version: str
    reason: str
    at: float = Field(description="when (Unix time)")


class RolloutInfo(_Body):
    """The rollout of a service that serves a Deployment (see docs/rollout.md)."""

    mode: Literal["canary", "shadow"] | None = Field(description="null before any rollout")
    phase: str | None = Field(description="running, paused, promoting, promoted, rolled_back or aborted")
    candidate: str | None = Field(description="the version being (or last) rolled out")
    weight: float = Field(description="the share of routing keys the candidate answers now (0..1)")
    step: int | None = Field(description="the index of the canary step")
    steps: list[float] = Field(description="the canary's steps, in percent")
    reason: str | None = Field(description="why the last pause, promotion, rollback or abort happened")
    gates: dict[str, GateInfo]
    refused: RefusedInfo | None = Field(description="the last candidate refused (it never got traffic), and why")


class ModelsBody(_Body):
    models: list[ModelInfo] = Field(description="the primary first; with a rollout, its candidate after it")
    rollout: RolloutInfo | None = Field(default=None, description="present when the service serves a Deployment")


class StartRequest(_Body):
    """Start a rollout of ``candidate`` (replacing one that runs)."""

    candidate: StrictStr = Field(description="a version (1.1.0) or name@version of the served model")
    rollout: StrictStr | None = Field(default=None, description="canary[:5,25,50,100] or shadow[:share]; default: "
                                                                "the service's --rollout, else canary")


class ReasonRequest(_Body):
    reason: StrictStr | None = Field(default=None, description="logged with the verdict and kept in the history")


class WeightRequest(_Body):
    weight: float = Field(ge=0, le=1, strict=True, description="the share of routing keys for the candidate")


class FeedbackRequest(_Body):
    """A person's label for a captured prediction."""

    prediction_id: StrictStr = Field(max_length=64, description="from the prediction's answer")
    label: StrictStr = Field(max_length=200, description="a label of the model (common or scientific name, any "
                                                         "case), or not_an_animal / unknown_species")
    source: Literal["user", "reviewer", "expert"] = Field("user", description="who labels: the latest label of the "
                                                          "most trusted source (expert > reviewer > user) counts")
    comment: StrictStr | None = Field(None, max_length=2000)


class EraseRequest(_Body):
    """Erase every capture of a subject (the ``subject`` predictions were sent with)."""

    subject: StrictStr = Field(min_length=1, max_length=128)


# --- routes --------------------------------------------------------------------------------------------------

_STATUS_TEXT = {
    400: "invalid_base64, empty_input, url_not_allowed or url_fetch_failed",
    413: "image_too_large (the body) or too_many_images",
    415: "unsupported_format (sniffed from the bytes); or invalid_request: a body type this route does not take",
    422: "invalid_request (a body, field, query parameter or header the route does not take as sent), "
         "decode_error, image_too_large (pixels) or image_too_small",
    429: "queue_full: see Retry-After",
    404: "prediction_not_found: no captured prediction of this id (never captured, purged or erased)",
    401: "unauthorized: no 'Authorization: Bearer <token>' header (see WWW-Authenticate)",
    403: "forbidden: a bearer token that is not the service's admin token",
    409: "rollout_conflict (not possible in the rollout's phase) or candidate_refused (it cannot get traffic)",
    499: "client_closed: the client left before sending its whole body (nobody reads this answer)",
    500: "model_error (the model's scores were not finite) or internal",
    503: "not_ready, shutting_down, server_busy (see Retry-After) or deadline_exceeded (while queued)",
    504: "inference_timeout",
}


@dataclasses.dataclass(frozen=True)
class RouteDoc:
    """One route: the body forms it takes (``json``, ``multipart``, ``raw``) and every status it answers."""

    method: str
    bodies: tuple[str, ...] = ()
    ok: type[BaseModel] | None = None
    ok_text: str = "OK"
    errors: dict[int, str] = dataclasses.field(default_factory=dict)  # status -> description; body ErrorBody


_PREDICT_ERRORS = {s: _STATUS_TEXT[s] for s in (400, 413, 415, 422, 429, 499, 500, 503, 504)}
_BATCH_ERRORS = {**_PREDICT_ERRORS, 400: "empty_input (no images)",
                 415: "invalid_request: a body that is neither JSON nor multipart",
                 422: "invalid_request: a body, field, query parameter or header the route does not take as sent "
                      "(an image's own problems are that item's error in a 200 answer)"}

ROUTES: dict[str, RouteDoc] = {
    "/v1/predict": RouteDoc("post", ("json", "multipart", "raw"), PredictionBody, "the prediction", _PREDICT_ERRORS),
    "/v1/predict/batch": RouteDoc("post", ("json", "multipart"), BatchResponse,
                                  "one answer per image; a bad image never fails the others", _BATCH_ERRORS),
    "/v1/models": RouteDoc("get", (), ModelsBody, "the model served and the effective settings",
                           {503: "not_ready: the model is loading or failed to load"}),
    "/healthz": RouteDoc("get", (), Health, "the process serves HTTP"),
    "/readyz": RouteDoc("get", (), Ready, "the model is loaded and warmed up",
                        {503: "the model is loading, or failed to load (a NotReady body, not an error body)"}),
    "/metrics": RouteDoc("get", (), None, "Prometheus text format"),
}

_ADMIN_ERRORS = {s: _STATUS_TEXT[s] for s in (401, 403, 409)} | {
    422: "invalid_request (a body the route does not take) or invalid_rollout (a rollout spec or weight that "
         "cannot be used)",
    503: "not_ready: the model is loading, or the service serves a single model, not a Deployment"}
_STATUS_OK = "the rollout's status: Deployment.status()"
# The admin API (routes registered only when the service has an admin token) and each route's JSON body.
ADMIN_ROUTES: dict[str, tuple[RouteDoc, type[BaseModel] | None]] = {
    "/v1/admin/rollout": (RouteDoc("get", (), None, _STATUS_OK, _ADMIN_ERRORS), None),
    "/v1/admin/rollout/start": (RouteDoc("post", ("json",), None, _STATUS_OK, _ADMIN_ERRORS), StartRequest),
    **{f"/v1/admin/rollout/{action}": (RouteDoc("post", ("json",), None, _STATUS_OK, _ADMIN_ERRORS), ReasonRequest)
       for action in ("pause", "resume", "promote", "rollback")},
    "/v1/admin/rollout/weight": (RouteDoc("post", ("json",), None, _STATUS_OK, _ADMIN_ERRORS), WeightRequest),
}

_CAPTURE_ERRORS = {s: _STATUS_TEXT[s] for s in (401, 403, 404)} | {
    422: "invalid_request: a query parameter or body the route does not take"}
# Routes that exist only with capture on: the feedback route with the feedback token, the others with the
# admin token (serve/capture_routes.py).
CAPTURE_ROUTES: dict[str, tuple[RouteDoc, type[BaseModel] | None]] = {
    "/v1/feedback": (RouteDoc("post", ("json",), None, "the prediction's feedback: its resolved label and count",
                              {**_CAPTURE_ERRORS, 422: "invalid_label (with the closest names) or invalid_request",
                               429: "rate_limited: this source sent too much feedback; see Retry-After",
                               503: "not_ready: the model is loading"}), FeedbackRequest),
    "/v1/captures": (RouteDoc("get", (), None, "records in id (time) order and next_after_id", _CAPTURE_ERRORS), None),
    "/v1/captures/erase": (RouteDoc("post", ("json",), None, "what was erased", _CAPTURE_ERRORS), EraseRequest),
    "/v1/captures/{prediction_id}": (RouteDoc("get", (), None, "one record with its feedback", _CAPTURE_ERRORS), None),
    "/v1/captures/{prediction_id}/image": (RouteDoc("get", (), None, "the stored image, without its metadata",
                                                    _CAPTURE_ERRORS), None),
}
