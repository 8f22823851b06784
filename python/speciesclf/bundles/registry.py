"""A local registry of model bundles: versions, aliases (``production``), and atomic, concurrent-safe writes.

Layout under the root (default ``default_home() / "registry"``)::

    <name>/versions/<version>/   a complete bundle directory, only ever appearing through one rename
    <name>/aliases.json          {"production": "1.2.0", ...}, replaced atomically
    <name>/rejected.json         {"1.3.0": {"reason": ..., "at": ...}}: versions a rollout refused
    <name>/rollout.json          the state of the rollout of <name> (speciesclf.rollout), replaced atomically
    <name>/.lock                 flock'ed by every writer of <name>
    .tmp/                        staging area; leftovers of crashed writers are removed after an hour

Readers take no locks: every state they can observe was published by a single ``rename``/``replace``.

Every file and folder is created as ``open()``/``mkdir()`` create them, 0666/0777 less the writer's umask
(umask 022: 0644 files, 0755 folders), ``aliases.json`` and ``.lock`` included: an account that can read the
versions can also resolve their aliases. Staging folders under ``.tmp`` are private (0700) until published.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .bundle import Bundle, BundleError, _fsync_dir, is_semver, is_valid_name, semver_key

__all__ = ["RegistryError", "Registry", "default_home", "split_ref"]

DEFAULT_ALIAS = "production"
STALE_TMP_SECONDS = 3600
_ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]*")  # applied with fullmatch: `$` also matches before a "\n"
_INUSE = ".inuse"  # flock'ed by the process that owns a staging directory under .tmp


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown name, duplicate version, alias rules...)."""


def default_home() -> Path:
    """``$SPECIESCLF_HOME``, else ``$XDG_CACHE_HOME/speciesclf``, else ``~/.cache/speciesclf``."""
    home = os.environ.get("SPECIESCLF_HOME")
    if home:
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    if cache:
        return Path(cache).expanduser() / "speciesclf"
    return Path.home() / ".cache" / "speciesclf"


def _check_name(name: object) -> str:
    if not is_valid_name(name):
        raise RegistryError(f"invalid bundle name {name!r}: expected ^[a-z0-9][a-z0-9._-]{{0,63}}$")
    return name  # type: ignore[return-value]


def _check_version(version: object) -> str:
    if not is_semver(version):
        raise RegistryError(f"invalid version {version!r}: expected MAJOR.MINOR.PATCH[-prerelease][+build]")
    return version  # type: ignore[return-value]


def _check_alias(alias: object) -> str:
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias) or is_semver(alias):
        raise RegistryError(f"invalid alias {alias!r}: expected ^[a-z][a-z0-9_-]*$ (and not a version)")
    return alias


_DOCUMENTS = ("rollout", "rejected")


def _check_document(document: str) -> str:
    if document not in _DOCUMENTS:
        raise RegistryError(f"unknown registry document {document!r}; one of {', '.join(_DOCUMENTS)}")
    return document


def split_ref(ref: object) -> tuple[str, str]:
    """``name[@version|@alias]`` -> (name, tag); a bare name means ``name@production``.

    The tag is not checked here beyond being non-empty: a version or an alias is told apart by the caller.
    """
    if not isinstance(ref, str) or not ref:
        raise RegistryError(f"invalid reference {ref!r}: expected name, name@version or name@alias")
    name, sep, tag = ref.partition("@")
    _check_name(name)
    if not sep:
        tag = DEFAULT_ALIAS
    elif not tag:
        raise RegistryError(f"invalid reference {ref!r}: nothing after '@'")
    return name, tag


