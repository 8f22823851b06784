"""URL inputs: a small asyncio HTTP/1.1 client that refuses to be used for server-side request forgery.

Every hop (the URL and each redirect) is checked in the same order: scheme (http/https), host allowlist,
DNS resolution, then every resolved address against :func:`address_refusal`. The connection is opened to
the vetted address itself, never to the name, so a DNS answer that changes between the check and the
connect (rebinding) cannot redirect it; the Host header and the TLS SNI/certificate check still use the
name. Everything runs on the event loop (name resolution in the loop's executor), bounded by connect,
read and overall timeouts, a redirect limit and a size limit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from ._images import ApiError

__all__ = ["UrlFetcher", "address_refusal", "host_allowed", "METADATA_ADDRESSES"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]
Connector = Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

# Cloud instance-metadata endpoints: refused even inside an operator's url_allow_networks, because
# allowing e.g. 169.254.0.0/16 for a link-local image store must not expose the instance's credentials.
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
    """Why ``address`` must not be fetched from, or None when it may. Pure: no I/O.

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
    nets = list(allow_networks)
    if any(ip.version == net.version and ip in net for net in nets):
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


async def _system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class _Failed(Exception):
    """A fetch failure that is the origin's doing (answered 400 url_fetch_failed)."""


class UrlFetcher:
    """Fetches an image URL under a :class:`~speciesclf.serve.ServeConfig`'s ``url_*`` settings.

    ``resolver`` (name, port -> addresses), ``connector`` (``asyncio.open_connection``'s signature) and
    ``ssl_context`` can be replaced, so that tests need neither real DNS nor a public certificate."""

    def __init__(self, config: Any, *, resolver: Resolver | None = None, connector: Connector | None = None,
                 ssl_context: ssl.SSLContext | None = None):
        self.config = config
        self.allow_hosts = tuple(h.lower() for h in config.url_allow_hosts)
        self.allow_networks = tuple(ipaddress.ip_network(n, strict=False) for n in config.url_allow_networks)
        self.resolve = resolver or _system_resolver
        self.connect = connector or asyncio.open_connection
        self.ssl_context = ssl_context
        # Bounds the sockets URL inputs may hold at once, whatever the number of requests.
        self._slots = asyncio.Semaphore(config.url_max_concurrent)

    def _tls(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()  # verifies the chain and the hostname
        return self.ssl_context

    async def fetch(self, url: Any, timeout_s: float, field: str = "url") -> bytes:
        """The body of ``url`` (after redirects), or :class:`ApiError`: ``url_not_allowed`` (400),
        ``url_fetch_failed`` (400), ``image_too_large`` (413), or ``deadline_exceeded`` (503) when
        ``timeout_s`` (what is left of the request's deadline) ran out before ``url_timeout_s`` did."""
        if not isinstance(url, str) or not url:
            raise ApiError(422, "invalid_request", f"{field} must be a non-empty string")
        if len(url) > self.config.url_max_length:
            raise ApiError(400, "url_not_allowed", f"{field}: longer than {self.config.url_max_length} characters")
        budget = min(timeout_s, self.config.url_timeout_s)
        try:
            async with asyncio.timeout(max(budget, 0.0)):
                async with self._slots:
                    return await self._follow(url, field)
        except TimeoutError:
            if timeout_s < self.config.url_timeout_s:  # the client's deadline, not the fetch limit, ran out
                raise ApiError(503, "deadline_exceeded",
                               f"{field}: the request's deadline passed while fetching the URL") from None
            raise ApiError(400, "url_fetch_failed", f"{field}: fetching the URL took longer than {budget:g} s") from None
        except _Failed as e:
            raise ApiError(400, "url_fetch_failed", f"{field}: {e}") from None

    async def _follow(self, url: str, field: str) -> bytes:
        for hop in range(self.config.url_max_redirects + 1):
            scheme, host, port, target, host_header = self._check_url(url, field)
            address = await self._vet(host, port, field)
            status, location, body = await self._get(scheme, host, address, port, target, host_header, field)
            if location is None:
                return body
            try:  # relative redirects resolve against the current URL
                url = urljoin(url, location)
            except ValueError as e:  # e.g. "http://[::1" from a hostile origin
                raise ApiError(400, "url_not_allowed", f"{field}: the origin redirected to a malformed URL ({e})") from None
        raise _Failed(f"more than {self.config.url_max_redirects} redirects")

    def _check_url(self, url: str, field: str) -> tuple[str, str, int, str, str]:
        refused = lambda why: ApiError(400, "url_not_allowed", f"{field}: {why}")  # noqa: E731
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
            raise refused(f"scheme {scheme or '(none)'!r} is not allowed (http and https only)")
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
        if not host_allowed(host, self.allow_hosts):
            raise refused(f"host {host!r} is not in url_allow_hosts")
        port = port or (443 if scheme == "https" else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Characters outside ASCII go out percent-encoded as UTF-8, as browsers send them.
        target = "".join(c if c < "\x80" else quote(c, safe="") for c in target)
        name = f"[{host}]" if ":" in host else host
        host_header = name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"
        return scheme, host, port, target, host_header

    async def _vet(self, host: str, port: int, field: str) -> str:
        try:
            addresses = [str(ipaddress.ip_address(host))]  # an IP literal: nothing to resolve
        except ValueError:
            try:
                addresses = await self.resolve(host, port)
            except (OSError, UnicodeError) as e:
                raise _Failed(f"cannot resolve {host!r} ({e})") from None
        if not addresses:
            raise _Failed(f"{host!r} resolves to no address")
        # Every address must pass: a name that also points inside the network is refused outright.
        for address in addresses:
            reason = address_refusal(address, self.allow_networks)
            if reason is not None:
                raise ApiError(400, "url_not_allowed", f"{field}: {host!r} resolves to a refused address: {reason}")
        return addresses[0]

    async def _get(self, scheme: str, host: str, address: str, port: int, target: str, host_header: str,
                   field: str) -> tuple[int, str | None, bytes]:
        tls = dict(ssl=self._tls(), server_hostname=host) if scheme == "https" else {}
        try:
            reader, writer = await asyncio.wait_for(
                self.connect(address, port, limit=2**16, **tls), self.config.url_connect_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise _Failed(f"connecting to {host_header} timed out") from None
        except ssl.SSLError as e:
            raise _Failed(f"TLS with {host_header} failed ({e.reason or e})") from None
        except OSError as e:
            raise _Failed(f"cannot connect to {host_header} ({e.strerror or e})") from None
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: speciesclf\r\n"
                         "Accept: image/*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n".encode("ascii"))
            await self._io(writer.drain())
            head = await self._io(reader.readuntil(b"\r\n\r\n"))
            status, headers = _parse_head(head)
            if status in _REDIRECTS:
                location = headers.get("location")
                if not location:
                    raise _Failed(f"the origin answered {status} without a Location")
                return status, location.strip(), b""
            if status != 200:
                raise _Failed(f"the origin answered HTTP {status}")
            return status, None, await self._body(reader, headers, field)
        except (TimeoutError, asyncio.TimeoutError):  # before OSError, of which TimeoutError is a subclass
            raise _Failed(f"{host_header} sent nothing for {self.config.url_read_timeout_s:g} s") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as e:
            raise _Failed(f"the connection to {host_header} failed ({type(e).__name__})") from None
        except ValueError as e:  # whatever else a hostile origin's answer trips: its failure, not ours
            raise _Failed(f"{host_header} sent a malformed answer ({e})") from None
        finally:
            writer.close()

    async def _io(self, awaitable: Awaitable[Any]) -> Any:
        return await asyncio.wait_for(awaitable, self.config.url_read_timeout_s)

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str], field: str) -> bytes:
        cap = self.config.url_max_bytes
        too_large = ApiError(413, "image_too_large", f"{field}: the URL's body is larger than url_max_bytes={cap}")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await self._chunked(reader, cap, too_large)
        length = headers.get("content-length")
        if length is not None:
            if not _DIGITS.fullmatch(length):
                raise _Failed(f"bad Content-Length {length[:40]!r}")
            if int(length) > cap:  # refused before reading a byte of it
                raise too_large
            return await self._io(reader.readexactly(int(length)))
        chunks, size = [], 0
        while True:  # no length: read until the origin closes, stopping at the cap
            chunk = await self._io(reader.read(2**16))
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > cap:
                raise too_large
            chunks.append(chunk)

    async def _chunked(self, reader: asyncio.StreamReader, cap: int, too_large: ApiError) -> bytes:
        chunks, size = [], 0
        while True:
            line = await self._io(reader.readuntil(b"\r\n"))
            size_field = line.split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size_field):  # int(..., 16) would also take a sign, "0x" and underscores
                raise _Failed("malformed chunked encoding")
            n = int(size_field, 16)
            if n == 0:
                return b"".join(chunks)
            size += n
            if size > cap:
                raise too_large
            chunks.append(await self._io(reader.readexactly(n)))
            await self._io(reader.readexactly(2))


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
