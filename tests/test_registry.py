"""The local bundle registry: versions, aliases, resolve, delete, crash safety, concurrency, the CLI."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from speciesclf.bundles.bundle import Bundle, Label, create_bundle
from speciesclf.bundles.registry import Registry, RegistryError, default_home

LABELS = [Label(0, "red fox", "Vulpes vulpes"), Label(1, "badger", "Meles meles")]


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("SPECIESCLF_HOME", str(home))
    return home


@pytest.fixture()
def registry(home: Path) -> Registry:
    return Registry()


def make_bundle(where: Path, version: str, *, name: str = "fox-net", size: int = 2048, fmt: str = "") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    model = where / f"model-{name}-{version}.onnx"
    model.write_bytes(os.urandom(size))
    return create_bundle(
        where / f"{name}-{version}{fmt}", model_file=model, labels=LABELS, name=name, version=version, num_outputs=2
    )


def test_default_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECIESCLF_HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h"
    assert Registry().root == tmp_path / "h" / "registry"
    monkeypatch.delenv("SPECIESCLF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_home() == tmp_path / "xdg" / "speciesclf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_home() == tmp_path / "user" / ".cache" / "speciesclf"


def test_empty_registry(registry: Registry) -> None:
    assert registry.names() == [] and registry.versions("fox-net") == [] and registry.aliases("fox-net") == {}
    with pytest.raises(RegistryError, match="no bundle named 'fox-net'"):
        registry.resolve("fox-net@1.0.0")
    assert not registry.root.exists()  # reading creates nothing


def test_register_open_and_layout(registry: Registry, tmp_path: Path, home: Path) -> None:
    src = make_bundle(tmp_path / "src", "1.0.0")
    assert registry.register(src) == "fox-net@1.0.0"
    assert registry.root == home / "registry"
    version_dir = registry.root / "fox-net" / "versions" / "1.0.0"
    assert sorted(p.name for p in version_dir.iterdir()) == ["labels.tsv", "manifest.json", "model.onnx"]
    assert registry.names() == ["fox-net"] and registry.versions("fox-net") == ["1.0.0"]
    assert registry.resolve("fox-net@1.0.0") == version_dir
    b = registry.open("fox-net@1.0.0")
    assert b.ref == "fox-net@1.0.0" and b.path == version_dir and b.labels == LABELS
    assert list((registry.root / ".tmp").iterdir()) == []  # staging cleaned up
    # from a zip and from an opened Bundle
    assert registry.register(make_bundle(tmp_path / "src", "1.1.0", fmt=".zip")) == "fox-net@1.1.0"
    with Bundle.open(make_bundle(tmp_path / "src", "1.2.0", fmt=".zip")) as opened:
        assert registry.register(opened, aliases=["production", "canary"]) == "fox-net@1.2.0"
    assert registry.aliases("fox-net") == {"canary": "1.2.0", "production": "1.2.0"}
    assert registry.open("fox-net").manifest.version == "1.2.0"


def test_refuses_duplicates_and_corrupt_bundles(registry: Registry, tmp_path: Path) -> None:
    registry.register(make_bundle(tmp_path / "a", "1.0.0"))
    with pytest.raises(RegistryError, match="fox-net@1.0.0 is already registered"):
        registry.register(make_bundle(tmp_path / "b", "1.0.0"))
    bad = make_bundle(tmp_path / "c", "2.0.0")
    (bad / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="model_sha256 mismatch"):
        registry.register(bad)
    assert registry.versions("fox-net") == ["1.0.0"]
    with pytest.raises(RegistryError, match="invalid alias"):
        registry.register(make_bundle(tmp_path / "d", "3.0.0"), aliases=["Prod"])
    assert registry.versions("fox-net") == ["1.0.0"]  # alias names are checked before anything is copied


def test_versions_in_semver_order(registry: Registry, tmp_path: Path) -> None:
    expected = [
        "0.9.0",
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.2.0",
        "1.10.0",
        "2.0.0",
    ]
    shuffled = expected[:]
    random.Random(4).shuffle(shuffled)
    for v in shuffled:
        registry.register(make_bundle(tmp_path / "src", v, size=64))
    assert registry.versions("fox-net") == expected


def test_aliases_and_resolve_rules(registry: Registry, tmp_path: Path) -> None:
    for v in ("1.0.0", "1.1.0", "2.0.0-rc.1"):
        registry.register(make_bundle(tmp_path / "src", v))
    with pytest.raises(RegistryError, match=r"no 'production' alias.*versions: 1\.0\.0, 1\.1\.0, 2\.0\.0-rc\.1"):
        registry.resolve("fox-net")
    registry.set_alias("fox-net", "production", "1.0.0")
    registry.set_alias("fox-net", "staging", "2.0.0-rc.1")
    assert registry.resolve("fox-net") == registry.resolve("fox-net@production") == registry.resolve("fox-net@1.0.0")
    assert registry.resolve("fox-net@staging").name == "2.0.0-rc.1"
    registry.set_alias("fox-net", "production", "1.1.0")  # moving an alias
    assert registry.open("fox-net").manifest.version == "1.1.0"
    assert registry.aliases("fox-net") == {"production": "1.1.0", "staging": "2.0.0-rc.1"}
    data = json.loads((registry.root / "fox-net" / "aliases.json").read_text())
    assert data == {"production": "1.1.0", "staging": "2.0.0-rc.1"}

    for bad in ("Prod", "1prod", "1.0.0", "", "a b", "prod@x"):
        with pytest.raises(RegistryError, match="invalid alias"):
            registry.set_alias("fox-net", bad, "1.0.0")
    with pytest.raises(RegistryError, match=r"fox-net@9\.9\.9 is not registered"):
        registry.set_alias("fox-net", "beta", "9.9.9")
    with pytest.raises(RegistryError, match="invalid version"):
        registry.set_alias("fox-net", "beta", "latest")
    with pytest.raises(RegistryError, match="no 'nightly' alias"):
        registry.resolve("fox-net@nightly")
    with pytest.raises(RegistryError, match=r"fox-net@3\.0\.0 is not registered"):
        registry.resolve("fox-net@3.0.0")
    with pytest.raises(RegistryError, match="invalid bundle name"):
        registry.resolve("Fox@1.0.0")
    with pytest.raises(RegistryError, match=r"invalid reference 'fox-net@1\.0': expected name@MAJOR"):
        registry.resolve("fox-net@1.0")
    with pytest.raises(RegistryError, match="nothing after '@'"):
        registry.resolve("fox-net@")

    registry.remove_alias("fox-net", "staging")
    assert registry.aliases("fox-net") == {"production": "1.1.0"}
    with pytest.raises(RegistryError, match="no 'staging' alias"):
        registry.remove_alias("fox-net", "staging")


def test_delete_rules(registry: Registry, tmp_path: Path) -> None:
    for v in ("1.0.0", "1.1.0"):
        registry.register(make_bundle(tmp_path / "src", v))
    registry.set_alias("fox-net", "production", "1.1.0")
    with pytest.raises(RegistryError, match="in use by alias"):
        registry.delete("fox-net", "1.1.0")
    registry.delete("fox-net", "1.0.0")
    assert registry.versions("fox-net") == ["1.1.0"]
    with pytest.raises(RegistryError, match="not registered"):
        registry.delete("fox-net", "1.0.0")
    registry.remove_alias("fox-net", "production")
    registry.delete("fox-net", "1.1.0")
    assert registry.versions("fox-net") == [] and registry.names() == []
    assert list((registry.root / ".tmp").iterdir()) == []
    # a deleted version can be registered again
    registry.register(make_bundle(tmp_path / "again", "1.0.0"))
    assert registry.versions("fox-net") == ["1.0.0"]


def test_stale_staging_is_cleaned_but_live_staging_is_not(registry: Registry, tmp_path: Path) -> None:
    registry.register(make_bundle(tmp_path / "src", "1.0.0"))
    tmp = registry.root / ".tmp"
    old, fresh, live = tmp / "stage-old", tmp / "stage-fresh", tmp / "stage-live"
    for d in (old, fresh, live):
        (d / "bundle").mkdir(parents=True)
        (d / "bundle" / "model.onnx").write_bytes(b"partial")
        (d / ".inuse").touch()
    hour_ago = time.time() - 3700
    for d in (old, live):
        os.utime(d, (hour_ago, hour_ago))
    fd = os.open(live / ".inuse", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a writer that is still copying would
        registry.register(make_bundle(tmp_path / "src", "1.1.0"))
        assert not old.exists() and fresh.exists() and live.exists()
    finally:
        os.close(fd)
    registry.delete("fox-net", "1.0.0")
    assert not live.exists()


# ------------------------------------------------------------------------------------ processes

_REGISTER = textwrap.dedent(
    """
    import sys
    from speciesclf.bundles.registry import Registry, RegistryError
    root, path = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        print("ok", Registry(root).register(path), flush=True)
    except RegistryError as e:
        print("refused", e, flush=True)
    """
)


def _spawn(code: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _go(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()


def test_crash_safety_under_sigkill(registry: Registry, tmp_path: Path) -> None:
    src = make_bundle(tmp_path / "src", "1.0.0", size=30 * 2**20)
    root = str(registry.root)
    # How long one full registration takes, from "go" to done.
    proc = _spawn(_REGISTER, root, str(src))
    start = time.perf_counter()
    _go([proc])
    out, err = proc.communicate(timeout=120)
    duration = time.perf_counter() - start
    assert out.startswith("ok"), err
    registry.delete("fox-net", "1.0.0")

    rng = random.Random(1234)
    delays = [duration * f for f in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.1)] + [rng.uniform(0, duration) for _ in range(3)]
    outcomes = set()
    for delay in delays:
        proc = _spawn(_REGISTER, root, str(src))
        _go([proc])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        versions = registry.versions("fox-net")
        assert versions in ([], ["1.0.0"])
        # whatever is visible is complete and verifiable
        for v in versions:
            registry.open(f"fox-net@{v}", verify=True)
        visible = registry.root / "fox-net" / "versions"
        if visible.is_dir():
            assert sorted(p.name for p in visible.iterdir()) == versions
        outcomes.add(bool(versions))
        if versions:
            registry.delete("fox-net", "1.0.0")
        # a new register of the same version succeeds after the crash
        assert registry.register(src) == "fox-net@1.0.0"
        registry.open("fox-net@1.0.0", verify=True)
        registry.delete("fox-net", "1.0.0")
    assert False in outcomes  # at least one kill landed before the version was published
    # Leftovers of the killed writers are garbage in .tmp only, and go once stale.
    tmp = registry.root / ".tmp"
    hour_ago = time.time() - 3700
    for d in tmp.iterdir():
        os.utime(d, (hour_ago, hour_ago))
    registry.register(make_bundle(tmp_path / "small", "2.0.0"))
    assert list(tmp.iterdir()) == []


def test_two_processes_register_different_versions(registry: Registry, tmp_path: Path) -> None:
    a = make_bundle(tmp_path / "a", "1.0.0", size=2 * 2**20)
    b = make_bundle(tmp_path / "b", "1.1.0", size=2 * 2**20)
    procs = [_spawn(_REGISTER, str(registry.root), str(p)) for p in (a, b)]
    _go(procs)
    outs = [p.communicate(timeout=60) for p in procs]
    assert [o.split()[:2] for o, _ in outs] == [["ok", "fox-net@1.0.0"], ["ok", "fox-net@1.1.0"]], outs
    assert registry.versions("fox-net") == ["1.0.0", "1.1.0"]
    for v in ("1.0.0", "1.1.0"):
        registry.open(f"fox-net@{v}")


@pytest.mark.parametrize("attempt", range(3))
def test_two_processes_register_the_same_version(registry: Registry, tmp_path: Path, attempt: int) -> None:
    a = make_bundle(tmp_path / "a", "1.0.0", size=2 * 2**20)
    b = make_bundle(tmp_path / "b", "1.0.0", size=2 * 2**20)
    procs = [_spawn(_REGISTER, str(registry.root), str(p)) for p in (a, b)]
    _go(procs)
    outs = [p.communicate(timeout=60)[0].split()[0] for p in procs]
    assert sorted(outs) == ["ok", "refused"]
    winner = (a, b)[outs.index("ok")]
    bundle = registry.open("fox-net@1.0.0")
    assert bundle.model_path.read_bytes() == (winner / "model.onnx").read_bytes()
    assert registry.versions("fox-net") == ["1.0.0"]


_ALIASES = textwrap.dedent(
    """
    import sys
    from speciesclf.bundles.registry import Registry
    root, tag = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    sys.stdin.readline()
    reg = Registry(root)
    for i in range(25):
        reg.set_alias("fox-net", f"{tag}-{i}", ("1.0.0", "1.1.0")[i % 2])
        if i % 5 == 4:
            reg.remove_alias("fox-net", f"{tag}-{i}")
    print("done", flush=True)
    """
)


def test_aliases_set_concurrently_stay_valid(registry: Registry, tmp_path: Path) -> None:
    for v in ("1.0.0", "1.1.0"):
        registry.register(make_bundle(tmp_path / "src", v))
    tags = ["p", "q", "r", "s"]
    procs = [_spawn(_ALIASES, str(registry.root), t) for t in tags]
    _go(procs)
    reads = 0
    while any(p.poll() is None for p in procs):
        registry.aliases("fox-net")  # readers never see a partial aliases.json
        reads += 1
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert out.strip() == "done", err
    text = (registry.root / "fox-net" / "aliases.json").read_text()
    expected = {f"{t}-{i}": ("1.0.0", "1.1.0")[i % 2] for t in tags for i in range(25) if i % 5 != 4}
    assert json.loads(text) == expected  # every update kept: read-modify-write happened under the lock
    assert reads > 0
    assert [p.name for p in (registry.root / "fox-net").iterdir() if p.name.endswith(".tmp")] == []


# ------------------------------------------------------------------------------------ CLI


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPECIESCLF_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "speciesclf", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_registry_commands(tmp_path: Path, home: Path) -> None:
    a = make_bundle(tmp_path / "src", "1.0.0")
    b = make_bundle(tmp_path / "src", "1.1.0", fmt=".zip")
    r = _cli("registry", "register", str(a), "--alias", "production", home=home)
    assert r.returncode == 0 and r.stdout.strip() == "fox-net@1.0.0", r.stderr
    root = tmp_path / "other-root"
    r = _cli("registry", "register", str(b), "--root", str(root), home=home)
    assert r.returncode == 0 and r.stdout.strip() == "fox-net@1.1.0", r.stderr
    assert Registry(root).versions("fox-net") == ["1.1.0"]
    assert Registry().versions("fox-net") == ["1.0.0"]  # the default root is $SPECIESCLF_HOME/registry

    r = _cli("registry", "register", str(b), home=home)
    assert r.returncode == 0
    r = _cli("registry", "list", "--json", home=home)
    assert json.loads(r.stdout) == {"fox-net": {"versions": ["1.0.0", "1.1.0"], "aliases": {"production": "1.0.0"}}}
    r = _cli("registry", "list", home=home)
    assert "fox-net" in r.stdout and "production -> 1.0.0" in r.stdout
    r = _cli("registry", "--root", str(root), "list", "--json", home=home)
    assert json.loads(r.stdout) == {"fox-net": {"versions": ["1.1.0"], "aliases": {}}}

    r = _cli("registry", "alias", "fox-net", "production", "1.1.0", home=home)
    assert r.returncode == 0, r.stderr
    r = _cli("registry", "resolve", "fox-net", home=home)
    assert r.returncode == 0 and Path(r.stdout.strip()) == home / "registry" / "fox-net" / "versions" / "1.1.0"

    r = _cli("registry", "delete", "fox-net", "1.1.0", home=home)
    assert r.returncode == 1 and r.stderr.startswith("speciesclf: error:") and "alias" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("registry", "delete", "fox-net", "1.0.0", home=home)
    assert r.returncode == 0 and Registry().versions("fox-net") == ["1.1.0"]
    r = _cli("registry", "alias", "fox-net", "production", "--remove", home=home)
    assert r.returncode == 0 and Registry().aliases("fox-net") == {}

    r = _cli("registry", "resolve", "fox-net", home=home)
    assert r.returncode == 1 and "no 'production' alias" in r.stderr and "1.1.0" in r.stderr
    r = _cli("registry", "register", str(a), "--alias", "production", home=home)  # deleted, so allowed again
    assert r.returncode == 0 and Registry().aliases("fox-net") == {"production": "1.0.0"}
    r = _cli("registry", "register", str(a), home=home)
    assert r.returncode == 1 and "already registered" in r.stderr and "Traceback" not in r.stderr
    r = _cli("registry", "resolve", "nothing-here", home=home)
    assert r.returncode == 1 and r.stderr.startswith("speciesclf: error: no bundle named") and "Traceback" not in r.stderr
    r = _cli("registry", "alias", "fox-net", "production", "9.0.0", home=home)
    assert r.returncode == 1 and "not registered" in r.stderr
    r = _cli("registry", "list", "--root", str(tmp_path / "empty"), home=home)
    assert r.returncode == 0 and "no bundles" in r.stdout


# ------------------------------------------------------------------------------------ permissions

_WRITE_UNDER_UMASK = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    os.umask(int(sys.argv[1], 8))
    from speciesclf.bundles.registry import Registry
    registry = Registry(sys.argv[2])
    registry.register(sys.argv[3], aliases=["production"])
    registry.set_alias("fox-net", "staging", "1.0.0")
""")


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*"))
            if ".tmp" not in p.relative_to(root).parts}


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o002, 0o664, 0o775)])
def test_registry_files_follow_the_umask_like_ordinary_files(tmp_path: Path, umask: int, file_mode: int,
                                                             dir_mode: int) -> None:
    source = make_bundle(tmp_path / "src", "1.0.0")
    root = tmp_path / "registry"
    r = subprocess.run([sys.executable, "-c", _WRITE_UNDER_UMASK, oct(umask)[2:], str(root), str(source)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    modes = _modes(root)
    assert modes["fox-net/aliases.json"] == file_mode  # was 0600 (mkstemp's mode) whatever the umask
    assert modes["fox-net/versions/1.0.0/manifest.json"] == file_mode
    files = {path: mode for path, mode in modes.items() if (root / path).is_file()}
    dirs = {path: mode for path, mode in modes.items() if (root / path).is_dir()}
    # Another account's view: whoever may read a version (group or others, as the umask says) may read the
    # aliases and take the lock too, and may enter every folder on the way.
    assert set(files.values()) == {file_mode}, files
    assert set(dirs.values()) == {dir_mode}, dirs
