"""A real uvicorn server in a background thread on 127.0.0.1, shared by the serve test modules.

Import it after ``pytest.importorskip("uvicorn")`` / ``("httpx")`` so that a machine without the
``serve`` extra skips those modules instead of failing to collect them.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import httpx
import uvicorn
from PIL import Image

__all__ = ["LiveServer", "b64", "jpeg", "undocumented_statuses"]


def jpeg(width: int = 64, height: int = 48) -> bytes:
    """A small valid JPEG (one flat colour)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 140, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def undocumented_statuses(client: httpx.Client) -> set[tuple[str, str]]:
    """(route, status) pairs the server has answered (its requests_total) that its OpenAPI document does not
    list for that route: after a test of many bad requests, an empty set says the document told the truth."""
    from prometheus_client.parser import text_string_to_metric_families

    doc = client.get("/openapi.json").json()
    documented = {(path, status) for path, ops in doc["paths"].items() for op in ops.values()
                  for status in op["responses"]}
    answered = {(s.labels["route"], s.labels["status"])
                for family in text_string_to_metric_families(client.get("/metrics").text)
                if family.name == "speciesclf_requests" for s in family.samples
                if s.name == "speciesclf_requests_total" and s.labels["route"] in doc["paths"]}
    return answered - documented


class LiveServer:
    """uvicorn in a background thread on a pre-bound loopback socket (a free port)."""

    def __init__(self, app, ready_path: str = "/readyz"):
        self.ready_path = ready_path
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", ws="none", lifespan="on", access_log=False,
                                timeout_graceful_shutdown=20)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn did not start"
            assert time.monotonic() < deadline, "uvicorn did not start in 60 s"
            time.sleep(0.01)
        with httpx.Client(base_url=self.url) as client:
            while client.get(self.ready_path).status_code != 200:
                assert time.monotonic() < deadline, "the model did not become ready in 60 s"
                time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive()
