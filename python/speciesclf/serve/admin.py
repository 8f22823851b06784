"""The admin API under /v1/admin/: a rollout's status, start, pause, resume, promote, rollback and weight.

Registered only when the service has an admin token; every call carries ``Authorization: Bearer <token>``,
compared in constant time. Errors of the rollout come from the one table in :mod:`speciesclf.errors`.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from ..errors import error_code, error_status
from ._images import ApiError
from .logs import log
from .schemas import ADMIN_ROUTES, ReasonRequest, StartRequest, WeightRequest, validation_message

__all__ = ["add_admin_routes", "bearer_authorizer"]

_ACTIONS = ("pause", "resume", "promote", "rollback")


def bearer_authorizer(token: str, what: str) -> Callable[[Request], None]:
    """A check of ``Authorization: Bearer <token>``: 401 without one, 403 with another token; constant time.
    ``what`` names the token in the messages (admin, feedback)."""
    expected = token.encode("utf-8")

    def authorize(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "unauthorized", f"the {what} API needs an 'Authorization: Bearer <token>' header",
                           {"WWW-Authenticate": "Bearer"})
        # Headers arrive decoded as latin-1: encoding back gives the bytes sent, a UTF-8 token's included.
        if not hmac.compare_digest(given.strip().encode("latin-1", "replace"), expected):
            raise ApiError(403, "forbidden", f"the bearer token is not this service's {what} token")

    return authorize


def add_admin_routes(app: FastAPI, state: Any, token: str) -> None:
    """The admin routes on ``app``; ``state`` is the app's serving state (its ``deployment``, when ready)."""
    authorize = bearer_authorizer(token, "admin")

    def deployment() -> Any:
        if not state.ready:
            raise ApiError(503, "not_ready", state.public_load_error or "the model is loading", {"Retry-After": "1"})
        if state.deployment is None:
            raise ApiError(503, "not_ready", "this service serves a single model, not a rollout: serve a registry "
                           "reference (--model name@production) to have one")
        return state.deployment

    async def act(request: Request, body_model: type[BaseModel] | None, change: Callable[[Any, Any], Any]):
        authorize(request)
        target = deployment()
        body = await _body(request, body_model)
        try:
            # Rollout changes read and write the registry (and start() loads a model): off the event loop.
            await asyncio.to_thread(_apply, target, change, body)
        except (ValueError, RuntimeError) as e:
            status, code = error_status(e), error_code(e)
            if status >= 500:
                raise
            raise ApiError(status, code, str(e)) from None
        log("admin", route=request.url.path, phase=(target.rollout.state or {}).get("phase"))
        return _status(target)

    @app.get("/v1/admin/rollout")
    async def status(request: Request):
        authorize(request)
        return _status(deployment())

    @app.post("/v1/admin/rollout/start")
    async def start(request: Request):
        return await act(request, StartRequest, lambda d, body: _start(d, body, state.config.rollout))

    def verdict_route(action: str) -> Callable:
        def change(d: Any, body: ReasonRequest) -> Any:
            method = getattr(d.rollout, action)  # Rollout.pause, .resume, .promote, .rollback
            return method(body.reason) if body.reason else method()

        async def handler(request: Request):
            return await act(request, ReasonRequest, change)

        return handler

    for action in _ACTIONS:
        app.add_api_route(f"/v1/admin/rollout/{action}", verdict_route(action), methods=["POST"],
                          name=f"rollout_{action}")

    @app.post("/v1/admin/rollout/weight")
    async def weight(request: Request):
        return await act(request, WeightRequest, lambda d, body: d.rollout.set_weight(body.weight))

    assert {"/v1/admin/rollout", *(f"/v1/admin/rollout/{a}" for a in (*_ACTIONS, "start", "weight"))} == set(
        ADMIN_ROUTES), "the admin routes and their documentation (schemas.ADMIN_ROUTES) differ"


def _apply(target: Any, change: Callable[[Any, Any], Any], body: Any) -> None:
    change(target, body)
    # Act on the new state now (swap in a promoted candidate, drop a rolled-back one), not at the next sync.
    target.sync()


def _start(target: Any, body: StartRequest, default_spec: str | None) -> Any:
    from ..rollout import parse_rollout

    name = target.name
    ref = body.candidate if "@" in body.candidate else f"{name}@{body.candidate}"
    if ref.partition("@")[0] != name:
        raise ApiError(422, "invalid_request", f"the candidate {body.candidate[:80]!r} is not a version of {name}")
    spec = body.rollout if body.rollout is not None else default_spec
    # Without a spec, start_candidate uses the policy the deployment watches the aliases with (a canary).
    return target.start_candidate(ref, parse_rollout(spec) if spec is not None else None)


async def _body(request: Request, model: type[BaseModel] | None) -> Any:
    if model is None:
        return None
    raw = await request.body()
    if not raw.strip():
        raw = b"{}"  # a body is optional where every field is
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise ApiError(422, "invalid_request", validation_message(e, 0)) from None


def _status(target: Any) -> JSONResponse:
    return JSONResponse(target.status())
