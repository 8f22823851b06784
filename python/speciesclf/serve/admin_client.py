"""The client of a service's admin API (``/v1/admin/``), as ``speciesclf rollout --url`` uses it.

The library's other HTTP client, :mod:`speciesclf.sources.fetch`, fetches images from addresses a policy
allows; this one talks to a service its operator names, with a bearer token, and takes JSON back. The
standard library's urllib is enough for both directions of that.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["AdminClient", "AdminError"]


class AdminError(RuntimeError):
    """A call of a service's admin API that was refused or could not be made; the message says which."""


class AdminClient:
    """The admin API of a running service (docs/rollout.md), for ``speciesclf rollout --url``. The token is
    sent as a bearer header and never shown."""

    def __init__(self, url: str, token_file: str | None, timeout_s: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--url: expected http://HOST:PORT or https://HOST:PORT, got {url!r}")
        if token_file is None:
            raise ValueError("--url needs --admin-token-file: the admin API takes a bearer token")
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"--admin-token-file {token_file}: not a text file") from None
        except OSError as e:
            raise OSError(f"--admin-token-file {token_file}: cannot read it ({e.strerror or e})") from None
        if not token:
            raise ValueError(f"--admin-token-file {token_file}: the file is empty")
        self.base = url.rstrip("/")
        self.token_file = token_file
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self.timeout_s = timeout_s

    def get(self, path: str) -> dict:
        return self._call("GET", path, None)

    def post(self, path: str, body: dict) -> dict:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: dict | None) -> dict:
        status, raw = self._send(method, self.base + path, body)
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if status == 200 and isinstance(data, dict):
            return data
        raise AdminError(self._refusal(status, data, raw, method, path))

    def _send(self, method: str, url: str, body: dict | None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = dict(self._headers, **({"Content-Type": "application/json"} if data is not None else {}))
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            raise AdminError(f"cannot reach {self.base}: {getattr(e, 'reason', e)}") from None

    def _refusal(self, status: int, data: dict | None, raw: bytes, method: str, path: str) -> str:
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            said = f"{error.get('code', 'error')}: {error.get('message', '')}".rstrip(": ")
        else:
            said = raw[:200].decode("utf-8", "replace").strip() or "no body"
        where = f"{self.base} ({method} {path})"
        if status == 401:
            return f"{where}: 401 {said} (the admin API wants the token as a bearer header)"
        if status == 403:
            return f"{where}: 403 {said} (the token read from {self.token_file})"
        if status == 404:
            return (f"{where}: 404: the service has no admin API (it serves one only when started with "
                    "--admin-token-file)")
        return f"{where}: {status} {said}"
