"""Contract: the service's OpenAPI document, generated from its pydantic models, against the live routes.

The served document (``GET /openapi.json``) is tested as served: schemathesis generates requests from it for
every operation and every request body type it documents, valid ones (positive) and invalid ones
(negative), over HTTP to a live loopback server. For valid requests to reach a success answer too, the
image strings are sometimes a real photo, and deadlines are long enough to be met (see _with_a_real_photo).

Checks: no 5xx; every status answered is documented for that route; the answer's content type and body
match the documented ones; invalid requests are refused (``negative_data_rejection``). And each documented
body type is really taken: a valid request of each answers 200.
"""

from __future__ import annotations

import copy

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from serve_server import LiveServer, b64, jpeg  # noqa: E402

from speciesclf.serve import ServeConfig, create_app  # noqa: E402
from speciesclf.serve.schemas import PredictionBody  # noqa: E402

pytestmark = pytest.mark.shared

MAX_EXAMPLES = 20  # per operation, body type and generation mode
ROUTES = {("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"), ("/v1/models", "get"),
          ("/v1/predict", "post"), ("/v1/predict/batch", "post")}
BODY_TYPES = {"/v1/predict": {"application/json", "multipart/form-data", "application/octet-stream"},
              "/v1/predict/batch": {"application/json", "multipart/form-data"}}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def live(species100):
    app = create_app(species100, ServeConfig(max_body_bytes=2**20, max_wait_ms=2))
    with LiveServer(app) as server:
        yield app, server


@pytest.fixture(scope="module")
def served(live) -> dict:
    _, server = live
    with httpx.Client(base_url=server.url, timeout=30) as c:
        response = c.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def _with_a_real_photo(doc: dict, photo: str) -> dict:
    """The document with its image strings to be either short random strings or ``photo``, so that
    generation reaches success answers too (a bare ``anyOf: [string, enum]`` would be simplified back to any
    string, which never is a photo), and deadlines of at least 5 s. Nothing else is changed."""
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]

    def either(schema: dict) -> dict:
        return {"anyOf": [{**schema, "maxLength": 64}, {"enum": [photo]}]}

    properties = schemas["PredictRequest"]["properties"]
    properties["image"] = either(properties["image"])
    items = schemas["BatchRequest"]["properties"]["images"]["items"]["oneOf"]
    string = next(i for i, schema in enumerate(items) if schema.get("type") == "string")
    items[string] = either(items[string])
    # A deadline of a few milliseconds is answered 503/504 by design; the no-5xx check is about everything else.
    for path in BODY_TYPES:
        for parameter in doc["paths"][path]["post"]["parameters"]:
            if parameter["name"] == "X-Request-Timeout-Ms":
                parameter["schema"]["minimum"] = 5000
    return doc


