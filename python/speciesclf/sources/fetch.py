"""The one URL fetcher of speciesclf: a small asyncio HTTP/1.1 client that cannot be turned against the
network it runs in (server-side request forgery).

``Classifier.predict(url)`` (with ``allow_urls``), the HTTP service's ``{"url": ...}`` inputs and the
download of the built-in model's weights all fetch through it, under a :class:`UrlPolicy`. Every hop (the
URL and each redirect) is checked in the same order: scheme (http/https; a redirect from https down to
http is refused), no credentials, host allowlist, DNS resolution, then **every** resolved address against
:func:`address_refusal` (private, loopback, link-local and the like unless the policy allows their
network; cloud-metadata addresses always). The connection is opened to a vetted address itself, never to
the name, so a DNS answer that changes between the check and the connect (rebinding) cannot move it; the
Host header and the TLS SNI and certificate check still use the name. Connecting, each read (the longest
silence) and the whole fetch have their own timeouts; redirects and the body size are capped.

:class:`UrlFetcher` is the asyncio client (the service awaits it on its event loop); :func:`fetch_bytes`
and :func:`fetch_into` are the blocking calls, which also work where an event loop is already running
(a notebook cell): the fetch then runs on its own loop in a helper thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import os
import re
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from .._version import __version__
from ..errors import PayloadTooLargeError, UrlFetchError, UrlNotAllowedError

__all__ = [
    "METADATA_ADDRESSES",
    "UrlFetcher",
    "UrlPolicy",
    "address_refusal",
    "fetch_bytes",
    "fetch_into",
    "host_allowed",
    "host_pattern",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]
Connector = Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
Sink = Callable[[bytes], object]
T = TypeVar("T")

# Cloud instance-metadata endpoints: refused even inside a policy's allow_networks, because allowing e.g.
# 169.254.0.0/16 for a link-local image store must not expose the instance's credentials.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
    "169.254.169.253",  # AWS DNS resolver
    "169.254.170.2",  # AWS ECS task metadata
    "169.254.170.23",  # AWS EKS pod identity
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud (legacy)
    "fd00:ec2::254",  # AWS IMDS over IPv6
    "fd00:ec2::253",  # AWS DNS over IPv6
    "fd00:ec2::23",  # AWS EKS pod identity over IPv6
))

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not reachable as "the internet"
_REDIRECTS = (301, 302, 303, 307, 308)
_PIECE = 2**16


# --- what may be fetched (pure: no I/O) -----------------------------------------------------------------------


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64): a v6 form of
    127.0.0.1 or 169.254.169.254 must be judged as that IPv4 address."""
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    packed = ip.packed
    if packed[:12] == bytes(12) and int(ip) > 1:  # ::a.b.c.d (deprecated IPv4-compatible form)
        found.append(ipaddress.IPv4Address(packed[12:]))
    if any(ip in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(packed[12:]))
    return found


def address_refusal(address: str | IPAddress, allow_networks: Iterable[IPNetwork] = ()) -> str | None:
    """Why ``address`` must not be fetched from, or None when it may.

    Refused: cloud-metadata addresses (always), and unless inside ``allow_networks``: private, loopback,
    link-local, unspecified, multicast, reserved, site-local and other non-global addresses, in IPv4 or
    any IPv6 form that embeds an IPv4 address."""
    try:
        if isinstance(address, str):
            ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        else:
            ip = address
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # one address, two spellings: judge it (and match networks) as IPv4
        else:
            for inner in _embedded_ipv4(ip):
                reason = address_refusal(inner, allow_networks)
                if reason is not None:
                    return f"{ip} embeds {inner}: {reason}"
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if any(ip.version == net.version and ip in net for net in allow_networks):
        return None
    for test, what in (("is_loopback", "loopback"), ("is_link_local", "link-local"),
                       ("is_unspecified", "unspecified"), ("is_multicast", "multicast"),
                       ("is_reserved", "reserved"), ("is_private", "private")):
        if getattr(ip, test):
            return f"{ip} is a {what} address"
    if isinstance(ip, ipaddress.IPv6Address) and ip in _SITE_LOCAL:
        return f"{ip} is a site-local address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return f"{ip} is a shared (carrier-grade NAT) address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


def host_allowed(host: str, allow_hosts: Iterable[str]) -> bool:
    """``host`` (lower-case, IPv6 without brackets) against patterns: ``*`` (any host), ``*.example.com``
    (subdomains only) or an exact name or IP literal."""
    for pattern in allow_hosts:
        if pattern == "*" or pattern == host:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
            return True
    return False


