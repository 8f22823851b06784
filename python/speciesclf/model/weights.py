"""The pinned model weights: where they are found, and how they are fetched and verified.

:func:`weights_path` resolves a :class:`WeightsSpec` to a local file whose SHA-256 matches the pin, in this
order:

1. ``$SPECIESCLF_WEIGHTS``: a file, or a folder holding ``spec.filename``. An explicit setting is never
   second-guessed: a missing or wrong file there is an error, not a reason to download.
2. The cache, ``cache_dir() / "weights" / spec.filename``. A cached file whose hash does not match is
   removed and fetched again.
3. A download (unless ``download=False``) from each of ``spec.urls`` in turn, through speciesclf's one URL
   fetcher (:mod:`speciesclf.sources.fetch`) under a :class:`~speciesclf.sources.fetch.UrlPolicy`: http(s) only, public
   addresses only unless ``url_policy`` allows a network, at most 5 redirects (each checked again, never
   from https down to http), a connect/read timeout, and a body cap of twice the pinned size. The body
   streams into a temporary file beside the final one, is hash-checked, then ``os.replace``-d into place,
   so a reader never sees a partial file and concurrent downloaders are safe. The fetcher connects
   directly: behind a proxy, download the file yourself and point ``$SPECIESCLF_WEIGHTS`` at it.

Everything that fails raises :class:`WeightsError`, whose message says how to point at a local copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from ..sources.fetch import UrlPolicy, fetch_into

__all__ = ["MOBILENETV2_INT8", "WeightsError", "WeightsSpec", "cache_dir", "weights_path"]

ENV_WEIGHTS = "SPECIESCLF_WEIGHTS"
ENV_HOME = "SPECIESCLF_HOME"
MAX_REDIRECTS = 5
_CHUNK = 1 << 16


class WeightsError(RuntimeError):
    """The weights could not be found, verified or downloaded."""


@dataclass(frozen=True)
class WeightsSpec:
    """One pinned weights file: its file name, SHA-256 (hex), exact size in bytes, and where to fetch it."""

    filename: str
    sha256: str
    size: int
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        name = self.filename
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"WeightsSpec.filename must be a plain file name, not {name!r}")
        digest = self.sha256.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"WeightsSpec.sha256 must be 64 hex digits, not {self.sha256!r}")
        object.__setattr__(self, "sha256", digest)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"WeightsSpec.size must be a positive int, not {self.size!r}")
        if isinstance(self.urls, str):
            raise TypeError("WeightsSpec.urls must be a sequence of URLs, not one string")
        object.__setattr__(self, "urls", tuple(self.urls))


MOBILENETV2_INT8 = WeightsSpec(
    filename="mobilenetv2-12-int8.onnx",
    sha256="83530ad811bc31d2b60a5599a21265a5057608c9b044b4ee758cc22f2309f54f",
    size=3655640,
    urls=(
        # The ONNX Model Zoo's own repository (a Git LFS file: GitHub redirects to media.githubusercontent.com).
        "https://github.com/onnx/models/raw/main/validated/vision/classification/mobilenet/model/"
        "mobilenetv2-12-int8.onnx",
        # The model zoo's Hugging Face mirror (one repository per model).
        "https://huggingface.co/onnxmodelzoo/mobilenetv2-12-int8/resolve/main/mobilenetv2-12-int8.onnx",
    ),
)


def cache_dir() -> Path:
    """speciesclf's cache folder: ``$SPECIESCLF_HOME``, else ``$XDG_CACHE_HOME/speciesclf``, else
    ``~/.cache/speciesclf``. Weights live in its ``weights`` subfolder. Nothing is created here."""
    home = os.environ.get(ENV_HOME, "").strip()
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and Path(xdg).expanduser().is_absolute():  # the XDG spec says to ignore a relative value
        return Path(xdg).expanduser() / "speciesclf"
    return Path.home() / ".cache" / "speciesclf"


def weights_path(spec: WeightsSpec = MOBILENETV2_INT8, *, download: bool = True, timeout: float = 60.0,
                 url_policy: UrlPolicy | None = None) -> Path:
    """A local file holding ``spec``'s weights, verified by SHA-256 (see the module docstring for the order).

    ``timeout`` (seconds) bounds connecting and each read of a download, not the whole transfer.
    ``url_policy`` says which hosts and networks a download may reach (default: public addresses only);
    the timeouts, the size cap and the redirect limit are the download's own, whatever the policy says.
    Raises :class:`WeightsError` when no verified file can be had.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    policy = dataclasses.replace(url_policy or UrlPolicy(), connect_timeout_s=timeout, read_timeout_s=timeout,
                                 timeout_s=None, max_redirects=MAX_REDIRECTS, max_bytes=spec.size * 2)

    explicit = os.environ.get(ENV_WEIGHTS, "").strip()
    if explicit:
        return _from_env(spec, Path(explicit).expanduser())

    target = cache_dir() / "weights" / spec.filename
    cached = _cached(spec, target)
    if cached is not None:
        return cached
    if not download:
        raise WeightsError(f"{spec.filename} is not in the cache ({target}) and download=False. {_hint(spec, target)}")

    failures: list[str] = []
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create the cache folder {target.parent}: {exc}. {_hint(spec, target)}") from exc
    for url in spec.urls:
        try:
            _download(spec, url, target, policy)
        except _FetchError as exc:
            failures.append(f"  {url}: {exc}")
            continue
        return target
    tried = "\n".join(failures) if failures else "  (no download URLs)"
    raise WeightsError(f"could not download {spec.filename} (sha256 {spec.sha256}):\n{tried}\n{_hint(spec, target)}")


