"""The published OpenAPI document, generated from the routes' models in schemas.py.

FastAPI lists the routes (so a route added to the app appears); every route's request bodies, parameters
and answers (each status it gives, error bodies included) come from :data:`schemas.ROUTES` and the pydantic
models there, which the predict handlers validate with and dispatch on. Nothing here is written by hand
that the handlers could disagree with.
"""

from __future__ import annotations

from typing import Any

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .schemas import ADMIN_ROUTES, CAPTURE_ROUTES, ROUTES, BatchResponse, ErrorBody, NotReady, RequestModels

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"
_MEDIA = {"json": "application/json", "multipart": "multipart/form-data", "raw": "application/octet-stream"}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def openapi_document(app: Any, models: RequestModels) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    request_bodies = {
        "/v1/predict": {"json": models.predict_json, "multipart": models.predict_form},
        "/v1/predict/batch": {"json": models.batch_json, "multipart": models.batch_form},
    }
    inputs = [m for bodies in request_bodies.values() for m in bodies.values()]
    # Bearer-token routes present in this app: the admin API, and capture's (DELETE shares its GET's path).
    admin = {path: doc_and_body for path, doc_and_body in {**ADMIN_ROUTES, **CAPTURE_ROUTES}.items()
             if path in doc["paths"]}
    inputs += [body for _, body in admin.values() if body is not None]
    outputs = {route.ok for route in ROUTES.values() if route.ok is not None} | {ErrorBody, NotReady, BatchResponse}
    _, schema = models_json_schema([(m, "validation") for m in inputs]
                                   + [(m, "serialization") for m in sorted(outputs, key=lambda m: m.__name__)],
                                   ref_template=_REF)
    doc.setdefault("components", {})["schemas"] = dict(sorted(schema.get("$defs", {}).items()))
    top_k = {"name": "top_k", "in": "query", "required": False,
             "description": "the same as the body's top_k (decimal digits); given both ways, the two must agree",
             "schema": {"type": "integer", "minimum": 1, "maximum": models.max_top_k}}
    headers = [
        {"name": "X-Request-Id", "in": "header", "required": False,
         "description": "returned in the response and logged: letters, digits and ._:- up to 128 characters; "
                        "anything else (or none) is replaced by a generated one",
         "schema": {"type": "string"}},
        {"name": "X-Request-Timeout-Ms", "in": "header", "required": False,
         "description": "this request's deadline (default: the service's default_timeout_ms)",
         "schema": {"type": "integer", "minimum": 1, "maximum": app.state.serve.config.max_timeout_ms}},
        {"name": "X-Routing-Key", "in": "header", "required": False,
         "description": "with a rollout: the key that decides which version answers (the same key, the same "
                        "version while the weight holds or grows); default: the image's bytes",
         "schema": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,256}$"}},
        {"name": "X-Capture-Consent", "in": "header", "required": False,
         "description": "with capture on: whether the image may be stored (yes or no; default: the service's "
                        "--capture-consent)",
         "schema": {"type": "string", "enum": ["yes", "no"]}},
    ]
    answered_by = {
        "X-Model-Version": {"description": "name@version of the version that answered", "schema": {"type": "string"}},
        "X-Model-Arm": {"description": "with a rollout: primary or candidate",
                        "schema": {"type": "string", "enum": ["primary", "candidate"]}},
        "X-Prediction-Id": {"description": "with capture on, when the answer was captured: its prediction_id",
                            "schema": {"type": "string"}},
    }
    for path, route in ROUTES.items():
        operation = doc["paths"][path][route.method]
        responses: dict[str, Any] = {}
        if route.ok is None:
            responses["200"] = {"description": route.ok_text, "content": {"text/plain": {"schema": {"type": "string"}}}}
        else:
            responses["200"] = {"description": route.ok_text, "content": {"application/json": {"schema": _ref(route.ok)}}}
        error_model = NotReady if path == "/readyz" else ErrorBody
        for status, text in sorted(route.errors.items()):
            responses[str(status)] = {"description": text,
                                      "content": {"application/json": {"schema": _ref(error_model)}}}
        if path == "/v1/predict":
            responses["200"]["headers"] = answered_by
        operation["responses"] = responses
        if not route.bodies:
            continue
        content: dict[str, Any] = {}
        for kind in route.bodies:
            if kind == "raw":
                content[_MEDIA[kind]] = {"schema": {"type": "string", "format": "binary",
                                                    "description": "the image itself: any content type other than "
                                                                   "JSON or multipart is read as the image's bytes"}}
            else:
                content[_MEDIA[kind]] = {"schema": _ref(request_bodies[path][kind])}
        operation["requestBody"] = {"required": True, "content": content}
        operation["parameters"] = [top_k, *headers]
    bearer = {"bearer": []}
    for path, (route, body) in admin.items():
        for method, operation in doc["paths"][path].items():
            operation["security"] = [bearer]
            media = "image/*" if path.endswith("/image") else "application/json"
            schema = {"type": "string", "format": "binary"} if media == "image/*" else {"type": "object"}
            operation["responses"] = {
                "200": {"description": route.ok_text if method == route.method else "what was erased",
                        "content": {media: {"schema": schema}}},
                **{str(status): {"description": text, "content": {"application/json": {"schema": _ref(ErrorBody)}}}
                   for status, text in sorted(route.errors.items())}}
            if body is not None and method == route.method:
                operation["requestBody"] = {"required": False,
                                            "content": {"application/json": {"schema": _ref(body)}}}
    if admin:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