def host_pattern(given: str) -> str:
    """An allowlist entry in the form URL hosts are matched in: lower case, no trailing dot, IP literals
    canonical and without brackets, names in their IDNA (``xn--``) form. An entry that could never match a
    URL's host (a port, a path) raises ValueError rather than silently never allowing anything."""
    host = given.strip().lower()
    if host == "*":
        return host
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    wildcard = host.startswith("*.")
    bare = (host[2:] if wildcard else host).rstrip(".")
    refused = ValueError(f"{given!r} is not a host name, IP, '*.domain' or '*'")
    if not bare or any(c in bare for c in "*/@?#:[] \\"):
        raise refused
    try:
        bare = bare.encode("idna").decode("ascii")
    except UnicodeError:
        raise refused from None
    return f"*.{bare}" if wildcard else bare


@dataclasses.dataclass(frozen=True)
class UrlPolicy:
    """Which URLs may be fetched, and for how long and how much.

    The default allows any host whose addresses are all public, and never a private, loopback,
    link-local or cloud-metadata address. ``allow_hosts`` narrows the hosts (``"images.example.com"``,
    ``"*.example.com"`` for subdomains, ``"*"`` for any); ``allow_networks`` (CIDRs such as
    ``"10.20.0.0/16"`` or ``"127.0.0.1/32"``) extends the addresses to networks that are not public.
    Metadata addresses stay refused inside any network. ``timeout_s`` bounds the whole fetch with its
    redirects (None: no bound beyond connect and read timeouts); ``read_timeout_s`` is the longest silence.
    """

    allow_hosts: tuple[str, ...] = ("*",)
    allow_networks: tuple[str, ...] = ()
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 5.0
    timeout_s: float | None = 10.0
    max_redirects: int = 3
    max_bytes: int = 64 * 2**20
    max_length: int = 2048
    networks: tuple[IPNetwork, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("allow_hosts", "allow_networks"):
            value = getattr(self, name)
            # A bare string would be iterated as characters: refuse it rather than allow "e", "x", ...
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise TypeError(f"UrlPolicy.{name} must be a sequence of strings, got {value!r}")
            value = tuple(value)
            if not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"UrlPolicy.{name} must hold non-empty strings, got {value!r}")
            object.__setattr__(self, name, value)
        try:
            hosts = tuple(host_pattern(h) for h in self.allow_hosts)
        except ValueError as e:
            raise ValueError(f"UrlPolicy.allow_hosts: {e}") from None
        networks = []
        for net in self.allow_networks:
            try:
                networks.append(ipaddress.ip_network(net.strip(), strict=True))
            except ValueError as e:
                raise ValueError(f"UrlPolicy.allow_networks: {net!r} is not a CIDR network ({e})") from None
        object.__setattr__(self, "allow_hosts", hosts)
        object.__setattr__(self, "allow_networks", tuple(str(n) for n in networks))
        object.__setattr__(self, "networks", tuple(networks))
        for name in ("connect_timeout_s", "read_timeout_s", "timeout_s"):
            value = getattr(self, name)
            if value is None and name == "timeout_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"UrlPolicy.{name} must be a number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name, least in (("max_redirects", 0), ("max_bytes", 1), ("max_length", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"UrlPolicy.{name} must be an int >= {least}, got {value!r}")

    @classmethod
    def of(cls, allow_urls: bool | UrlPolicy | Iterable[str] | None) -> UrlPolicy | None:
        """What ``allow_urls`` arguments mean: False or None, no URLs; True, the default policy (public
        hosts only); a :class:`UrlPolicy`, itself; a sequence of host patterns, the default policy
        narrowed to those hosts."""
        if allow_urls is None or allow_urls is False:
            return None
        if allow_urls is True:
            return _DEFAULT_POLICY
        if isinstance(allow_urls, UrlPolicy):
            return allow_urls
        if isinstance(allow_urls, str) or not isinstance(allow_urls, Iterable):
            raise TypeError("allow_urls must be a bool, a UrlPolicy or a sequence of host patterns, "
                            f"got {allow_urls!r}")
        return cls(allow_hosts=tuple(allow_urls))


_DEFAULT_POLICY = UrlPolicy()


# --- the client ----------------------------------------------------------------------------------------------


class _Failed(Exception):
    """A failure of the origin's doing, raised as UrlFetchError with the URL's context."""


class _SinkFailed(Exception):
    """What the caller's sink raised (a full disk, say), carried past the handlers of network failures."""


class _Body:
    """Where one fetch's body goes, counted against the cap (one per fetch: a fetcher serves many at once)."""

    def __init__(self, sink: Sink, cap: int):
        self.sink = sink
        self.cap = cap
        self.received = 0

    def refuse(self, size: int | None = None) -> PayloadTooLargeError:
        what = "the response body" if size is None else f"the response body ({size} bytes)"
        return PayloadTooLargeError(f"{what} is larger than the {self.cap}-byte cap")

    def take(self, piece: bytes) -> None:
        self.received += len(piece)
        if self.received > self.cap:
            raise self.refuse()
        try:
            self.sink(piece)
        except Exception as e:
            raise _SinkFailed() from e


class _Resolvers:
    """Name resolution in a thread pool of its own (one per process: a pool does not survive fork), so that
    a blocking fetch's event loop never waits at shutdown for a lookup its timeout gave up on. Its threads
    start as lookups need them, up to the service's default number of concurrent fetches."""

    _lock = threading.Lock()
    _pool: concurrent.futures.ThreadPoolExecutor | None = None
    _pid = -1

    @classmethod
    def pool(cls) -> concurrent.futures.ThreadPoolExecutor:
        with cls._lock:
            if cls._pool is None or cls._pid != os.getpid():
                cls._pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="speciesclf-dns")
                cls._pid = os.getpid()
            return cls._pool


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of ``host`` (deduplicated, in the system resolver's order)."""
    infos = await asyncio.get_running_loop().run_in_executor(
        _Resolvers.pool(), lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    return list(dict.fromkeys(info[4][0] for info in infos))


class UrlFetcher:
    """Fetches URLs under a :class:`UrlPolicy`, on the running event loop.

    ``max_concurrent`` bounds the fetches in flight at once through this fetcher (the sockets it may hold).
    ``resolver`` (name, port -> addresses), ``connector`` (``asyncio.open_connection``'s signature) and
    ``ssl_context`` can be replaced, so that tests need neither real DNS nor a public certificate."""

    def __init__(self, policy: UrlPolicy | None = None, *, max_concurrent: int | None = None,
                 resolver: Resolver | None = None, connector: Connector | None = None,
                 ssl_context: ssl.SSLContext | None = None):
        self.policy = policy if policy is not None else _DEFAULT_POLICY
        if not isinstance(self.policy, UrlPolicy):
            raise TypeError(f"policy must be a UrlPolicy, got {type(policy).__name__}")
        self.resolve = resolver or system_resolver
        self.connect = connector or asyncio.open_connection
        self.ssl_context = ssl_context
        self._slots = asyncio.Semaphore(max_concurrent) if max_concurrent else None

    def _tls(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()  # verifies the chain and the hostname
        return self.ssl_context

    async def fetch(self, url: str, *, accept: str = "*/*") -> bytes:
        """The body of ``url`` after redirects. Raises :class:`~speciesclf.UrlNotAllowedError` (refused;
        nothing was connected to), :class:`~speciesclf.UrlFetchError` (allowed, but it failed) or
        :class:`~speciesclf.errors.PayloadTooLargeError` (over ``policy.max_bytes``)."""
        chunks: list[bytes] = []
        await self.fetch_into(url, chunks.append, accept=accept)
        return b"".join(chunks)

    async def fetch_into(self, url: str, sink: Sink, *, accept: str = "*/*") -> int:
        """Like :meth:`fetch`, handing the body to ``sink`` piece by piece; returns its size in bytes. A
        fetch that fails midway may have handed some pieces already: the caller discards them."""
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, got {type(url).__name__}")
        if len(url) > self.policy.max_length:
            raise UrlNotAllowedError(f"the URL is longer than {self.policy.max_length} characters")
        if self._slots is None:
            return await self._bounded(url, sink, accept)
        async with self._slots:
            return await self._bounded(url, sink, accept)

    async def _bounded(self, url: str, sink: Sink, accept: str) -> int:
        limit = self.policy.timeout_s
        try:
            if limit is None:
                return await self._follow(url, sink, accept)
            return await asyncio.wait_for(self._follow(url, sink, accept), limit)
        except (TimeoutError, asyncio.TimeoutError):
            raise UrlFetchError(f"fetching {_shown(url)} timed out after {limit:g} s") from None
        except _Failed as e:
            raise UrlFetchError(f"cannot fetch {_shown(url)}: {e}") from None
        except _SinkFailed as e:
            raise e.__cause__  # noqa: B904 (the sink's own error, as it raised it)

    async def _follow(self, url: str, sink: Sink, accept: str) -> int:
        body = _Body(sink, self.policy.max_bytes)
        previous_scheme = None
        for hop in range(self.policy.max_redirects + 1):
            context = "" if hop == 0 else f"the redirect to {_shown(url)} is refused: "
            scheme, host, port, target, host_header = self._check_url(url, context)
            if previous_scheme == "https" and scheme == "http":
                raise UrlNotAllowedError(f"{context}a redirect from https down to http")
            addresses = await self._vet(host, port, context)
            location = await self._get(scheme, host, addresses, port, target, host_header, body, accept)
            if location is None:
                return body.received
            try:  # relative redirects resolve against the current URL
                url = urljoin(url, location)
            except ValueError as e:  # e.g. "http://[::1" from a hostile origin
                raise UrlNotAllowedError(f"the origin redirected to a malformed URL ({e})") from None
            previous_scheme = scheme
        raise _Failed(f"more than {self.policy.max_redirects} redirects")

    def _check_url(self, url: str, context: str) -> tuple[str, str, int, str, str]:
        def refused(why: str) -> UrlNotAllowedError:
            return UrlNotAllowedError(context + why)

        if any(c in url for c in "\r\n\t\0 "):
            raise refused("whitespace or control characters in the URL")
        try:
            url.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from JSON's \ud800: no URL can carry it
            raise refused("the URL is not valid Unicode (lone surrogate)") from None
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise refused(f"malformed URL ({e})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise refused(f"unsupported URL scheme {scheme or '(none)'!r} (http and https only)")
        if parts.username is not None or parts.password is not None:
            raise refused("credentials in URLs are not allowed")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise refused("the URL has no host")
        try:  # an internationalised name travels (and is matched against the allowlist) in its ASCII form
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise refused(f"host {host!r} is not a valid domain name") from None
        try:  # IP literals compare in canonical form, as the allowlist holds them
            host = str(ipaddress.ip_address(host))
        except ValueError:
            pass
        if not host_allowed(host, self.policy.allow_hosts):
            raise refused(f"host {host!r} is not in the allowed hosts")
        default_port = 443 if scheme == "https" else 80
        port = port or default_port
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Characters outside ASCII go out percent-encoded as UTF-8, as browsers send them.
        target = "".join(c if c < "\x80" else quote(c, safe="") for c in target)
        name = f"[{host}]" if ":" in host else host
        host_header = name if port == default_port else f"{name}:{port}"
        return scheme, host, port, target, host_header

    async def _vet(self, host: str, port: int, context: str) -> list[str]:
        try:
            addresses = [str(ipaddress.ip_address(host))]  # an IP literal: nothing to resolve
            what = "refused address"
        except ValueError:
            try:
                addresses = await self.resolve(host, port)
            except (OSError, UnicodeError) as e:
                raise _Failed(f"cannot resolve {host!r} ({e})") from None
            what = f"{host!r} resolves to a refused address"
        if not addresses:
            raise _Failed(f"{host!r} resolves to no address")
        # Every address must pass: a name that also points inside the network is refused outright.
        for address in addresses:
            reason = address_refusal(address, self.policy.networks)
            if reason is not None:
                raise UrlNotAllowedError(f"{context}{what}: {reason}")
        return addresses

    async def _open(self, scheme: str, host: str, addresses: list[str], port: int, host_header: str):
        """A connection to the first vetted address that answers (each within the connect timeout)."""
        tls = dict(ssl=self._tls(), server_hostname=host) if scheme == "https" else {}
        failure = ""
        for address in addresses:
            try:
                return await asyncio.wait_for(self.connect(address, port, limit=_PIECE, **tls),
                                              self.policy.connect_timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                failure = f"connecting to {host_header} timed out"
            except ssl.SSLError as e:  # the certificate is the name's: another address will not help
                raise _Failed(f"TLS with {host_header} failed ({e.reason or e})") from None
            except OSError as e:
                failure = f"cannot connect to {host_header} ({e.strerror or e})"
        raise _Failed(failure)

    async def _get(self, scheme: str, host: str, addresses: list[str], port: int, target: str,
                   host_header: str, body: _Body, accept: str) -> str | None:
        """Sends the request; returns a redirect's Location, or None once the body went to its sink."""
        reader, writer = await self._open(scheme, host, addresses, port, host_header)
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: speciesclf/{__version__}\r\n"
                         f"Accept: {accept}\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
                         .encode("ascii"))
            await self._io(writer.drain())
            head = await self._io(reader.readuntil(b"\r\n\r\n"))
            status, headers = _parse_head(head)
            if status in _REDIRECTS:
                location = headers.get("location")
                if not location:
                    raise _Failed(f"the origin answered {status} without a Location")
                return location.strip()
            if status != 200:
                raise _Failed(f"the origin answered HTTP {status}")
            await self._body(reader, headers, body)
            return None
        except PayloadTooLargeError:  # a ValueError, but no malformed answer
            raise
        except (TimeoutError, asyncio.TimeoutError):  # before OSError, of which TimeoutError is a subclass
            raise _Failed(f"timed out: {host_header} sent nothing for {self.policy.read_timeout_s:g} s") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as e:
            raise _Failed(f"the connection to {host_header} failed ({type(e).__name__})") from None
        except ValueError as e:  # whatever else a hostile origin's answer trips: its failure, not ours
            raise _Failed(f"{host_header} sent a malformed answer ({e})") from None
        finally:
            writer.close()

    async def _io(self, awaitable: Awaitable[T]) -> T:
        return await asyncio.wait_for(awaitable, self.policy.read_timeout_s)

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str], body: _Body) -> None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                line = await self._io(reader.readuntil(b"\r\n"))
                size_field = line.split(b";", 1)[0].strip()
                if not _HEX.fullmatch(size_field):  # int(..., 16) would also take a sign, "0x" and underscores
                    raise _Failed("malformed chunked encoding")
                size = int(size_field, 16)
                if size == 0:
                    return
                if body.received + size > body.cap:  # refused before reading it
                    raise body.refuse()
                await self._exactly(reader, size, body)
                await self._io(reader.readexactly(2))
        length = headers.get("content-length")
        if length is not None:
            if not _DIGITS.fullmatch(length):
                raise _Failed(f"bad Content-Length {length[:40]!r}")
            if int(length) > body.cap:  # refused before reading a byte of it
                raise body.refuse(int(length))
            await self._exactly(reader, int(length), body)
            return
        while piece := await self._io(reader.read(_PIECE)):  # no length: read until the origin closes
            body.take(piece)

    async def _exactly(self, reader: asyncio.StreamReader, size: int, body: _Body) -> None:
        """``size`` bytes, piece by piece: the read timeout bounds each silence, not the whole transfer."""
        while size > 0:
            piece = await self._io(reader.read(min(size, _PIECE)))
            if not piece:
                raise _Failed(f"the body ended {size} bytes short of its declared length")
            size -= len(piece)
            body.take(piece)


# ASCII only: str.isdigit() and int() also take other scripts' digits ("²", "٣"), and int(x, 16) a sign.
_DIGITS = re.compile(r"[0-9]{1,18}")
_STATUS = re.compile(r"[0-9]{3}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not _STATUS.fullmatch(parts[1]):
        raise _Failed(f"not an HTTP response ({lines[0][:60]!r})")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _shown(url: str) -> str:
    return repr(url if len(url) <= 200 else url[:200] + "...")


# --- blocking calls --------------------------------------------------------------------------------------------


def _run(make: Callable[[], Awaitable[T]]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    # This thread runs an event loop (a notebook cell, an async app calling the sync API): it cannot run a
    # second one, and the caller asked to block, so the fetch runs on its own loop in a helper thread.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="speciesclf-fetch") as helper:
        return helper.submit(lambda: asyncio.run(make())).result()


def fetch_bytes(url: str, policy: UrlPolicy | None = None, *, accept: str = "*/*") -> bytes:
    """The body of ``url`` under ``policy`` (default: public hosts only), blocking. See :meth:`UrlFetcher.fetch`."""
    return _run(lambda: UrlFetcher(policy).fetch(url, accept=accept))


def fetch_into(url: str, sink: Sink, policy: UrlPolicy | None = None, *, accept: str = "*/*") -> int:
    """Streams the body of ``url`` into ``sink`` under ``policy``, blocking; returns its size in bytes."""
    return _run(lambda: UrlFetcher(policy).fetch_into(url, sink, accept=accept))