def test_the_document_lists_every_route_body_type_and_status(served) -> None:
    doc = served
    assert {(p, m) for p, ops in doc["paths"].items() for m in ops} == ROUTES
    for path, types in BODY_TYPES.items():
        operation = doc["paths"][path]["post"]
        # /v1/predict/batch answers 415 to a raw body: the document must not offer one.
        assert set(operation["requestBody"]["content"]) == types, path
        assert {"200", "400", "413", "415", "422", "429", "500", "503", "504"} <= set(operation["responses"])
    assert set(doc["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}
    assert set(doc["paths"]["/v1/models"]["get"]["responses"]) == {"200", "503"}
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    schemas = doc["components"]["schemas"]
    assert {"PredictRequest", "BatchRequest", "PredictForm", "BatchForm", "UrlInput", "PredictionBody",
            "BatchResponse", "ErrorBody", "ErrorDetail", "Health", "Ready", "NotReady", "ModelsBody"} <= set(schemas)
    # The Prediction contract: label null when unknown, the guess and the open-set score beside it.
    prediction = schemas["PredictionBody"]
    assert {"label", "guess", "score", "open_set_score", "unknown", "top_k", "error"} <= set(prediction["required"])
    assert prediction["additionalProperties"] is False
    # Strict integers: top_k is an integer in the JSON bodies, whose unknown fields are refused.
    for name in ("PredictRequest", "BatchRequest"):
        assert schemas[name]["properties"]["top_k"]["type"] == "integer"
        assert schemas[name]["additionalProperties"] is False


@pytest.mark.parametrize("path, media_type", sorted((p, t) for p, types in BODY_TYPES.items() for t in types))
def test_every_documented_body_type_is_taken(live, served, path, media_type) -> None:
    _, server = live
    photo = jpeg()
    bodies = {
        ("/v1/predict", "application/json"): {"image": b64(photo), "top_k": 2},
        ("/v1/predict", "multipart/form-data"): {"file": photo, "top_k": 2},
        ("/v1/predict", "application/octet-stream"): photo,
        ("/v1/predict/batch", "application/json"): {"images": [b64(photo), b64(photo)], "top_k": 2},
        ("/v1/predict/batch", "multipart/form-data"): {"files": [photo, photo], "top_k": 2},
    }
    operation = schemathesis.openapi.from_dict(served)[path]["POST"]
    query = {"top_k": 2} if media_type == "application/octet-stream" else {}  # a raw body has no fields
    case = operation.Case(body=bodies[(path, media_type)], media_type=media_type, query=query)
    response = case.call(base_url=server.url, timeout=30)
    assert response.status_code == 200, response.text
    case.validate_response(response, checks=CHECKS)
    predictions = [response.json()] if path == "/v1/predict" else response.json()["predictions"]
    assert predictions and all(len(p["top_k"]) == 2 for p in predictions)


def test_an_undocumented_body_type_is_refused_with_a_documented_status(live, served) -> None:
    _, server = live
    r = httpx.post(server.url + "/v1/predict/batch", content=jpeg(),
                   headers={"content-type": "application/octet-stream"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "invalid_request"
    assert "415" in served["paths"]["/v1/predict/batch"]["post"]["responses"]


def test_a_prediction_answer_is_to_dict_of_the_prediction(live, species100) -> None:
    _, server = live
    photo = jpeg()
    r = httpx.post(server.url + "/v1/predict?top_k=3", content=photo, timeout=30)
    assert r.status_code == 200
    expected = species100.predict(photo, top_k=3).to_dict()
    got = r.json()
    # "arm" is a rollout's (which version answered): a single Classifier's predictions have none; nor is
    # there a "prediction_id" without capture (tests/test_serve_capture.py).
    assert set(got) == set(expected) == set(PredictionBody.model_fields) - {"arm", "prediction_id"}
    for key in ("label", "guess", "index", "scientific_name", "unknown", "model", "error"):
        assert got[key] == expected[key], key
    assert got["score"] == pytest.approx(expected["score"]) and got["open_set_score"] == pytest.approx(
        expected["open_set_score"])
    assert [t["label"] for t in got["top_k"]] == [t["label"] for t in expected["top_k"]]
    PredictionBody.model_validate(got)


def test_schemathesis_over_every_operation_body_type_and_mode(live, served) -> None:
    _, server = live
    schema = schemathesis.openapi.from_dict(_with_a_real_photo(served, b64(jpeg())))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.path, op.method.lower()) for op in operations} == ROUTES
    seen: dict[str, set[int]] = {}
    body_types: dict[str, set[str]] = {}
    failures: list[str] = []
    for operation in operations:
        # Operations without parameters or a body have nothing to make invalid.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.path in BODY_TYPES else [])
        for mode in modes:
            label = f"{operation.method.upper()} {operation.path} {mode.value}"
            statuses = seen.setdefault(label, set())
            types = body_types.setdefault(operation.path, set())
            examples = MAX_EXAMPLES * (2 if operation.path in BODY_TYPES else 1)

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                response = case.call(base_url=server.url, timeout=30)
                statuses.add(response.status_code)
                if case.media_type:
                    types.add(case.media_type)
                try:
                    case.validate_response(response, checks=CHECKS)
                except Exception as e:  # collected, so every operation runs and the report lists them all
                    failures.append(f"{label}: {type(e).__name__}: {str(e)[:600]}")
                    raise

            try:
                run()
            except Exception:
                pass  # recorded in failures
    print("\n[schemathesis] status codes:", {k: sorted(v) for k, v in seen.items()})
    assert not failures, "\n".join(failures[:10])
    assert all(statuses and max(statuses) < 500 for statuses in seen.values()), seen
    for path, types in BODY_TYPES.items():  # generation sent every documented body type
        assert body_types[path] == types, (path, body_types[path])
        # and valid requests reached success answers, not only refusals
        assert 200 in seen[f"POST {path} positive"], (path, seen)
