"""The HTTP service: ``create_app(classifier_or_ref, ServeConfig(...))`` gives a FastAPI app with dynamic
batching, bounded queueing, deadlines, Prometheus metrics and JSON logs. Needs the ``serve`` extra."""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run"]


def create_app(classifier_or_ref, config: ServeConfig | None = None):
    from .app import create_app as _create_app

    return _create_app(classifier_or_ref, config)


def run(classifier_or_ref, config: ServeConfig | None = None, *, log_level: str = "info") -> None:
    """Serve with uvicorn on ``config.host``:``config.port`` until interrupted (Ctrl-C drains and stops)."""
    import uvicorn

    from .logs import configure_logging

    config = config if config is not None else ServeConfig()
    configure_logging()
    app = create_app(classifier_or_ref, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, ws="none", lifespan="on",
                timeout_graceful_shutdown=config.drain_timeout_s + 5)
