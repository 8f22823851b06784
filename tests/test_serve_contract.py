"""Contract: schemathesis against the service's OpenAPI document, over HTTP to a live loopback server.

The served document (``GET /openapi.json``) describes the predict routes' three body forms, ``top_k`` and
the error answers. For generation the test narrows the image strings to a real photo some of the time, so
that success answers get checked too.

Checks: ``not_a_server_error`` (no 5xx for any generated request) and ``response_schema_conformance``.
"""

from __future__ import annotations

import copy
import io

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402
from serve_server import LiveServer  # noqa: E402

from speciesclf.serve import ServeConfig, create_app  # noqa: E402

pytestmark = pytest.mark.shared

MAX_EXAMPLES = 25  # per operation
ROUTES = {("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"), ("/v1/models", "get"),
          ("/v1/predict", "post"), ("/v1/predict/batch", "post")}


def _jpeg_b64() -> str:
    import base64

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 140, 60)).save(buffer, "JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def _with_documented_requests(doc: dict) -> dict:
    """The generated document plus the request forms of docs/serve.md (its own are empty)."""
    doc = copy.deepcopy(doc)
    photo = _jpeg_b64()
    top_k_query = {"name": "top_k", "in": "query", "required": False,
                   "schema": {"type": "integer", "minimum": -5, "maximum": 2000}}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
    prediction = {"type": "object", "required": ["label", "top_k", "model"]}
    single = {
        "type": "object",
        "properties": {"image": {"anyOf": [{"type": "string"}, {"enum": [photo]}]},
                       "top_k": {"type": "integer", "minimum": -2, "maximum": 1500}},
    }
    batch = {
        "type": "object",
        "properties": {"images": {"type": "array", "maxItems": 6,
                                  "items": {"anyOf": [{"type": "string"}, {"enum": [photo]}]}},
                       "top_k": {"type": "integer", "minimum": -2, "maximum": 1500}},
    }
    for path, body, ok in [("/v1/predict", single, prediction),
                           ("/v1/predict/batch", batch, {"type": "object", "required": ["predictions"]})]:
        op = doc["paths"][path]["post"]
        op["parameters"] = [top_k_query]
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": body},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file" if path == "/v1/predict" else "files": {"type": "string", "format": "binary"}}}},
        }}
        op["responses"] = {"200": {"description": "ok", "content": {"application/json": {"schema": ok}}},
                           "default": {"description": "error", "content": {"application/json": {"schema": error}}}}
    return doc


@pytest.fixture(scope="module")
def live(species100):
    app = create_app(species100, ServeConfig(max_body_bytes=2**20, max_wait_ms=2))
    with LiveServer(app) as server:
        yield app, server


def test_openapi_document(live) -> None:
    app, server = live
    with httpx.Client(base_url=server.url, timeout=30) as c:
        served = c.get("/openapi.json")
    assert served.status_code == 200
    doc = served.json()
    assert {(p, m) for p, ops in doc["paths"].items() for m in ops} == ROUTES
    for path in ("/v1/predict", "/v1/predict/batch"):
        operation = doc["paths"][path]["post"]
        assert set(operation["requestBody"]["content"]) == {"application/json", "multipart/form-data",
                                                            "application/octet-stream"}
        assert {"200", "400", "413", "415", "422", "429", "503", "504"} <= set(operation["responses"])
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_schemathesis_no_server_errors_and_schema_conformance(live) -> None:
    app, server = live
    with httpx.Client(base_url=server.url, timeout=30) as c:
        served = c.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(_with_documented_requests(served))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.path, op.method.lower()) for op in operations} == ROUTES
    seen: dict[str, set[int]] = {}
    failures: list[str] = []
    for operation in operations:
        statuses = seen.setdefault(f"{operation.method.upper()} {operation.path}", set())

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case) -> None:
            response = case.call(base_url=server.url, timeout=30)
            statuses.add(response.status_code)
            try:
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
            except Exception as e:  # collected, so every operation runs and the report lists them all
                failures.append(f"{case.method} {case.path}: {type(e).__name__}: {str(e)[:600]}")
                raise

        try:
            run()
        except Exception:
            pass  # recorded in failures
    print("\n[schemathesis] status codes per operation:", {k: sorted(v) for k, v in seen.items()})
    assert not failures, "\n".join(failures[:10])
    assert all(statuses and max(statuses) < 500 for statuses in seen.values()), seen
