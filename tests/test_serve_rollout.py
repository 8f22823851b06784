"""The HTTP service serving a rollout (issue 13, "In the service"): a real server on 127.0.0.1 over real
bundles (the shared model under several versions in a registry, tests/rollout_bundles.py).

The admin API and its bearer token; X-Model-Version / X-Model-Arm and X-Routing-Key stickiness; alias
changes picked up with no restart (a candidate started, production hot-reloaded, a corrupt version
refused); a failing candidate rolled back with no failed client request."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from rollout_bundles import GOOD, PRIMARY, failing_hooks, make_registry  # noqa: E402
from serve_server import LiveServer, jpeg  # noqa: E402

from speciesclf import Classifier  # noqa: E402
from speciesclf.cli import main  # noqa: E402
from speciesclf.rollout import Deployment, parse_rollout  # noqa: E402
from speciesclf.serve import ServeConfig, create_app  # noqa: E402

pytestmark = pytest.mark.shared

TOKEN = "s3cret-admin-token"
CORRUPT = "1.3.0"
DEADLINE_S = 30


@pytest.fixture
def registry(home, tmp_path: Path):
    return make_registry(tmp_path / "registry", versions=(PRIMARY, GOOD))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    return path


def config(registry, token_file: Path | None = None, **fields) -> ServeConfig:
    return ServeConfig(registry=str(registry.root), admin_token_file=None if token_file is None else str(token_file),
                       watch_interval_s=0.2, **fields)


def photo(i: int) -> bytes:
    """A distinct small JPEG per ``i``: distinct bytes, so distinct default routing keys."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(buffer, "JPEG")
    return buffer.getvalue()


def admin(client: httpx.Client, action: str | None = None, body: dict | None = None) -> httpx.Response:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    if action is None:
        return client.get("/v1/admin/rollout", headers=auth)
    return client.post(f"/v1/admin/rollout/{action}", json=body or {}, headers=auth)