def _hint(spec: WeightsSpec, target: Path) -> str:
    return (
        f"Point speciesclf at a local copy: set {ENV_WEIGHTS}=/path/to/{spec.filename} (or the folder holding it; "
        f"in this repository's development setup the folder is ../shared/models), or put the file at {target}."
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK * 16):
            digest.update(chunk)
    return digest.hexdigest()


def _from_env(spec: WeightsSpec, path: Path) -> Path:
    where = f"{ENV_WEIGHTS}={path}"
    if path.is_dir():
        path = path / spec.filename
        where = f"{where} (folder form: {path})"
    if not path.is_file():
        raise WeightsError(f"{where}: no such file. Unset {ENV_WEIGHTS} or point it at {spec.filename}.")
    try:
        actual = _sha256_file(path)
    except OSError as exc:
        raise WeightsError(f"{where}: cannot read it: {exc}") from exc
    if actual != spec.sha256:
        raise WeightsError(
            f"{where}: sha256 {actual} does not match the pinned {spec.filename} sha256 {spec.sha256} "
            f"(size {path.stat().st_size} bytes, expected {spec.size}). Point {ENV_WEIGHTS} at the right file."
        )
    return path.absolute()


def _cached(spec: WeightsSpec, target: Path) -> Path | None:
    """The cached file if it verifies; a cached file that does not is removed (and None returned)."""
    try:
        if not target.is_file():
            return None
        if target.stat().st_size == spec.size and _sha256_file(target) == spec.sha256:
            return target
    except OSError:
        return None
    try:
        target.unlink()
    except FileNotFoundError:
        pass  # a concurrent caller got there first
    except OSError as exc:
        raise WeightsError(f"the cached {target} is corrupt and cannot be removed: {exc}") from exc
    return None


class _FetchError(Exception):
    """One URL failed; the next is tried."""


def _download(spec: WeightsSpec, url: str, target: Path, policy: UrlPolicy) -> None:
    """Fetch url into target (atomically), or raise _FetchError saying why not."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{spec.filename}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:

            def keep(piece: bytes) -> None:
                digest.update(piece)
                out.write(piece)

            try:
                received = fetch_into(url, keep, policy)
            except ImageError as exc:  # refused, failed, or over the cap: the fetcher's message says which
                raise _FetchError(str(exc)) from exc
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != spec.sha256:
            raise _FetchError(
                f"sha256 mismatch: got {actual} ({received} bytes), expected {spec.sha256} ({spec.size} bytes)"
            )
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as exc:  # writing the temporary file (a full disk)
        raise _FetchError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
