"""`speciesclf rollout`: against the registry (real bundles of the shared model under several versions) and
against a running service through the admin API, with the errors a person meets: a spec that does not
parse (a usage error, exit 2), an unknown name, no rollout, a wrong phase, a wrong token (one line, exit 1).

The remote mode runs against the real service (create_app over the registry, on 127.0.0.1) with an admin
token, through httpx and through the urllib fallback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rollout_bundles import GOOD, PRIMARY, SHUFFLED, make_registry
from speciesclf.cli import main

TOKEN = "s3cret-admin-token-never-shown"


def _run(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _usage_error(capsys: pytest.CaptureFixture, *args: str | Path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("speciesclf: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture()
def registry(home, tmp_path: Path):
    return make_registry(tmp_path / "registry", (PRIMARY, GOOD, SHUFFLED))


def _status(capsys, registry) -> dict:
    rc, out, err = _run(capsys, "rollout", "status", "species100", "--registry", registry.root, "--json")
    assert rc == 0, err
    return json.loads(out)


# --- against the registry ------------------------------------------------------------------------------------


@pytest.mark.shared
def test_registry_round_trip(capsys, registry):
    root = registry.root
    rc, out, err = _run(capsys, "rollout", "start", "species100", GOOD, "--registry", root,
                        "--rollout", "canary:5,25,50,100")
    assert rc == 0, err
    assert out.strip() == f"species100@{GOOD}: start (canary of {GOOD} beside {PRIMARY}); now running at 5%"
    stored = registry.read_document("species100", "rollout")
    assert stored["phase"] == "running" and stored["primary"] == PRIMARY and stored["candidate"] == GOOD
    assert stored["policy"]["steps"] == [5, 25, 50, 100]

    rc, out, err = _run(capsys, "rollout", "status", "species100", "--registry", root)
    assert rc == 0, err
    fields = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()[:8]}
    assert fields["phase"] == "running"
    assert fields["primary"] == f"species100@{PRIMARY}" and fields["candidate"] == f"species100@{GOOD}"
    assert fields["weight"].startswith("5% of the routing keys (step 1 of 4")
    assert fields["step"] == "0 of 200 candidate requests, 0 of 30 s"
    gates = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in
             ("errors", "latency", "agreement", "unknown", "confidence", "accuracy")}
    assert set(gates) == {"errors", "latency", "agreement", "unknown", "confidence", "accuracy"}
    assert gates["agreement"][1:6] == ["0", "0", "-", "20.0%", "0.00"] and gates["agreement"][6] == "6.91"
    assert gates["accuracy"][-2:] == ["no", "baseline"] and gates["errors"][-1] == "ok"
    assert out.splitlines()[-1].split()[2:4] == ["start", "5%"]

    status = _status(capsys, registry)
    assert status["primary"] == f"species100@{PRIMARY}" and status["candidate"] == f"species100@{GOOD}"
    assert status["rollout"]["phase"] == "running" and status["rollout"]["weight"] == 0.05
    assert set(status["rollout"]["gates"]["errors"]) >= {"n", "events", "llr", "threshold", "tripped"}
    assert status["rejected"] == {}

    rc, out, err = _run(capsys, "rollout", "weight", "species100", "0.25", "--registry", root)
    assert rc == 0 and out.strip().endswith("now running at 25%"), (out, err)
    assert _status(capsys, registry)["rollout"]["step"] == 1

    rc, out, err = _run(capsys, "rollout", "pause", "species100", "--registry", root, "--reason", "a look first")
    assert rc == 0 and "pause (a look first); now paused at 25%" in out, (out, err)
    rc, out, err = _run(capsys, "rollout", "pause", "species100", "--registry", root)
    assert rc == 1 and "it is paused" in _one_error_line(err)
    rc, out, err = _run(capsys, "rollout", "status", "species100", "--registry", root)
    assert "phase       paused (a look first)" in out.splitlines()
    rc, out, err = _run(capsys, "rollout", "resume", "species100", "--registry", root)
    assert rc == 0 and out.strip().endswith("now running at 25%"), (out, err)

    rc, out, err = _run(capsys, "rollout", "rollback", "species100", "--registry", root, "--reason", "too slow")
    assert rc == 0, err
    assert out.strip().endswith(f"now rolled_back; {GOOD} is marked rejected")
    assert registry.rejections("species100")[GOOD]["reason"] == "too slow"
    assert registry.aliases("species100")["production"] == PRIMARY
    status = _status(capsys, registry)
    assert status["candidate"] is None and status["rollout"]["weight"] == 0.0
    assert [entry["verdict"] for entry in status["rollout"]["history"]] == [
        "start", "weight", "pause", "resume", "rollback"]

    rc, out, err = _run(capsys, "rollout", "start", "species100", GOOD, "--registry", root)
    line = _one_error_line(err)
    assert rc == 1 and f"species100@{GOOD} was rejected by a rollout (too slow)" in line and "--force" in line
    assert registry.read_document("species100", "rollout")["phase"] == "rolled_back"  # nothing changed

    rc, out, err = _run(capsys, "rollout", "start", "species100", GOOD, "--registry", root, "--force")
    assert rc == 0, err
    assert registry.read_document("species100", "rollout")["phase"] == "running"
    assert GOOD not in registry.rejections("species100")  # a later rollback marks it again with its reason


@pytest.mark.shared
def test_promote_moves_the_production_alias(capsys, registry):
    root = registry.root
    assert _run(capsys, "rollout", "start", "species100", f"species100@{GOOD}", "--registry", root)[0] == 0
    rc, out, err = _run(capsys, "rollout", "promote", "species100", "--registry", root, "--reason", "looks fine")
    assert rc == 0, err
    assert out.strip() == (f"species100@{GOOD}: promote (looks fine); now promoted; "
                           f"species100@production -> {GOOD}")
    assert registry.aliases("species100")["production"] == GOOD
    status = _status(capsys, registry)
    assert status["primary"] == f"species100@{GOOD}" and status["rollout"]["phase"] == "promoted"
    rc, out, err = _run(capsys, "rollout", "rollback", "species100", "--registry", root)
    assert rc == 1 and "cannot rollback the rollout of species100@1.1.0: it is promoted" in _one_error_line(err)


@pytest.mark.shared
def test_start_refusals_and_replace(capsys, registry):
    root = registry.root
    rc, out, err = _run(capsys, "rollout", "start", "species100", "9.9.9", "--registry", root)
    assert rc == 1 and f"species100@9.9.9 is not registered (versions: {PRIMARY}, {GOOD}, {SHUFFLED})" in err
    rc, out, err = _run(capsys, "rollout", "start", "species100", "other@1.1.0", "--registry", root)
    assert rc == 1 and "'other@1.1.0' is not a version of species100" in _one_error_line(err)
    rc, out, err = _run(capsys, "rollout", "start", "species100", PRIMARY, "--registry", root)
    assert rc == 1 and "already the primary" in _one_error_line(err)

    registry.set_alias("species100", "next", SHUFFLED)  # an alias names the candidate too
    assert _run(capsys, "rollout", "start", "species100", "next", "--registry", root, "--rollout", "shadow:0.5")[0] == 0
    rc, out, err = _run(capsys, "rollout", "status", "species100", "--registry", root)
    assert "weight      0% (shadow: 50% of the requests copied to the candidate)" in out.splitlines()
    assert "step        0 of 200 comparisons, 0 of 30 s" in out.splitlines()
    rc, out, err = _run(capsys, "rollout", "weight", "species100", "50%", "--registry", root)
    assert rc == 1 and "a shadow rollout sends no traffic" in _one_error_line(err)

    rc, out, err = _run(capsys, "rollout", "start", "species100", GOOD, "--registry", root)
    line = _one_error_line(err)
    assert rc == 1 and f"a rollout of species100@{SHUFFLED} is running" in line and "--replace" in line
    rc, out, err = _run(capsys, "rollout", "start", "species100", GOOD, "--registry", root, "--replace")
    assert rc == 0, err
    history = registry.read_document("species100", "rollout")["history"]
    assert [(e["verdict"], e["candidate"]) for e in history] == [("start", SHUFFLED), ("abort", SHUFFLED),
                                                                  ("start", GOOD)]
    assert SHUFFLED not in registry.rejections("species100")  # ended without a judgement: not rejected

    registry.remove_alias("species100", "production")
    rc, out, err = _run(capsys, "rollout", "start", "species100", SHUFFLED, "--registry", root, "--replace")
    assert rc == 1 and "species100 has no production alias" in _one_error_line(err)


# --- errors that need no bundle -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, said", [
    ("canary:5,50", "the last canary step must be 100"),
    ("canary:5,x,100", "canary steps are comma-separated percentages"),
    ("blue-green", "the mode is 'canary' or 'shadow'"),
    ("shadow:2", "shadow_share"),
])
def test_a_spec_that_does_not_parse_is_a_usage_error(capsys, tmp_path: Path, spec: str, said: str):
    err = _usage_error(capsys, "rollout", "start", "species100", "1.1.0", "--registry", tmp_path / "registry",
                       "--rollout", spec)
    last = err.strip().splitlines()[-1]
    assert last.startswith("speciesclf rollout start: error: argument --rollout: ") and said in last, err
    assert "Traceback" not in err and not (tmp_path / "registry").exists()  # refused before anything ran


def test_bad_weight_and_modes_are_usage_errors(capsys, tmp_path: Path):
    err = _usage_error(capsys, "rollout", "weight", "species100", "1.5")
    assert "argument WEIGHT: a weight is a share in [0, 1] (0.25) or a percentage (25%), got '1.5'" in err
    assert "argument WEIGHT" in _usage_error(capsys, "rollout", "weight", "species100", "nan")
    err = _usage_error(capsys, "rollout", "status", "species100", "--registry", tmp_path, "--url", "http://x")
    assert "not allowed with argument" in err


def test_unknown_name_and_no_rollout_are_one_line_errors(capsys, tmp_path: Path):
    root = tmp_path / "registry"
    rc, out, err = _run(capsys, "rollout", "status", "nosuch", "--registry", root)
    assert rc == 1 and out == "" and f"no bundle named 'nosuch' in the registry {root}" in _one_error_line(err)
    rc, out, err = _run(capsys, "rollout", "pause", "Not A Name", "--registry", root)
    assert rc == 1 and "Not A Name" in _one_error_line(err)
    rc, out, err = _run(capsys, "rollout", "status", "x", "--registry", root, "--admin-token-file", "t")
    assert rc == 1 and "--admin-token-file goes with --url" in _one_error_line(err)


@pytest.mark.shared
def test_no_rollout_yet(capsys, registry):
    for command in ("status", "pause", "resume", "promote", "rollback"):
        rc, out, err = _run(capsys, "rollout", command, "species100", "--registry", registry.root)
        line = _one_error_line(err)
        assert rc == 1 and "no rollout of species100" in line, command
    rc, out, err = _run(capsys, "rollout", "status", "species100", "--registry", registry.root)
    assert _one_error_line(err).endswith(f"no rollout of species100 (production -> {PRIMARY}); start one with "
                                         "speciesclf rollout start species100 VERSION")
    rc, out, err = _run(capsys, "rollout", "weight", "species100", "0.5", "--registry", registry.root)
    assert rc == 1 and "no rollout of species100" in _one_error_line(err)


# --- against a running service ------------------------------------------------------------------------------


@pytest.fixture()
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    return path


def _live(registry, token_file: Path | None):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serve_server import LiveServer
    from speciesclf.serve import ServeConfig, create_app

    config = ServeConfig(registry=str(registry.root), watch_interval_s=0.2,
                         admin_token_file=None if token_file is None else str(token_file))
    return LiveServer(create_app("species100@production", config))


@pytest.fixture()
def service(registry, token_file: Path):
    with _live(registry, token_file) as server:
        yield server.url


def _remote(capsys, url: str, token_file: Path, *args: str) -> tuple[int, str, str]:
    rc, out, err = _run(capsys, "rollout", *args, "--url", url, "--admin-token-file", token_file)
    assert TOKEN not in out + err
    return rc, out, err


def _models(url: str, condition, what: str) -> dict:
    """The service's /v1/models once ``condition(body)`` holds (the watcher polls every 0.2 s)."""
    import time

    import httpx

    deadline = time.monotonic() + 30
    while True:
        body = httpx.get(f"{url}/v1/models").json()
        if condition(body):
            return body
        assert time.monotonic() < deadline, f"{what}: not within 30 s; /v1/models says {body}"
        time.sleep(0.05)