def wait_for(client: httpx.Client, condition, what: str) -> dict:
    """/v1/models once ``condition(body)`` holds; fails after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        body = client.get("/v1/models").json()
        if condition(body):
            return body
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE_S} s; /v1/models says {body}"
        time.sleep(0.05)


def answered_by(client: httpx.Client, image: bytes, key: str | None = None) -> tuple[str, str]:
    r = client.post("/v1/predict", content=image, headers={} if key is None else {"X-Routing-Key": key})
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == r.json()["model"]
    return r.headers["x-model-version"], r.headers["x-model-arm"]


def test_the_admin_api_needs_the_bearer_token(registry, token_file) -> None:
    with LiveServer(create_app("species100@production", config(registry, token_file))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        missing = c.get("/v1/admin/rollout")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/admin/rollout/pause", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        wrong = c.post("/v1/admin/rollout/start", json={"candidate": GOOD},
                       headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
        assert admin(c, "pause").json()["error"]["code"] == "rollout_conflict"  # the token works: no rollout yet
        status = admin(c)
        assert status.status_code == 200 and status.json()["primary"] == f"species100@{PRIMARY}"
        models = c.get("/v1/models")
        assert TOKEN not in models.text and str(token_file) not in models.text
        assert "/v1/admin/rollout/weight" in c.get("/openapi.json").json()["paths"]


def test_without_a_token_the_admin_routes_do_not_exist(registry, token_file) -> None:
    plain = registry.resolve(f"species100@{PRIMARY}")  # a bundle path: one Classifier, no rollout
    with LiveServer(create_app(str(plain), ServeConfig())) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        for r in (c.get("/v1/admin/rollout"), c.post("/v1/admin/rollout/pause", json={},
                                                      headers={"Authorization": f"Bearer {TOKEN}"})):
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.post("/v1/predict", content=jpeg())
        assert r.headers["x-model-version"] == f"species100@{PRIMARY}" and "x-model-arm" not in r.headers
        assert "rollout" not in c.get("/v1/models").json()
    with LiveServer(create_app(str(plain), ServeConfig(admin_token_file=str(token_file)))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        r = admin(c)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "single model" in r.text


def test_admin_round_trip_changes_what_models_and_answers_show(registry, token_file) -> None:
    with LiveServer(create_app("species100@production", config(registry, token_file))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        assert answered_by(c, photo(0)) == (f"species100@{PRIMARY}", "primary")
        bad = admin(c, "start", {"candidate": GOOD, "rollout": "canary:5,3"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_rollout"
        started = admin(c, "start", {"candidate": GOOD, "rollout": "canary:5,25,50,100"})
        assert started.status_code == 200, started.text
        assert started.json()["candidate"] == f"species100@{GOOD}"
        models = c.get("/v1/models").json()
        assert [(m["model"], m["arm"]) for m in models["models"]] == [(f"species100@{PRIMARY}", "primary"),
                                                                      (f"species100@{GOOD}", "candidate")]
        assert models["rollout"]["mode"] == "canary" and models["rollout"]["phase"] == "running"
        assert models["rollout"]["weight"] == pytest.approx(0.05) and models["rollout"]["step"] == 0

        assert admin(c, "weight", {"weight": 2}).json()["error"]["code"] == "invalid_request"
        assert admin(c, "weight", {"weight": 1.0}).status_code == 200
        assert {answered_by(c, photo(i)) for i in range(6)} == {(f"species100@{GOOD}", "candidate")}
        batch = c.post("/v1/predict/batch", files=[("files", photo(i)) for i in range(3)]).json()["predictions"]
        assert {(p["model"], p["arm"]) for p in batch} == {(f"species100@{GOOD}", "candidate")}

        assert admin(c, "pause", {"reason": "a look first"}).json()["rollout"]["phase"] == "paused"
        assert c.get("/v1/models").json()["rollout"]["reason"] == "a look first"
        assert admin(c, "pause").json()["error"]["code"] == "rollout_conflict"
        assert admin(c, "resume").json()["rollout"]["phase"] == "running"
        assert admin(c, "weight", {"weight": 0}).status_code == 200
        assert {answered_by(c, photo(i)) for i in range(6)} == {(f"species100@{PRIMARY}", "primary")}

        promoted = admin(c, "promote")
        assert promoted.status_code == 200 and promoted.json()["rollout"]["phase"] == "promoted"
        assert registry.aliases("species100")["production"] == GOOD
        assert answered_by(c, photo(0)) == (f"species100@{GOOD}", "primary")
        models = c.get("/v1/models").json()
        assert [m["model"] for m in models["models"]] == [f"species100@{GOOD}"]
        assert c.get("/readyz").json()["model"] == f"species100@{GOOD}"

        # the old version as the next candidate, then rolled back by a person
        assert admin(c, "start", {"candidate": f"species100@{PRIMARY}"}).status_code == 200
        assert admin(c, "weight", {"weight": 1.0}).status_code == 200
        assert answered_by(c, photo(1)) == (f"species100@{PRIMARY}", "candidate")
        rolled = admin(c, "rollback", {"reason": "changed my mind"})
        assert rolled.status_code == 200 and rolled.json()["rollout"]["phase"] == "rolled_back"
        assert answered_by(c, photo(1)) == (f"species100@{GOOD}", "primary")
        assert PRIMARY in registry.rejections("species100")
        assert admin(c, "resume").json()["error"]["code"] == "rollout_conflict"
        wrong_name = admin(c, "start", {"candidate": "other@1.0.0"})
        assert wrong_name.status_code == 422 and wrong_name.json()["error"]["code"] == "invalid_request"

        metrics = c.get("/metrics").text
        assert f'speciesclf_version_images_total{{arm="candidate",version="{GOOD}"}}' in metrics
        assert 'speciesclf_rollout_verdicts_total{verdict="promote"} 1.0' in metrics


def test_a_routing_key_keeps_its_arm_and_raising_the_weight_never_moves_it_back(registry, token_file) -> None:
    with LiveServer(create_app("species100@production", config(registry, token_file))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        assert admin(c, "start", {"candidate": GOOD, "rollout": "canary:5,25,50,100"}).status_code == 200
        assert admin(c, "weight", {"weight": 0.5}).status_code == 200
        keys = [f"user-{n}" for n in range(24)]
        arms = {}
        for key in keys:
            seen = {answered_by(c, photo(i), key)[1] for i in range(3)}  # other images, the same key
            assert len(seen) == 1, (key, seen)
            arms[key] = seen.pop()
        assert set(arms.values()) == {"primary", "candidate"}  # the weight splits the keys
        assert admin(c, "weight", {"weight": 0.8}).status_code == 200
        for key, arm in arms.items():
            if arm == "candidate":
                assert answered_by(c, photo(99), key)[1] == "candidate", key


def test_bad_routing_keys_are_refused(registry) -> None:
    with LiveServer(create_app("species100@production", config(registry))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        for key in ("k" * 257, "", b"caf\xe9"):
            r = c.post("/v1/predict", content=jpeg(), headers={"X-Routing-Key": key})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", key
            assert "X-Routing-Key" in r.json()["error"]["message"]
        ok = c.post("/v1/predict", content=jpeg(), headers={"X-Routing-Key": "k" * 256})
        assert ok.status_code == 200


def test_pointing_the_candidate_alias_starts_a_rollout_without_a_restart(registry) -> None:
    with LiveServer(create_app("species100@production", config(registry))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.get("/v1/models").json()["rollout"]["phase"] is None
        registry.set_alias("species100", "candidate", GOOD)
        models = wait_for(c, lambda b: b["rollout"]["phase"] == "running", "the candidate alias starts a rollout")
        assert models["rollout"]["candidate"] == GOOD and models["rollout"]["mode"] == "canary"
        assert [m["arm"] for m in models["models"]] == ["primary", "candidate"]


def _serve(tmp_path: Path, *options: str) -> tuple[subprocess.Popen, int]:
    """``speciesclf serve`` with ``options`` on a free 127.0.0.1 port, its log in tmp_path/serve.log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "speciesclf", "serve", "--model", "species100@production",
                                   *options, "--port", str(port), "--log-level", "warning"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    return server, port


