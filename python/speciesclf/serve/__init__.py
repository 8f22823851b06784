"""The HTTP service: ``create_app(classifier_or_ref, ServeConfig(...))`` gives a FastAPI app with dynamic
batching, bounded queueing, deadlines, Prometheus metrics and JSON logs. Needs the ``serve`` extra."""

from __future__ import annotations

import json
import os

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run"]


def create_app(classifier_or_ref, config: ServeConfig | None = None):
    from .app import create_app as _create_app

    return _create_app(classifier_or_ref, config)


def run(classifier_or_ref, config: ServeConfig | None = None, *, log_level: str = "info", workers: int = 1) -> None:
    """Serve with uvicorn on ``config.host``:``config.port`` until interrupted (Ctrl-C drains and stops).

    ``workers`` > 1 starts that many uvicorn worker processes on the same socket, each loading the model
    itself (so ``classifier_or_ref`` must then be a reference ``Classifier.load`` takes, not an object)
    and each with its own queue and batches."""
    import uvicorn

    from .logs import configure_logging, uvicorn_log_config

    config = config if config is not None else ServeConfig()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    # Every request gets one structured JSON line from speciesclf.serve.logs; uvicorn's access log would add a
    # second, unstructured one (and cost the event loop about a tenth of its time under load).
    common = dict(host=config.host, port=config.port, log_level=log_level, ws="none", lifespan="on",
                  timeout_graceful_shutdown=config.drain_timeout_s + 5, access_log=False,
                  log_config=uvicorn_log_config(log_level))
    if workers == 1:
        configure_logging()
        uvicorn.run(create_app(classifier_or_ref, config), **common)
        return
    if not isinstance(classifier_or_ref, (str, os.PathLike)):
        raise TypeError("workers > 1 needs a model reference (str or path), not a loaded classifier: each "
                        "worker process loads its own")
    # uvicorn's worker processes import the app themselves: the settings travel in the environment.
    os.environ[_ENV_MODEL] = os.fspath(classifier_or_ref)
    os.environ[_ENV_CONFIG] = json.dumps(config.to_dict())
    uvicorn.run("speciesclf.serve:app_from_environment", factory=True, workers=workers, **common)


_ENV_MODEL = "SPECIESCLF_SERVE_MODEL"
_ENV_CONFIG = "SPECIESCLF_SERVE_CONFIG"


def app_from_environment():
    """The app of one ``run(..., workers=N)`` worker process: model and settings from the environment."""
    from .logs import configure_logging

    configure_logging()
    config = ServeConfig(**json.loads(os.environ[_ENV_CONFIG]))
    return create_app(os.environ[_ENV_MODEL], config)