def _arms(body: dict) -> dict[str, str]:
    return {entry.get("arm"): entry["model"] for entry in body["models"]}


@pytest.mark.shared
def test_remote_round_trip(capsys, service, token_file: Path, registry, monkeypatch):
    url = service
    rc, out, err = _remote(capsys, url, token_file, "status", "species100")
    assert rc == 1 and f"no rollout of species100 on the service at {url}" in _one_error_line(err)

    rc, out, err = _remote(capsys, url, token_file, "start", "species100", GOOD, "--rollout", "canary:25,100")
    assert rc == 0, err
    assert out.strip() == f"species100@{GOOD}: start (canary of {GOOD} beside {PRIMARY}); now running at 25%"
    assert _arms(_models(url, lambda body: True, "models")).get("candidate") == f"species100@{GOOD}"
    assert registry.read_document("species100", "rollout")["weight"] == 0.25

    rc, out, err = _remote(capsys, url, token_file, "status", "species100")
    assert rc == 0, err
    assert f"candidate   species100@{GOOD}" in out.splitlines()
    assert out.splitlines()[4].startswith("weight      25% of the routing keys (step 1 of 2: 25, 100 %)")
    rc, out, err = _remote(capsys, url, token_file, "status", "species100", "--json")
    import httpx

    served = httpx.get(f"{url}/v1/admin/rollout", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    shown = json.loads(out)
    assert shown.keys() == served.keys() and shown["rollout"]["candidate"] == GOOD  # the service's own status
    assert shown["rollout"]["history"] == served["rollout"]["history"]

    rc, out, err = _remote(capsys, url, token_file, "start", "species100", PRIMARY)
    assert rc == 1 and "--replace" in _one_error_line(err)  # checked here as in the registry mode
    rc, out, err = _remote(capsys, url, token_file, "start", "species100", GOOD, "--force")
    assert rc == 1 and "--force is for the registry mode" in _one_error_line(err)

    assert _remote(capsys, url, token_file, "weight", "species100", "100%")[0] == 0
    assert registry.read_document("species100", "rollout")["weight"] == 1.0
    rc, out, err = _remote(capsys, url, token_file, "pause", "species100", "--reason", "lunch")
    assert rc == 0 and out.strip().endswith("pause (lunch); now paused at 100%"), (out, err)
    rc, out, err = _remote(capsys, url, token_file, "resume", "species100", "--reason", "ready")
    assert rc == 0 and registry.read_document("species100", "rollout")["phase"] == "running", err
    rc, out, err = _remote(capsys, url, token_file, "resume", "species100")  # the service's 409, in one line
    line = _one_error_line(err)
    assert rc == 1 and "409 rollout_conflict: cannot resume the rollout of species100@1.1.0: it is running" in line

    # The same through urllib, for a machine without httpx.
    monkeypatch.setitem(sys.modules, "httpx", None)  # `import httpx` raises ImportError
    rc, out, err = _remote(capsys, url, token_file, "promote", "species100", "--reason", "all good")
    assert rc == 0 and "promote (all good); now promoted" in out, (out, err)
    assert registry.aliases("species100")["production"] == GOOD
    monkeypatch.setitem(sys.modules, "httpx", httpx)
    _models(url, lambda body: _arms(body) == {"primary": f"species100@{GOOD}"}, "the promoted version serving")

    rc, out, err = _remote(capsys, url, token_file, "start", "species100", SHUFFLED, "--rollout", "shadow")
    assert rc == 0, err
    rc, out, err = _remote(capsys, url, token_file, "rollback", "species100", "--reason", "seen enough")
    assert rc == 0 and "rollback (seen enough); now rolled_back" in out, (out, err)
    assert registry.rejections("species100")[SHUFFLED]["reason"] == "seen enough"
    rc, out, err = _remote(capsys, url, token_file, "pause", "species100")
    assert rc == 1 and "409 rollout_conflict" in _one_error_line(err)


@pytest.mark.shared
def test_a_registry_start_reaches_the_running_service(capsys, service, registry):
    """Against the registry the CLI changes the state the service reads: its watcher loads the candidate."""
    url = service
    assert _run(capsys, "rollout", "start", "species100", GOOD, "--registry", registry.root)[0] == 0
    _models(url, lambda body: _arms(body).get("candidate") == f"species100@{GOOD}", "the candidate loaded")
    assert _run(capsys, "rollout", "rollback", "species100", "--registry", registry.root)[0] == 0
    _models(url, lambda body: "candidate" not in _arms(body), "the candidate dropped")


@pytest.mark.shared
@pytest.mark.parametrize("client", ["httpx", "urllib"])
def test_remote_refusals_are_one_line(capsys, service, token_file: Path, tmp_path: Path, monkeypatch, client):
    url = service
    if client == "urllib":
        monkeypatch.setitem(sys.modules, "httpx", None)
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    rc, out, err = _remote(capsys, url, wrong, "status", "species100")
    line = _one_error_line(err)
    assert rc == 1 and "403 forbidden: " in line and f"(the token read from {wrong})" in line
    assert "not-the-token" not in out + err

    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    rc, out, err = _remote(capsys, url, empty, "status", "species100")
    assert rc == 1 and "the file is empty" in _one_error_line(err)
    rc, out, err = _remote(capsys, url, tmp_path / "missing", "status", "species100")
    assert rc == 1 and "cannot read it" in _one_error_line(err)
    rc, out, err = _run(capsys, "rollout", "status", "species100", "--url", url)
    assert rc == 1 and "--url needs --admin-token-file" in _one_error_line(err)

    rc, out, err = _remote(capsys, url, token_file, "status", "other")
    assert rc == 1 and f"the service at {url} serves species100, not other" in _one_error_line(err)
    rc, out, err = _remote(capsys, url, token_file, "start", "species100", "9.9.9")
    assert rc == 1 and "409 candidate_refused" in _one_error_line(err)  # the service could not load it
    rc, out, err = _remote(capsys, url, token_file, "start", "species100", "other@1.1.0")
    assert rc == 1 and "'other@1.1.0' is not a version of species100" in _one_error_line(err)

    rc, out, err = _remote(capsys, url.replace("http://", "ftp://"), token_file, "status", "species100")
    assert rc == 1 and "--url: expected http://HOST:PORT" in _one_error_line(err)


@pytest.mark.shared
def test_remote_without_an_admin_api_or_a_server(capsys, registry, token_file: Path):
    with _live(registry, None) as server:  # a service started without an admin token
        rc, out, err = _remote(capsys, server.url, token_file, "status", "species100")
        line = _one_error_line(err)
        assert rc == 1 and "404: the service has no admin API" in line and "--admin-token-file" in line
        url = server.url
    rc, out, err = _remote(capsys, url, token_file, "status", "species100")  # nothing listens there now
    assert rc == 1 and f"cannot reach {url}" in _one_error_line(err)


@pytest.mark.shared
def test_remote_401_without_a_bearer(service, token_file: Path):
    """The CLI always sends the token; a proxy that drops it shows as the service's 401, in one line."""
    from speciesclf.serve.admin_client import AdminClient, AdminError

    client = AdminClient(service, str(token_file))
    client._headers = {"Accept": "application/json"}
    with pytest.raises(AdminError) as raised:
        client.get("/v1/admin/rollout")
    assert "401 unauthorized: " in str(raised.value) and "bearer" in str(raised.value)