def test_sighup_makes_speciesclf_serve_look_at_the_aliases_at_once(registry, tmp_path: Path) -> None:
    # The poll is an hour apart: only the signal can make the service see the alias in time.
    server, port = _serve(tmp_path, "--registry", str(registry.root), "--watch-interval", "3600")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            deadline = time.monotonic() + 90
            while True:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "speciesclf serve was not ready in 90 s"
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            registry.set_alias("species100", "candidate", GOOD)
            time.sleep(1.0)  # several sync rounds: without the signal nothing looks at the aliases
            assert c.get("/v1/models").json()["rollout"]["phase"] is None
            os.kill(server.pid, signal.SIGHUP)
            models = wait_for(c, lambda b: b["rollout"]["phase"] == "running", "SIGHUP starts the rollout")
            assert models["rollout"]["candidate"] == GOOD
    finally:
        server.terminate()
        # uvicorn drains, then ends by the signal it was stopped with
        assert server.wait(60) in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()[-2000:]


def test_moving_production_hot_reloads_with_no_failed_request(registry) -> None:
    with LiveServer(create_app("species100@production", config(registry))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        answers: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=live.url, timeout=30) as own:
                i = 0
                while not stop.is_set():
                    r = own.post("/v1/predict", content=photo(i))
                    answers.append((r.status_code, r.headers.get("x-model-version")))
                    i += 1

        thread = threading.Thread(target=client)
        thread.start()
        try:
            deadline = time.monotonic() + DEADLINE_S
            while len(answers) < 5:
                assert time.monotonic() < deadline and thread.is_alive()
                time.sleep(0.01)
            registry.set_alias("species100", "production", GOOD)
            wait_for(c, lambda b: b["models"][0]["model"] == f"species100@{GOOD}", "production hot-reloaded")
            seen = len(answers)
            while len(answers) < seen + 5:  # a few more answers by the new version
                assert time.monotonic() < deadline and thread.is_alive()
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join(30)
        assert {status for status, _ in answers} == {200}
        versions = [version for _, version in answers]
        assert versions[0] == f"species100@{PRIMARY}" and versions[-1] == f"species100@{GOOD}"
        switch = versions.index(f"species100@{GOOD}")
        assert set(versions[switch:]) == {f"species100@{GOOD}"}  # no flapping back


