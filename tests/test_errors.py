"""The one error table (speciesclf.errors): exception class -> stable code and HTTP status, walked along the
class's MRO; one error shape {"code", "message"} for Prediction.to_dict, the CLI's JSON and the service; and
docs/serve.md's table saying the same as the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import speciesclf
from speciesclf import errors
from speciesclf.errors import CodedError, error_body, error_code, error_status, error_table
from speciesclf.model.weights import WeightsError
from speciesclf.model.runtimes import ModelLoadError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "serve.md"


def exported_error_classes() -> list[type[BaseException]]:
    found = {getattr(module, name) for module in (speciesclf, errors) for name in module.__all__}
    found |= {WeightsError, ModelLoadError}
    return sorted((c for c in found if isinstance(c, type) and issubclass(c, BaseException)
                   and c is not CodedError), key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", exported_error_classes(), ids=lambda c: c.__name__)
def test_every_exported_error_class_has_a_code_and_a_status(cls) -> None:
    exc = cls("something went wrong")
    assert error_code(exc) != "internal", f"{cls.__name__} falls through the table"
    assert re.fullmatch(r"[a-z][a-z0-9_]*", error_code(exc))
    assert 400 <= error_status(exc) < 600
    assert error_body(exc) == {"code": error_code(exc), "message": "something went wrong"}


# The codes and statuses the service answered before the table existed: clients depend on them.
@pytest.mark.parametrize("cls, code, status", [
    (speciesclf.EmptyInputError, "empty_input", 400),
    (speciesclf.UnsupportedFormatError, "unsupported_format", 415),
    (speciesclf.DecodeError, "decode_error", 422),
    (speciesclf.ImageTooLargeError, "image_too_large", 422),
    (speciesclf.InvalidImageError, "decode_error", 422),
    (speciesclf.ImageReadError, "decode_error", 422),
    (speciesclf.ImageError, "decode_error", 422),
    (speciesclf.ModelOutputError, "model_error", 500),
    (speciesclf.InvalidBase64Error, "invalid_base64", 400),
    (speciesclf.ImageTooSmallError, "image_too_small", 422),
    (speciesclf.PayloadTooLargeError, "image_too_large", 413),
    (speciesclf.UrlNotAllowedError, "url_not_allowed", 400),
    (speciesclf.UrlFetchError, "url_fetch_failed", 400),
])
def test_the_codes_clients_know_are_kept(cls, code, status) -> None:
    assert (error_code(cls("x")), error_status(cls("x"))) == (code, status)


def test_lookups_walk_the_mro_not_class_names() -> None:
    class TruncatedUpload(speciesclf.DecodeError):
        pass

    class DecodeError(Exception):  # the same name, another class: no code by name
        pass

    assert error_code(TruncatedUpload("x")) == "decode_error"
    assert error_code(DecodeError("x")) == "internal" and error_status(DecodeError("x")) == 500
    assert error_code(speciesclf.UrlFetchError("x")) == "url_fetch_failed"  # not its parent's decode_error
    assert error_code(ValueError("x")) == "internal"


def test_an_error_that_names_its_own_code() -> None:
    e = CodedError(429, "queue_full", "try later")
    assert (error_code(e), error_status(e), error_body(e)) == ("queue_full", 429, {"code": "queue_full",
                                                                                   "message": "try later"})


def test_prediction_to_dict_uses_the_one_shape() -> None:
    p = speciesclf.Prediction(label=None, score=None, index=None, top_k=[], unknown=False, model="m@1",
                              timings={}, error=speciesclf.UrlNotAllowedError("host 'x' is not in the allowed hosts"))
    assert p.to_dict()["error"] == {"code": "url_not_allowed", "message": "host 'x' is not in the allowed hosts"}


def test_the_service_answers_library_errors_from_the_table() -> None:
    pytest.importorskip("fastapi")
    from speciesclf.serve._images import ApiError, error_for_prediction

    for cls, (code, status) in error_table().items():
        answer = error_for_prediction(cls("boom"), field="images[2]")
        assert (answer.status, answer.code) == (status, code)
        assert answer.body() == {"error": {"code": code, "message": "images[2]: boom"}}
    assert ApiError(422, "invalid_request", "bad").body() == {"error": {"code": "invalid_request", "message": "bad"}}


def _documented() -> dict[str, tuple[str, str]]:
    """docs/serve.md's error table: code -> (status column, exception column)."""
    section = DOCS.read_text(encoding="utf-8").split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            for code in re.findall(r"`([a-z0-9_]+)`", cells[0]):
                rows[code] = (cells[1], cells[2])
    return rows


def test_the_docs_table_says_what_the_code_does() -> None:
    documented = _documented()
    for cls, (code, status) in error_table().items():
        assert code in documented, f"{code} ({cls.__name__}) is not in docs/serve.md's error table"
        statuses, classes = documented[code]
        assert str(status) in statuses, f"{code}: docs say {statuses}, the table {status}"
        # every class the table lists is named in its code's row (ImageError stands for "any other")
        assert f"`{cls.__name__}`" in classes, f"{cls.__name__} is not named in the {code} row"