def _write_json_atomic(path: Path, data: dict) -> None:
    # Created with mode 0666 & ~umask, as open() creates any file (mkstemp's 0600 would hide aliases.json from
    # an account that can read the version folders beside it); the random name keeps writers apart.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _copy_tree_synced(src: Path, dst: Path) -> None:
    """Copy the regular files and folders of a bundle, fsync'ing each file; symlinks are refused."""
    dst.mkdir()
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_symlink():
            raise RegistryError(f"{entry}: bundles may not contain symlinks")
        if entry.is_dir():
            _copy_tree_synced(entry, target)
        elif entry.is_file():
            with open(entry, "rb") as fin, open(target, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
        else:
            raise RegistryError(f"{entry}: bundles hold regular files only")
    _fsync_dir(dst)


class Registry:
    """Bundles by ``name@version`` or ``name@alias``; see the module docstring for the layout."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_home() / "registry"

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ------------------------------------------------------------------------------------- reading

    def names(self) -> list[str]:
        """Names that have at least one registered version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if is_valid_name(p.name) and p.is_dir() and self._has_versions(p.name)
        )

    def _has_versions(self, name: str) -> bool:
        d = self.root / name / "versions"
        try:
            return any(is_semver(p.name) for p in d.iterdir())
        except OSError:
            return False

    def versions(self, name: str) -> list[str]:
        """Registered versions of ``name`` in semver order (a prerelease before its release), oldest first."""
        _check_name(name)
        d = self.root / name / "versions"
        try:
            found = [p.name for p in d.iterdir() if is_semver(p.name) and p.is_dir()]
        except FileNotFoundError:
            return []
        return sorted(found, key=semver_key)

    def aliases(self, name: str) -> dict[str, str]:
        """``alias -> version`` for ``name`` ({} when none)."""
        _check_name(name)
        path = self.root / name / "aliases.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise RegistryError(f"{path}: corrupt aliases file: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise RegistryError(f"{path}: corrupt aliases file: expected an object of alias -> version")
        return dict(sorted(data.items()))

    def _split_ref(self, ref: str) -> tuple[str, str]:
        return split_ref(ref)

    def resolve(self, ref: str) -> Path:
        """``name@1.2.0``, ``name@alias`` or ``name`` (meaning ``name@production``) -> the bundle directory."""
        name, tag = self._split_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"no bundle named {name!r} in the registry at {self.root} (names: {known})")
        listed = ", ".join(versions)
        if is_semver(tag):
            version = tag
        else:
            if not _ALIAS_RE.fullmatch(tag):
                raise RegistryError(
                    f"invalid reference {ref!r}: expected name@MAJOR.MINOR.PATCH[-prerelease][+build] or name@alias"
                )
            aliases = self.aliases(name)
            if tag not in aliases:
                hint = f"; set one with: speciesclf registry alias {name} {tag} VERSION" if tag == DEFAULT_ALIAS else ""
                have = ", ".join(f"{a} -> {v}" for a, v in aliases.items()) or "none"
                raise RegistryError(
                    f"{name!r} has no {tag!r} alias (aliases: {have}); versions: {listed}; "
                    f"use {name}@<version>{hint}"
                )
            version = aliases[tag]
            if not is_semver(version):  # a hand-edited "../../x" must not lead out of versions/
                path = self.root / name / "aliases.json"
                raise RegistryError(f"{path}: corrupt aliases file: {tag!r} -> {version!r} is not a version")
        path = self.root / name / "versions" / version
        if not path.is_dir():
            raise RegistryError(f"{name}@{version} is not registered; versions: {listed}")
        return path

    def open(self, ref: str, *, verify: bool = True) -> Bundle:
        """Resolve ``ref`` and open the bundle (checking the model's sha256 unless ``verify=False``)."""
        path = self.resolve(ref)
        bundle = Bundle.open(path, verify=verify)
        name, version = path.parent.parent.name, path.name
        if (bundle.manifest.name, bundle.manifest.version) != (name, version):
            raise RegistryError(f"{path}: holds {bundle.ref}, not {name}@{version}")
        return bundle

    # ------------------------------------------------------------------------------------- writing

    @contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """Exclusive lock on ``<name>/.lock`` for one mutation; yields the name directory."""
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Leftovers of a writer that died between writing and replacing one of the documents.
            for stray in d.glob(".*.json.*.tmp"):
                try:
                    stray.unlink()
                except OSError:
                    pass
            yield d
        finally:
            os.close(fd)  # releases the lock

    def _tmp_root(self) -> Path:
        t = self.root / ".tmp"
        t.mkdir(parents=True, exist_ok=True)
        return t

    def _clean_tmp(self, older_than: float = STALE_TMP_SECONDS) -> None:
        """Remove staging leftovers older than ``older_than`` seconds that no live process holds."""
        t = self.root / ".tmp"
        try:
            entries = list(t.iterdir())
        except OSError:
            return
        now = time.time()
        for entry in entries:
            try:
                if now - entry.lstat().st_mtime < older_than:
                    continue
            except OSError:
                continue
            if entry.is_dir() and not entry.is_symlink():
                inuse = entry / _INUSE
                try:
                    fd = os.open(inuse, os.O_RDWR)
                except OSError:
                    fd = -1
                if fd >= 0:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        os.close(fd)
                        continue  # a live writer still owns it
                    try:
                        shutil.rmtree(entry, ignore_errors=True)
                    finally:
                        os.close(fd)
                else:
                    shutil.rmtree(entry, ignore_errors=True)
            else:
                try:
                    entry.unlink()
                except OSError:
                    pass

    @contextmanager
    def _staging(self) -> Iterator[Path]:
        """A fresh directory under ``.tmp`` owned (flock'ed) by this process, removed afterwards."""
        work = Path(tempfile.mkdtemp(prefix="stage-", dir=self._tmp_root()))
        fd = os.open(work / _INUSE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
            os.close(fd)

    def register(self, bundle: str | Path | Bundle, *, aliases: Sequence[str] = ()) -> str:
        """Copy a bundle (directory, ``.zip`` or opened Bundle) in and return ``"name@version"``.

        The model's sha256 is verified before and after the copy. An existing ``name@version`` is
        refused. ``aliases`` are pointed at the new version in the same locked step.
        """
        if isinstance(aliases, str):
            aliases = [aliases]
        aliases = [_check_alias(a) for a in aliases]
        try:
            opened = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=False)
            opened.verify()
        except BundleError as e:
            raise RegistryError(f"cannot register {getattr(bundle, 'path', bundle)}: {e}") from None
        name, version = opened.manifest.name, opened.manifest.version
        ref = f"{name}@{version}"
        final = self.root / name / "versions" / version
        if final.exists():
            raise RegistryError(f"{ref} is already registered ({final})")
        self._clean_tmp()
        with self._staging() as work:
            staged = work / "bundle"
            _copy_tree_synced(opened.path, staged)
            try:
                copy = Bundle.open(staged, verify=True)
            except BundleError as e:
                raise RegistryError(f"cannot register {ref}: the copy does not check out: {e}") from None
            if copy.ref != ref:
                raise RegistryError(f"cannot register {ref}: the copy holds {copy.ref}")
            _fsync_dir(work)
            with self._locked(name) as d:
                versions_dir = d / "versions"
                versions_dir.mkdir(exist_ok=True)
                if final.exists():
                    raise RegistryError(f"{ref} is already registered ({final})")
                # Read (and so check) the alias table before the version appears: a corrupt aliases.json
                # then refuses the whole register instead of leaving a version without its aliases.
                table = self.aliases(name) if aliases else {}
                try:
                    os.rename(staged, final)
                except OSError as e:
                    if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        raise RegistryError(f"{ref} is already registered ({final})") from None
                    raise
                _fsync_dir(versions_dir)
                if aliases:
                    table.update({a: version for a in aliases})
                    _write_json_atomic(d / "aliases.json", table)
        return ref

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``name@alias`` at a registered ``version`` (replacing where it pointed before)."""
        _check_name(name)
        _check_alias(alias)
        _check_version(version)
        with self._locked(name) as d:
            if not (d / "versions" / version).is_dir():
                listed = ", ".join(self.versions(name)) or "none"
                raise RegistryError(f"{name}@{version} is not registered; versions: {listed}")
            table = self.aliases(name)
            table[alias] = version
            _write_json_atomic(d / "aliases.json", table)

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove ``name@alias``; RegistryError when there is no such alias."""
        _check_name(name)
        _check_alias(alias)
        with self._locked(name) as d:
            table = self.aliases(name)
            if alias not in table:
                raise RegistryError(f"{name!r} has no {alias!r} alias")
            del table[alias]
            _write_json_atomic(d / "aliases.json", table)

    # ------------------------------------------------------------------------- documents beside the versions

    def read_document(self, name: str, document: str) -> dict | None:
        """The JSON object ``<name>/<document>.json`` (None when there is none). Lock-free, as aliases are."""
        _check_name(name)
        path = self.root / name / f"{_check_document(document)}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise RegistryError(f"{path}: corrupt {document} file: {e}") from None
        if not isinstance(data, dict):
            raise RegistryError(f"{path}: corrupt {document} file: expected a JSON object")
        return data

    def update_document(self, name: str, document: str, change: Callable[[dict | None], dict | None]) -> dict | None:
        """Replace ``<name>/<document>.json`` by ``change(current)`` under the name's lock, atomically: every
        reader sees the old or the new object, also after a crash. ``change`` returning None removes it.
        Returns what was written."""
        _check_name(name)
        _check_document(document)
        with self._locked(name) as d:
            new = change(self.read_document(name, document))
            path = d / f"{document}.json"
            if new is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    _fsync_dir(d)
            else:
                _write_json_atomic(path, new)
            return new

    def reject(self, name: str, version: str, reason: str) -> None:
        """Mark ``name@version`` as rejected (by a rollout), with the reason; a rejected version is never
        started as a candidate again until :meth:`unreject`."""
        _check_version(version)
        if not (self.root / name / "versions" / version).is_dir():
            raise RegistryError(f"{name}@{version} is not registered")
        self.update_document(name, "rejected", lambda table: {**(table or {}),
                                                              version: {"reason": str(reason), "at": time.time()}})

    def unreject(self, name: str, version: str) -> None:
        _check_version(version)
        self.update_document(name, "rejected", lambda table: {k: v for k, v in (table or {}).items() if k != version})

    def rejections(self, name: str) -> dict[str, dict]:
        """``version -> {"reason", "at"}`` of the versions of ``name`` a rollout rejected."""
        return dict(self.read_document(name, "rejected") or {})

    def delete(self, name: str, version: str) -> None:
        """Remove ``name@version``; refused while an alias points at it."""
        _check_name(name)
        _check_version(version)
        if not (self.root / name / "versions" / version).is_dir():
            raise RegistryError(f"{name}@{version} is not registered")
        self._clean_tmp()
        with self._locked(name) as d:
            path = d / "versions" / version
            if not path.is_dir():
                raise RegistryError(f"{name}@{version} is not registered")
            pointing = sorted(a for a, v in self.aliases(name).items() if v == version)
            if pointing:
                raise RegistryError(
                    f"{name}@{version} is in use by alias(es) {', '.join(pointing)}; move or remove them first"
                )
            grave = Path(tempfile.mkdtemp(prefix="delete-", dir=self._tmp_root()))
            os.rename(path, grave / "bundle")  # the version disappears in one step
            _fsync_dir(d / "versions")
        shutil.rmtree(grave, ignore_errors=True)
