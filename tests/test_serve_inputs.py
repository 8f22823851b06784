"""HTTP input rules of the service, one rule per kind of input (issue 12, item 10): integers are strict,
``top_k`` is given once, a request that does not match its documented schema is refused as a whole with one
code, the CLI names the flags a user can change, and no answer reveals a server path."""

from __future__ import annotations

import logging
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_server import LiveServer, b64, jpeg  # noqa: E402
from speciesclf.serve import ServeConfig, create_app  # noqa: E402
from speciesclf.serve.logs import logger  # noqa: E402


@pytest.fixture(scope="module")
def server(species100):
    with LiveServer(create_app(species100, ServeConfig())) as live:
        yield live


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    return response.status_code, body["error"]["code"], body["error"]["message"]


# --- strict integers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", ["2", 2.0, "2.0", True, 2.5, None, [2]])
def test_json_top_k_must_be_a_json_integer(server, top_k) -> None:
    r = httpx.post(server.url + "/v1/predict", json={"image": b64(jpeg()), "top_k": top_k}, timeout=30)
    status, code, message = error_of(r)
    assert (status, code) == (422, "invalid_request") and "top_k" in message, message


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/predict/batch"])
def test_json_top_k_integer_is_accepted(server, path) -> None:
    body = {"image": b64(jpeg()), "top_k": 2} if path == "/v1/predict" else {"images": [b64(jpeg())], "top_k": 2}
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    prediction = r.json() if path == "/v1/predict" else r.json()["predictions"][0]
    assert len(prediction["top_k"]) == 2


@pytest.mark.parametrize("query", ["2.0", "+2", " 2", "2e0", "0x2", "٢"])
def test_query_top_k_must_be_decimal_digits(server, query) -> None:
    r = httpx.post(server.url + "/v1/predict", params={"top_k": query}, content=jpeg(), timeout=30)
    status, code, message = error_of(r)
    assert (status, code) == (422, "invalid_request") and "top_k" in message, message


def test_multipart_top_k_is_decimal_digits(server) -> None:
    ok = httpx.post(server.url + "/v1/predict", files={"file": ("a.jpg", jpeg(), "image/jpeg")},
                    data={"top_k": "2"}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["top_k"]) == 2, ok.text
    bad = httpx.post(server.url + "/v1/predict", files={"file": ("a.jpg", jpeg(), "image/jpeg")},
                     data={"top_k": "2.0"}, timeout=30)
    assert error_of(bad)[:2] == (422, "invalid_request")


# --- top_k given twice --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/predict/batch"])
def test_top_k_in_query_and_body_must_agree(server, path) -> None:
    body = {"image": b64(jpeg()), "top_k": 2} if path == "/v1/predict" else {"images": [b64(jpeg())], "top_k": 2}
    r = httpx.post(server.url + path, params={"top_k": "4"}, json=body, timeout=30)
    status, code, message = error_of(r)
    assert (status, code) == (422, "invalid_request")
    assert "query" in message and "body" in message and "4" in message and "2" in message, message
    same = httpx.post(server.url + path, params={"top_k": "2"}, json=body, timeout=30)
    assert same.status_code == 200, same.text


def test_top_k_in_query_and_multipart_field_must_agree(server) -> None:
    r = httpx.post(server.url + "/v1/predict", params={"top_k": "4"}, files={"file": ("a.jpg", jpeg(), "image/jpeg")},
                   data={"top_k": "2"}, timeout=30)
    assert error_of(r)[:2] == (422, "invalid_request")


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/predict/batch"])
def test_top_k_twice_in_the_query_is_refused_like_a_multipart_field_given_twice(server, path) -> None:
    body = {"image": b64(jpeg())} if path == "/v1/predict" else {"images": [b64(jpeg())]}
    r = httpx.post(server.url + path + "?top_k=1&top_k=3", json=body, timeout=30)
    status, code, message = error_of(r)
    assert (status, code) == (422, "invalid_request") and "top_k" in message and "once" in message, message


# --- one rule for requests that do not match the schema ------------------------------------------------------


@pytest.mark.parametrize("item", [{"url": "https://example.com/a.jpg", "y": 1}, {"y": 1}, {}, 7, None, ["x"],
                                  {"url": 5}])
def test_a_batch_item_of_the_wrong_shape_refuses_the_request(server, item) -> None:
    r = httpx.post(server.url + "/v1/predict/batch", json={"images": [b64(jpeg()), item]}, timeout=30)
    status, code, message = error_of(r)
    assert (status, code) == (422, "invalid_request"), r.text
    assert "images[1]" in message, message
    if isinstance(item, dict) and "y" in item:
        assert "'y'" in message, message  # the unknown key is named