def test_a_corrupt_candidate_is_refused_and_the_primary_keeps_serving(home, tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "registry", versions=(PRIMARY, CORRUPT))
    bundle = registry.resolve(f"species100@{CORRUPT}")
    model_file = next(p for p in bundle.iterdir() if p.suffix == ".onnx")
    model_file.unlink()  # a new file, never written through a link the registry may share
    model_file.write_bytes(b"not a model at all")
    with LiveServer(create_app("species100@production", config(registry))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        registry.set_alias("species100", "candidate", CORRUPT)
        models = wait_for(c, lambda b: b["rollout"]["refused"] is not None, "the corrupt candidate refused")
        refused = models["rollout"]["refused"]
        assert CORRUPT in refused["version"] and "failed to load" in refused["reason"], refused
        assert str(registry.root) not in c.get("/v1/models").text
        assert models["rollout"]["phase"] is None and [m["model"] for m in models["models"]] == [
            f"species100@{PRIMARY}"]
        assert {answered_by(c, photo(i)) for i in range(4)} == {(f"species100@{PRIMARY}", "primary")}


def test_a_failing_candidate_is_rolled_back_with_no_failed_request(registry) -> None:
    def loader(ref: str):
        hooks = failing_hooks(rate=0.25, seed=0) if ref.endswith(GOOD) else None
        return Classifier.load(ref, registry=registry, hooks=hooks)

    policy = parse_rollout("canary:50,100", min_requests=20, min_seconds=0.5)
    deployment = Deployment.from_registry("species100@production", registry=registry, loader=loader,
                                          candidate=f"species100@{GOOD}", policy=policy, watch_interval_s=None)
    try:
        with LiveServer(create_app(deployment, ServeConfig())) as live, \
                httpx.Client(base_url=live.url, timeout=30) as c:
            assert c.get("/v1/models").json()["rollout"]["phase"] == "running"
            statuses, arms = [], set()
            deadline = time.monotonic() + DEADLINE_S
            i = 0
            while c.get("/v1/models").json()["rollout"]["phase"] == "running":
                assert time.monotonic() < deadline, "not rolled back in time"
                for _ in range(10):
                    r = c.post("/v1/predict", content=photo(i))
                    statuses.append(r.status_code)
                    arms.add(r.headers.get("x-model-arm"))
                    i += 1
            assert set(statuses) == {200} and "candidate" in arms
            rollout = c.get("/v1/models").json()["rollout"]
            assert rollout["phase"] == "rolled_back" and "gate errors tripped" in rollout["reason"], rollout
            assert GOOD in registry.rejections("species100")
            assert {answered_by(c, photo(i)) for i in range(4)} == {(f"species100@{PRIMARY}", "primary")}
            metrics = c.get("/metrics").text
            assert 'speciesclf_rollout_verdicts_total{verdict="rollback"} 1.0' in metrics
            assert f'speciesclf_rollout_fallbacks_total{{version="{GOOD}"}}' in metrics
    finally:
        deployment.close()


def test_serve_refuses_bad_rollout_options_before_loading_anything(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "species100@production", "--rollout", "canary:50,20"])
    assert exit_.value.code == 2 and "--rollout" in capsys.readouterr().err
    assert main(["serve", "--admin-token-file", str(tmp_path / "nosuch")]) == 1
    assert "--admin-token-file" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert main(["serve", "--admin-token-file", str(tmp_path / "empty")]) == 1
    assert "is empty" in capsys.readouterr().err
    assert main(["serve", "--model", "species100", "--candidate", "1.1.0", "--registry", str(tmp_path)]) == 1
    assert "registry reference" in capsys.readouterr().err


def test_workers_route_a_key_alike_and_share_one_rollout(registry, tmp_path: Path) -> None:
    server, port = _serve(tmp_path, "--registry", str(registry.root), "--candidate", f"species100@{GOOD}",
                          "--rollout", "canary:50,100", "--workers", "2")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            deadline = time.monotonic() + 120
            pids: set[int] = set()
            while len(pids) < 2:  # both workers ready (each connection may land on either)
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "two ready workers did not answer in 120 s"
                try:
                    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as fresh:
                        if fresh.get("/readyz").status_code == 200:
                            pids.add(fresh.get("/healthz").json()["pid"])
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            arms: dict[str, set[str]] = {}
            for round_ in range(3):
                for i in range(30):
                    # a new connection each time, so that the requests of one key reach both workers
                    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as fresh:
                        r = fresh.post("/v1/predict", content=photo(i), headers={"X-Routing-Key": f"user-{i}"})
                    assert r.status_code == 200, r.text
                    arms.setdefault(f"user-{i}", set()).add(r.headers["x-model-arm"])
            assert all(len(seen) == 1 for seen in arms.values()), arms  # every worker routed each key alike
            assert {a for seen in arms.values() for a in seen} == {"primary", "candidate"}
        history = registry.read_document("species100", "rollout")["history"]
        assert [h["verdict"] for h in history] == ["start"], history  # --candidate started once, not per worker
    finally:
        server.terminate()
        assert server.wait(60) in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()[-2000:]
