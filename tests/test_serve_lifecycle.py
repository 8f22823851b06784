"""Start-up and later failures of `speciesclf serve` (issue 12, item 1): a model that cannot load or warm up at
start-up ends the process with a non-zero status and a one-line reason, with one worker or several; a reload
that fails later leaves the service serving the old model. Servers run as subprocesses on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_server import LiveServer, jpeg  # noqa: E402
from speciesclf.serve import ServeConfig, create_app  # noqa: E402

TIMEOUT_S = 90  # generous for a loaded 2-core machine: the old code never exits at all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, SPECIESCLF_HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"), **env)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    try:
        return subprocess.run(args, env=environment, capture_output=True, text=True, timeout=TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the server was still running after {TIMEOUT_S} s: {(e.stderr or b'')[-1500:]!r}")


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_model_that_cannot_load_ends_serve_with_a_one_line_reason(tmp_path: Path, workers: int) -> None:
    done = serve([sys.executable, "-m", "speciesclf", "serve", "--model", "nosuch", "--port", str(free_port()),
                  "--workers", str(workers)], tmp_path)
    assert done.returncode != 0, done.stderr[-2000:]
    reason = last_line(done.stderr)
    assert reason.startswith("speciesclf: error:") and "nosuch" in reason, done.stderr[-2000:]
    assert not list((tmp_path / "tmp").glob("speciesclf-serve-*"))  # the private run folder is gone


def test_a_model_that_fails_its_warm_up_ends_serve(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        from speciesclf.serve import ServeConfig, ServeStartupError, run

        class Broken:
            model = "broken@0"
            def predict_batch(self, images, **kw):
                raise RuntimeError("the accelerator fell over\\nsecond line")

        try:
            run(Broken(), ServeConfig(port={free_port()}))
        except ServeStartupError as e:
            print("reason:", e, file=sys.stderr)
            sys.exit(1)
        """)
    done = serve([sys.executable, "-c", script], tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    reason = last_line(done.stderr)
    assert reason.startswith("reason:") and "fell over" in reason and "second line" in reason, done.stderr[-2000:]


@pytest.mark.shared
def test_a_reload_that_fails_later_keeps_the_old_model_serving(species100, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPECIESCLF_HOME", str(tmp_path / "home"))
    with LiveServer(create_app(species100, ServeConfig())) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        with pytest.raises(Exception, match="nosuch"):
            species100.reload("nosuch")
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["model"] == "species100@1.0.0"
        r = c.post("/v1/predict", content=jpeg())
        assert r.status_code == 200 and r.json()["model"] == "species100@1.0.0"


def test_a_port_in_use_ends_serve_with_workers_with_the_same_one_line_reason(tmp_path: Path) -> None:
    # With --workers the socket is bound before any worker loads a model, so no weights are needed here.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = serve([sys.executable, "-m", "speciesclf", "serve", "--model", "nosuch", "--port", str(port),
                      "--workers", "2"], tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    reason = last_line(done.stderr)
    assert reason.startswith("speciesclf: error: serve did not start:") and str(port) in reason, done.stderr[-2000:]
    assert not list((tmp_path / "tmp").glob("speciesclf-serve-*"))


@pytest.mark.shared
def test_a_port_in_use_ends_serve_with_a_one_line_reason(tmp_path: Path, shared_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = serve([sys.executable, "-m", "speciesclf", "serve", "--model", "species100", "--port", str(port)],
                     tmp_path, SPECIESCLF_WEIGHTS=str(shared_dir / "models"))
    assert done.returncode == 1, done.stderr[-2000:]
    reason = last_line(done.stderr)
    assert reason.startswith("speciesclf: error: serve did not start:") and str(port) in reason, done.stderr[-2000:]