@pytest.mark.parametrize("body", [{"image": "QUJD", "extra": 1}, {"images": [], "x": 1}])
def test_unknown_json_fields_are_named(server, body) -> None:
    path = "/v1/predict" if "image" in body else "/v1/predict/batch"
    status, code, message = error_of(httpx.post(server.url + path, json=body, timeout=30))
    assert (status, code) == (422, "invalid_request") and ("'extra'" in message or "'x'" in message), message


@pytest.mark.parametrize("path, files", [
    ("/v1/predict", [("file", ("a.jpg", b"x", "image/jpeg")), ("other", ("b.jpg", b"x", "image/jpeg"))]),
    ("/v1/predict/batch", [("files", ("a.jpg", b"x", "image/jpeg")), ("other", ("b.jpg", b"x", "image/jpeg"))]),
])
def test_unknown_multipart_fields_are_refused_like_unknown_json_fields(server, path, files) -> None:
    status, code, message = error_of(httpx.post(server.url + path, files=files, timeout=30))
    assert (status, code) == (422, "invalid_request") and "'other'" in message, message


def test_a_bad_base64_item_stays_the_items_own_error(server) -> None:
    r = httpx.post(server.url + "/v1/predict/batch", json={"images": [b64(jpeg()), "@@@"]}, timeout=30)
    assert r.status_code == 200
    first, second = r.json()["predictions"]
    assert first["error"] is None and second == {"error": {"code": "invalid_base64", "message": second["error"]["message"]}}


# --- bodies made of many small problems ---------------------------------------------------------------------
# Validation runs on the event loop: its cost must follow the body's size (bounded by max_body_bytes), not the
# number of problems pydantic could list. Before the fix a 2 MiB list of ints held the loop for ~9 s.


def test_a_batch_of_too_many_items_is_413_without_validating_each(server) -> None:
    body = b'{"images":[' + b",".join([b"1"] * 1_000_000) + b"]}"  # 2 MiB, a million bad items
    start = time.perf_counter()
    r = httpx.post(server.url + "/v1/predict/batch", content=body, headers={"content-type": "application/json"},
                   timeout=120)
    seconds = time.perf_counter() - start
    status, code, message = error_of(r)
    assert (status, code) == (413, "too_many_images") and "max_batch_request=64" in message, message
    assert seconds < 3, f"{seconds:.1f} s for one request: the event loop was held that long"


def test_a_body_of_a_million_unknown_fields_is_refused_quickly(server) -> None:
    body = ("{" + ",".join(f'"k{i}":1' for i in range(1_000_000)) + "}").encode()  # 12 MiB
    start = time.perf_counter()
    r = httpx.post(server.url + "/v1/predict", content=body, headers={"content-type": "application/json"},
                   timeout=120)
    seconds = time.perf_counter() - start
    status, code, message = error_of(r)
    assert (status, code) == (422, "invalid_request") and "1000000 problems" in message, message
    assert seconds < 4, f"{seconds:.1f} s for one request: the event loop was held that long"


# --- the CLI names what the user can change -------------------------------------------------------------------


def test_max_queue_below_the_batch_request_limit_names_the_cli_flags(capsys, monkeypatch) -> None:
    from speciesclf import serve
    from speciesclf.cli import main

    started = []
    monkeypatch.setattr(serve, "run", lambda model, config, **kw: started.append(config))
    assert main(["serve", "--max-queue", "32"]) == 1
    err = capsys.readouterr().err
    assert "--max-queue" in err and "--max-batch-request" in err, err
    assert "ServeConfig" not in err, err
    assert main(["serve", "--max-queue", "32", "--max-batch-request", "16"]) == 0
    assert started and (started[0].max_queue, started[0].max_batch_request) == (32, 16)


# --- no server paths in answers -------------------------------------------------------------------------------


def test_a_failed_load_tells_clients_no_server_path(tmp_path, monkeypatch) -> None:
    home = tmp_path / "private-home-dir"
    monkeypatch.setenv("SPECIESCLF_HOME", str(home))
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logger.addHandler(keep)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        app = create_app("nosuch-model", ServeConfig())
        live = LiveServer(app, ready_path="/healthz")
        with live, httpx.Client(base_url=live.url, timeout=30) as c:
            deadline = time.monotonic() + 30
            while c.get("/readyz").json()["status"] == "loading":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            answers = [c.get("/readyz"), c.post("/v1/predict", content=jpeg()), c.get("/v1/models")]
    finally:
        logger.removeHandler(keep)
        logger.setLevel(previous)
    assert answers[0].status_code == 503 and answers[0].json()["status"] == "failed"
    for answer in answers:
        assert answer.status_code == 503
        assert str(tmp_path) not in answer.text and "private-home-dir" not in answer.text, answer.text
        assert "nosuch-model" not in answer.text  # a reference may itself be a path (a bundle's)
    # The operator still finds the whole reason in the server's log.
    failed = [r for r in records if r.getMessage() == "model load failed"]
    assert failed and "private-home-dir" in failed[0].fields["error"]
