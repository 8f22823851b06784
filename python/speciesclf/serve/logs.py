"""Structured JSON-line logs of the HTTP service (logger ``speciesclf.serve``). Never logs image bytes."""

from __future__ import annotations

import json
import logging
import time

__all__ = ["JsonFormatter", "configure_logging", "logger", "uvicorn_log_config"]

logger = logging.getLogger("speciesclf.serve")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the record's ``fields`` (a dict)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: int = logging.INFO, stream=None) -> logging.Handler:
    """Send ``speciesclf.serve`` logs, the rollout's (``speciesclf.rollout``: one line per verdict, refused
    candidates, reloads), and Python warnings (e.g. Pillow's about a corrupt file), as JSON lines to
    ``stream`` (default stderr). For a process that is the service: it routes warnings process-wide."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    for name in ("speciesclf.serve", "speciesclf.rollout"):
        service_logger = logging.getLogger(name)
        service_logger.addHandler(handler)
        service_logger.setLevel(level)
        service_logger.propagate = False
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.addHandler(handler)
    warnings_logger.propagate = False
    return handler


def uvicorn_log_config(level: str = "info") -> dict:
    """uvicorn's own lines (start-up, shutdown, its errors) as JSON lines too, for ``uvicorn.run(log_config=)``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def log(message: str, level: int = logging.INFO, **fields) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": fields})
