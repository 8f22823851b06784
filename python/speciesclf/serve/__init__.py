"""The HTTP service: ``create_app(classifier_or_ref, ServeConfig(...))`` gives a FastAPI app with dynamic
batching, bounded queueing, deadlines, Prometheus metrics and JSON logs. Needs the ``serve`` extra."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

from ..capture.store import CaptureError
from .config import ServeConfig

__all__ = ["ServeConfig", "ServeStartupError", "create_app", "run"]


class ServeStartupError(RuntimeError):
    """The service did not start: its model could not be loaded or warmed up (the message says why, on one
    line), its capture database could not be opened, or the HTTP server itself did not start."""


def create_app(classifier_or_ref, config: ServeConfig | None = None, *, on_load_failure=None,
               reload_signal: bool = False):
    from .app import create_app as _create_app

    return _create_app(classifier_or_ref, config, on_load_failure=on_load_failure, reload_signal=reload_signal)


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def run(classifier_or_ref, config: ServeConfig | None = None, *, log_level: str = "info", workers: int = 1) -> None:
    """Serve with uvicorn on ``config.host``:``config.port`` until interrupted (Ctrl-C drains and stops).

    ``workers`` > 1 starts that many uvicorn worker processes on the same socket, each loading the model
    itself (so ``classifier_or_ref`` must then be a reference ``Classifier.load`` takes, not an object)
    and each with its own queue and batches; /metrics sums them all (prometheus_client's multiprocess
    mode, in a private temporary folder removed when the service stops). A registry reference is served as
    a rollout Deployment (see :func:`create_app`) in every worker, all on one shared rollout state; SIGHUP
    makes a worker look at the registry's aliases at once.

    Raises :class:`ServeStartupError` when the model cannot be loaded or warmed up at start-up (with
    several workers: when any worker's cannot), after the server has stopped: a process that can never be
    ready ends instead of answering /healthz forever. ``log_level`` applies to the service's JSON lines and
    to uvicorn's."""
    import uvicorn

    from .logs import configure_logging, uvicorn_log_config

    config = config if config is not None else ServeConfig()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if log_level not in _LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")
    # Every request gets one structured JSON line from speciesclf.serve.logs; uvicorn's access log would add a
    # second, unstructured one (and cost the event loop about a tenth of its time under load).
    common = dict(host=config.host, port=config.port, log_level=log_level, ws="none", lifespan="on",
                  timeout_graceful_shutdown=config.drain_timeout_s + 5, access_log=False,
                  log_config=uvicorn_log_config(log_level))
    if workers == 1:
        configure_logging(_level(log_level))
        failures: list[str] = []

        def stop(reason: str) -> None:
            failures.append(reason)
            server.should_exit = True  # uvicorn then shuts down as on Ctrl-C

        try:
            app = create_app(classifier_or_ref, config, on_load_failure=stop, reload_signal=True)
        except CaptureError as e:  # a capture database that cannot be opened (without --capture-optional)
            raise ServeStartupError(str(e)) from None
        server = uvicorn.Server(uvicorn.Config(app, **common))
        try:
            server.run()
        except SystemExit:  # uvicorn's own start-up failure (the port is taken, ...): it logged why
            if not failures:
                raise ServeStartupError(f"the HTTP server did not start on {config.host}:{config.port} (uvicorn's "
                                        "error line above says why)") from None
        if failures:
            raise ServeStartupError(failures[0])
        if not server.started:
            raise ServeStartupError(f"the HTTP server did not start on {config.host}:{config.port} (uvicorn's log "
                                    "says why)")
        return
    if not isinstance(classifier_or_ref, (str, os.PathLike)):
        raise TypeError("workers > 1 needs a model reference (str or path), not a loaded classifier: each "
                        "worker process loads its own")
    run_dir = tempfile.mkdtemp(prefix="speciesclf-serve-")
    try:
        metrics_dir = os.path.join(run_dir, "metrics")
        os.mkdir(metrics_dir)
        # uvicorn's worker processes (spawned, so they import everything afresh) take the settings from the
        # environment; prometheus_client chooses multiprocess mode when it is imported, from PROMETHEUS_MULTIPROC_DIR.
        server_failed = False
        with _environment({_ENV_MODEL: os.fspath(classifier_or_ref), _ENV_CONFIG: json.dumps(config.to_dict()),
                           _ENV_LOG_LEVEL: log_level, _ENV_RUN_DIR: run_dir, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}):
            try:
                uvicorn.run("speciesclf.serve:app_from_environment", factory=True, workers=workers, **common)
            except SystemExit:  # uvicorn's own start-up failure (the port is taken, ...): it logged why
                server_failed = True
        failure = os.path.join(run_dir, _FAILURE_FILE)
        if os.path.exists(failure):
            with open(failure, encoding="utf-8") as f:
                raise ServeStartupError(f.read().strip() or "a worker could not load the model (see its log)")
        if server_failed:
            raise ServeStartupError(f"the HTTP server did not start on {config.host}:{config.port} (uvicorn's "
                                    "error line above says why)")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


_ENV_MODEL = "SPECIESCLF_SERVE_MODEL"
_ENV_CONFIG = "SPECIESCLF_SERVE_CONFIG"
_ENV_LOG_LEVEL = "SPECIESCLF_SERVE_LOG_LEVEL"
_ENV_RUN_DIR = "SPECIESCLF_SERVE_RUN_DIR"
_FAILURE_FILE = "startup-failure"
# A worker that can never serve exits with uvicorn's start-up failure status: its supervisor then stops
# every worker and itself instead of starting the worker again and again.
_STARTUP_FAILURE = 3


def _level(name: str) -> int:
    return getattr(logging, name.upper())


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def app_from_environment():
    """The app of one ``run(..., workers=N)`` worker process: model and settings from the environment."""
    from .logs import configure_logging

    configure_logging(_level(os.environ.get(_ENV_LOG_LEVEL, "info")))
    config = ServeConfig(**json.loads(os.environ[_ENV_CONFIG]))
    try:
        return create_app(os.environ[_ENV_MODEL], config, on_load_failure=_worker_cannot_serve, reload_signal=True)
    except CaptureError as e:
        _worker_cannot_serve(str(e))


def _worker_cannot_serve(reason: str) -> None:
    """Tell run() why (a file in its private folder) and end this worker with the start-up failure status.
    It never became ready, so it holds no accepted work to drain."""
    run_dir = os.environ.get(_ENV_RUN_DIR)
    if run_dir:
        with contextlib.suppress(OSError):
            with open(os.path.join(run_dir, _FAILURE_FILE), "w", encoding="utf-8") as f:
                f.write(reason)
    for handler in logging.getLogger("speciesclf.serve").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stderr.flush()
    os._exit(_STARTUP_FAILURE)
