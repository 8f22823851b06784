"""The published OpenAPI document: FastAPI's, plus what the predict handlers read from the raw request."""

from __future__ import annotations

from typing import Any

from fastapi.openapi.utils import get_openapi

__all__ = ["openapi_document"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string", "description": "stable: invalid_base64, unsupported_format, image_too_large, "
                                                  "image_too_small, decode_error, empty_input, invalid_request, "
                                                  "url_not_allowed, url_fetch_failed, too_many_images, queue_full, ..."},
        "message": {"type": "string"}}}},
}
_PREDICTION = {
    "type": "object",
    "required": ["label", "score", "top_k", "unknown", "model"],
    "properties": {
        "label": {"type": ["string", "null"]},
        "scientific_name": {"type": ["string", "null"]},
        "score": {"type": ["number", "null"]},
        "index": {"type": ["integer", "null"]},
        "top_k": {"type": "array", "items": {"type": "object", "properties": {
            "label": {"type": "string"}, "score": {"type": "number"}}}},
        "unknown": {"type": "boolean"},
        "model": {"type": "string"},
        "timings": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}
_IMAGE = {"type": "string", "description": "base64 or a data: URI of a JPEG, PNG, WebP, GIF, BMP or TIFF"}
_URL = {"type": "string", "description": "an http(s) URL of the image; refused (url_not_allowed) unless the service "
                                         "enables URL inputs and allows its host"}


def _errors() -> dict[str, Any]:
    content = {"application/json": {"schema": _ERROR}}
    return {str(code): {"description": text, "content": content} for code, text in [
        (400, "invalid input (bad base64, empty, URL not allowed or its fetch failed)"), (413, "body or image too large"),
        (415, "unsupported image format"), (422, "undecodable, too small, or an invalid request"),
        (429, "queue full; see Retry-After"), (503, "deadline passed while queued, or not ready"),
        (504, "deadline passed during inference")]}


def openapi_document(app: Any, max_top_k: int) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    top_k = {"name": "top_k", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": max_top_k}}
    bodies = {
        "/v1/predict": ({"type": "object", "properties": {"image": _IMAGE, "url": _URL,
                                                        "top_k": top_k["schema"]}},
                        {"file": {"type": "string", "format": "binary"}}, _PREDICTION),
        "/v1/predict/batch": ({"type": "object", "properties": {"images": {"type": "array", "items": {
                                 "anyOf": [_IMAGE, {"type": "object", "required": ["url"], "properties": {"url": _URL}}]}},
                                                              "top_k": top_k["schema"]}},
                              {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                              {"type": "object", "required": ["predictions"], "properties": {"predictions": {
                                  "type": "array", "items": {"anyOf": [_PREDICTION, _ERROR]}}}}),
    }
    for path, (json_body, multipart, ok) in bodies.items():
        operation = doc["paths"][path]["post"]
        operation["parameters"] = [top_k]
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": json_body},
            "multipart/form-data": {"schema": {"type": "object", "properties": multipart}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                         "description": "the image itself (any image content type)"},
        }}
        operation["responses"] = {"200": {"description": "predictions",
                                          "content": {"application/json": {"schema": ok}}}, **_errors()}
    doc["paths"]["/metrics"]["get"]["responses"] = {"200": {"description": "Prometheus text format",
                                                            "content": {"text/plain": {"schema": {"type": "string"}}}}}
    return doc
