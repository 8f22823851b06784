"""speciesclf.sources.fetch, the one URL fetcher (Classifier URL inputs, the service's {"url": ...}, the weights
download): the address checks, the policy, the asyncio client (resolver and connector injected, so no real
DNS), the blocking calls, and Classifier.predict(url) against a local origin on 127.0.0.1.

Nothing here reaches the network: addresses the fetcher must refuse are never connected to (a spy on
socket.connect proves it), and what it may fetch is served on loopback, allowed explicitly by the policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
import socket
import ssl
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import speciesclf
from speciesclf.errors import ImageError, PayloadTooLargeError, UrlFetchError, UrlNotAllowedError
from speciesclf.sources.fetch import UrlFetcher, UrlPolicy, address_refusal, fetch_bytes, host_allowed
from url_origin import FakeDNS, Origin, certificate, jpeg, record_connects

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = UrlPolicy(allow_networks=("127.0.0.1/32",))


@pytest.fixture
def connects(monkeypatch) -> list[str]:
    return record_connects(monkeypatch)


# --- the address checks (pure) --------------------------------------------------------------------------------

LOOPBACK_ONLY = [ipaddress.ip_network("127.0.0.1/32")]


@pytest.mark.parametrize("address, allowed", [
    # public
    ("93.184.215.14", True), ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("1.1.1.1", True),
    # loopback, private, link-local, unspecified, multicast, reserved, shared, documentation
    ("127.0.0.1", False), ("127.255.255.254", False), ("10.0.0.1", False), ("172.16.5.4", False),
    ("192.168.1.1", False), ("169.254.1.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("239.255.255.250", False), ("240.0.0.1", False), ("255.255.255.255", False), ("100.64.0.1", False),
    ("192.0.2.1", False), ("198.18.0.1", False),
    # cloud metadata
    ("169.254.169.254", False), ("169.254.170.2", False), ("100.100.100.200", False), ("fd00:ec2::254", False),
    # IPv6 forms
    ("::1", False), ("::", False), ("fe80::1", False), ("fe80::1%eth0", False), ("fc00::1", False),
    ("fd12:3456::1", False), ("ff02::1", False), ("fec0::1", False), ("2001:db8::1", False),
    # IPv4 inside IPv6: mapped, compatible, 6to4, NAT64, Teredo
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("::ffff:10.1.2.3", False),
    ("::ffff:7f00:1", False), ("::ffff:8.8.8.8", True), ("::127.0.0.1", False), ("2002:a9fe:a9fe::1", False),
    ("2002:0a00:0001::1", False), ("64:ff9b::a9fe:a9fe", False), ("64:ff9b::7f00:1", False),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
    ("not an address", False), ("", False),
])
def test_address_refusal_by_default(address: str, allowed: bool) -> None:
    reason = address_refusal(address)
    assert (reason is None) == allowed, reason


@pytest.mark.parametrize("address, allowed", [
    ("127.0.0.1", True), ("::ffff:127.0.0.1", True),  # the same address, spelled as IPv4-mapped IPv6
    ("127.0.0.2", False), ("::1", False), ("10.0.0.1", False), ("169.254.169.254", False),
    ("fd00:ec2::254", False), ("8.8.8.8", True),
])
def test_address_refusal_with_an_allowed_network(address: str, allowed: bool) -> None:
    assert (address_refusal(address, LOOPBACK_ONLY) is None) == allowed


def test_metadata_addresses_stay_refused_inside_allowed_networks() -> None:
    everything = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    assert address_refusal("10.0.0.1", everything) is None  # the operator asked for it
    for metadata in ("169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254", "100.100.100.200"):
        assert "metadata" in address_refusal(metadata, everything)


@pytest.mark.parametrize("host, patterns, allowed", [
    ("images.example.com", ("images.example.com",), True),
    ("images.example.com", ("*.example.com",), True),
    ("example.com", ("*.example.com",), False),
    ("evil-example.com", ("*.example.com",), False),
    ("images.example.com.evil.net", ("*.example.com",), False),
    ("anything.net", ("*",), True),
    ("other.com", ("images.example.com",), False),
    ("127.0.0.1", ("127.0.0.1",), True),
])
def test_host_allowlist(host: str, patterns: tuple, allowed: bool) -> None:
    assert host_allowed(host, patterns) is allowed


# --- the policy ------------------------------------------------------------------------------------------------


def test_what_allow_urls_means() -> None:
    assert UrlPolicy.of(False) is None and UrlPolicy.of(None) is None
    public = UrlPolicy.of(True)
    assert public.allow_hosts == ("*",) and public.allow_networks == ()  # public addresses only
    assert UrlPolicy.of(LOOPBACK) is LOOPBACK
    narrowed = UrlPolicy.of(["Images.Example.com", "*.bücher.example"])
    assert narrowed.allow_hosts == ("images.example.com", "*.xn--bcher-kva.example")
    with pytest.raises(TypeError):
        UrlPolicy.of("images.example.com")  # one string, not a list of hosts
    with pytest.raises(TypeError):
        UrlPolicy.of(1)


@pytest.mark.parametrize("kwargs", [
    {"allow_hosts": "example.com"}, {"allow_hosts": ("http://example.com/",)}, {"allow_hosts": ("a*.com",)},
    {"allow_hosts": ("",)}, {"allow_networks": ("10.0.0.1/8",)}, {"allow_networks": ("not-a-net",)},
    {"timeout_s": 0}, {"read_timeout_s": -1}, {"connect_timeout_s": True}, {"max_redirects": -1},
    {"max_bytes": 0}, {"max_length": 0},
])
def test_policies_are_validated_up_front(kwargs) -> None:
    with pytest.raises((TypeError, ValueError), match="UrlPolicy"):
        UrlPolicy(**kwargs)


# --- the client, with an injected resolver and connector -------------------------------------------------------


def policy(**kw) -> UrlPolicy:
    return UrlPolicy(**{**dict(read_timeout_s=1.0, timeout_s=3.0), **kw})


def fetch(fetcher: UrlFetcher, url: str) -> bytes:
    return asyncio.run(fetcher.fetch(url))


def refused(fetcher: UrlFetcher, url: str, error: type[ImageError] = UrlNotAllowedError) -> ImageError:
    with pytest.raises(error) as e:
        fetch(fetcher, url)
    return e.value


def test_a_name_resolving_to_a_private_address_is_refused_without_connecting() -> None:
    image = jpeg()
    with Origin(image) as origin:
        dns = FakeDNS({"intranet.example": ["10.1.2.3"], "mixed.example": ["93.184.215.14", "127.0.0.1"],
                       "meta.example": ["169.254.169.254"], "v6meta.example": ["::ffff:169.254.169.254"],
                       "public.example": ["93.184.215.14"]}, origin.port)
        fetcher = UrlFetcher(policy(), resolver=dns.resolve, connector=dns.connect)
        for host in ("intranet.example", "mixed.example", "meta.example", "v6meta.example"):
            assert "refused address" in str(refused(fetcher, f"http://{host}/cat.jpg"))
        assert dns.connects == []  # nothing was ever connected to
        # the same fetcher fetches a name that resolves to a public address, connecting to that address
        assert fetch(fetcher, "http://public.example/cat.jpg") == image
        assert dns.connects == [("93.184.215.14", 80, None)]
        assert origin.hosts[-1] == "public.example"  # the Host header names the host, not the address


def test_the_vetted_address_is_the_one_connected_to_so_rebinding_cannot_swap_it() -> None:
    image = jpeg()
    with Origin(image) as origin:
        # first answer public, any later one private: a resolver that is asked twice would connect inside
        dns = FakeDNS({"rebind.example": [["93.184.215.14"], ["127.0.0.1"], ["127.0.0.1"]]}, origin.port)
        fetcher = UrlFetcher(policy(), resolver=dns.resolve, connector=dns.connect)
        assert fetch(fetcher, "http://rebind.example:8080/cat.jpg") == image
        assert dns.lookups == ["rebind.example"] and dns.connects == [("93.184.215.14", 8080, None)]
        assert origin.hosts[-1] == "rebind.example:8080"


def test_each_vetted_address_is_tried_in_turn() -> None:
    # A name with an IPv6 and an IPv4 address, on a host without IPv6 routes: the second one answers.
    image = jpeg()
    with Origin(image) as origin:
        dns = FakeDNS({"dual.example": ["2606:4700:4700::1111", "93.184.215.14"]}, origin.port)

        async def connect(address: str, port: int, **kw):
            if ":" in address:
                dns.connects.append((address, port, None))
                raise OSError(101, "Network is unreachable")
            return await dns.connect(address, port, **kw)

        fetcher = UrlFetcher(policy(), resolver=dns.resolve, connector=connect)
        assert fetch(fetcher, "http://dual.example/cat.jpg") == image
        assert [c[0] for c in dns.connects] == ["2606:4700:4700::1111", "93.184.215.14"]


def test_non_ascii_urls_are_sent_encoded_not_failed() -> None:
    # An IDN host goes out in its ASCII (punycode) form, a non-ASCII path percent-encoded as UTF-8; a host
    # that is no valid domain name is refused.
    with Origin(jpeg()) as origin:
        dns = FakeDNS({"xn--exmple-cua.example": ["93.184.215.14"]}, origin.port)
        fetcher = UrlFetcher(policy(), resolver=dns.resolve, connector=dns.connect)
        assert "404" in str(refused(fetcher, "http://exämple.example/chat-noir-é.jpg?q=ü", UrlFetchError))
        assert origin.hosts[-1] == "xn--exmple-cua.example"
        assert origin.paths[-1] == "/chat-noir-%C3%A9.jpg?q=%C3%BC"
        refused(fetcher, "http://bad..example/cat.jpg")


def test_every_redirect_is_checked_again() -> None:
    image = jpeg()
    with Origin(image) as origin:
        dns = FakeDNS({"a.example": ["93.184.215.14"], "b.example": ["10.0.0.5"], "c.example": ["8.8.8.8"]},
                      origin.port)
        fetcher = UrlFetcher(policy(allow_hosts=("a.example", "b.example")), resolver=dns.resolve,
                             connector=dns.connect)
        e = str(refused(fetcher, "http://a.example/redirect?to=" + quote("http://b.example/cat.jpg")))
        assert "redirect" in e and "b.example" in e and "refused address" in e
        e = str(refused(fetcher, "http://a.example/redirect?to=" + quote("http://c.example/cat.jpg")))
        assert "redirect" in e and "allowed hosts" in e
        e = str(refused(fetcher, "http://a.example/redirect?to=" + quote("file:///etc/passwd")))
        assert "redirect" in e and "scheme" in e
        assert [c[0] for c in dns.connects] == ["93.184.215.14"] * 3  # never past the first hop
        assert fetch(fetcher, "http://a.example/redirect?to=/cat.jpg") == image  # relative, same host


def _tls_pair(tmp_path: Path, hostname: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    pytest.importorskip("cryptography")
    cert, key = certificate(hostname)
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return server_tls, ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))


def test_https_checks_the_certificate_against_the_host_name_while_connecting_to_the_address(tmp_path) -> None:
    server_tls, client_tls = _tls_pair(tmp_path, "images.example")
    image = jpeg()
    with Origin(image, tls=server_tls) as origin:
        dns = FakeDNS({"images.example": ["93.184.215.14"], "other.example": ["93.184.215.14"]}, origin.port)
        fetcher = UrlFetcher(policy(), resolver=dns.resolve, connector=dns.connect, ssl_context=client_tls)
        assert fetch(fetcher, "https://images.example/cat.jpg") == image
        assert dns.connects == [("93.184.215.14", 443, "images.example")]  # SNI is the name
        # the certificate is not for this name
        assert "TLS" in str(refused(fetcher, "https://other.example/cat.jpg", UrlFetchError))


def test_a_redirect_from_https_down_to_http_is_refused(tmp_path) -> None:
    server_tls, client_tls = _tls_pair(tmp_path, "images.example")
    with Origin(jpeg(), tls=server_tls) as origin:
        dns = FakeDNS({"images.example": ["93.184.215.14"]}, origin.port)
        fetcher = UrlFetcher(policy(), resolver=dns.resolve, connector=dns.connect, ssl_context=client_tls)
        down = "https://images.example/redirect?to=" + quote("http://images.example/cat.jpg")
        assert "https down to http" in str(refused(fetcher, down))
        assert len(dns.connects) == 1  # the http URL was never connected to


def test_an_unresolvable_name_is_a_fetch_failure() -> None:
    async def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    refused(UrlFetcher(policy(), resolver=nxdomain), "http://nowhere.example/cat.jpg", UrlFetchError)


def test_the_read_timeout_bounds_each_silence_not_the_whole_body() -> None:
    # /drip sends a byte every 0.1 s: 12 bytes take over a second, never silent for the 0.35 s read timeout.
    with Origin(b"twelve bytes") as origin:
        fetcher = UrlFetcher(policy(allow_networks=("127.0.0.1/32",), read_timeout_s=0.35, timeout_s=5.0))
        assert fetch(fetcher, f"{origin.base}/drip") == b"twelve bytes"


@pytest.mark.parametrize("path", ["big", "big-chunked", "huge-length"])
def test_the_size_cap_stops_the_body(path: str) -> None:
    with Origin(jpeg()) as origin:
        fetcher = UrlFetcher(policy(allow_networks=("127.0.0.1/32",), max_bytes=2**20))
        refused(fetcher, f"{origin.base}/{path}", PayloadTooLargeError)


def test_one_fetcher_serves_concurrent_fetches_each_with_its_own_body() -> None:
    image = jpeg()
    with Origin(image) as origin:
        fetcher = UrlFetcher(policy(allow_networks=("127.0.0.1/32",)), max_concurrent=2)

        async def many() -> list:
            return await asyncio.gather(*(fetcher.fetch(f"{origin.base}/{p}")
                                          for p in ["cat.jpg", "chunked.jpg", "nolength.jpg"] * 3))

        assert asyncio.run(many()) == [image] * 9


class _NotFoundOrigin:
    """A connector whose every connection answers 404: for fuzzing what a URL can do before the fetch."""

    class _Writer:
        def write(self, data: bytes) -> None:
            assert data.isascii()  # whatever the URL, what goes on the wire is ASCII

        async def drain(self) -> None:
            pass

        def close(self) -> None:
            pass

    async def connect(self, address: str, port: int, **kw):
        reader = asyncio.StreamReader()
        reader.feed_data(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        reader.feed_eof()
        return reader, self._Writer()

    async def resolve(self, host: str, port: int) -> list[str]:
        return ["93.184.215.14"]


@settings(max_examples=300, deadline=None)
@given(url=st.one_of(
    st.text(max_size=80),
    st.builds(lambda scheme, host, rest: f"{scheme}://{host}{rest}",
              st.sampled_from(["http", "https", "HTTP", "ftp", "file", "", "javascript"]),
              st.text(max_size=30), st.text(max_size=40)),
))
def test_any_url_string_ends_in_a_typed_url_error_never_another_exception(url: str) -> None:
    origin = _NotFoundOrigin()
    fetcher = UrlFetcher(policy(), resolver=origin.resolve, connector=origin.connect)
    with pytest.raises((UrlNotAllowedError, UrlFetchError)):
        asyncio.run(fetcher.fetch(url))


# --- the blocking calls ------------------------------------------------------------------------------------------


def test_fetch_bytes_refuses_loopback_unless_the_policy_allows_it(connects) -> None:
    image = jpeg()
    with Origin(image) as origin:
        with pytest.raises(UrlNotAllowedError, match="loopback"):
            fetch_bytes(f"{origin.base}/cat.jpg")
        assert connects == [] and origin.paths == []
        assert fetch_bytes(f"{origin.base}/cat.jpg", LOOPBACK) == image


def test_fetch_bytes_works_inside_a_running_event_loop() -> None:
    # A notebook cell runs inside an event loop: the blocking call must still work there.
    image = jpeg()
    with Origin(image) as origin:
        async def cell() -> bytes:
            return fetch_bytes(f"{origin.base}/cat.jpg", LOOPBACK)

        assert asyncio.run(cell()) == image


def test_fetch_bytes_from_many_threads() -> None:
    image = jpeg()
    with Origin(image) as origin:
        results: list[bytes] = []
        threads = [threading.Thread(target=lambda: results.append(fetch_bytes(f"{origin.base}/cat.jpg", LOOPBACK)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [image] * 6


# --- Classifier.predict(url) ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def origin(one_photo):
    with Origin(one_photo) as o:
        yield o


@pytest.mark.shared
def test_predict_refuses_loopback_private_and_metadata_urls_without_connecting(species100, origin, connects,
                                                                                monkeypatch) -> None:
    monkeypatch.setattr(species100, "allow_urls", True)  # public hosts only
    origin.paths.clear()
    port = origin.port
    urls = [f"{origin.base}/cat.jpg", "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            f"http://localhost:{port}/cat.jpg", f"http://[::1]:{port}/cat.jpg", "http://10.0.0.1/cat.jpg",
            "http://[::ffff:169.254.169.254]/", "http://0.0.0.0/", f"http://127.0.0.2:{port}/cat.jpg"]
    predictions = species100.predict_batch(urls)
    for url, p in zip(urls, predictions):
        assert isinstance(p.error, speciesclf.UrlNotAllowedError), (url, p.error)
        assert p.to_dict()["error"]["code"] == "url_not_allowed"
    assert connects == [] and origin.paths == []  # nothing was connected to, nothing was asked of the origin


@pytest.mark.shared
def test_predict_refuses_a_redirect_to_a_private_address(species100, origin, connects, monkeypatch) -> None:
    monkeypatch.setattr(species100, "allow_urls", LOOPBACK)  # the origin itself is allowed
    targets = ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/cat.jpg",
               f"http://127.0.0.2:{origin.port}/cat.jpg", "http://[::1]/cat.jpg"]
    for target in targets:
        p = species100.predict(f"{origin.base}/redirect?to={quote(target, safe='')}")
        assert isinstance(p.error, speciesclf.UrlNotAllowedError) and "redirect" in str(p.error), p.error
    assert set(connects) == {"127.0.0.1"}  # only the allowed origin, once per URL
    assert len(connects) == len(targets)


@pytest.mark.shared
def test_predict_fetches_loopback_only_when_the_policy_allows_it(species100, origin, one_photo,
                                                                 monkeypatch) -> None:
    url = f"{origin.base}/cat.jpg"
    expected = species100.predict(one_photo)
    monkeypatch.setattr(species100, "allow_urls", LOOPBACK)
    fetched = species100.predict(url)
    assert fetched.ok and (fetched.guess, fetched.index) == (expected.guess, expected.index)
    for narrowed in (["images.example.com"], UrlPolicy(allow_hosts=("images.example.com",),
                                                       allow_networks=("127.0.0.1/32",))):
        monkeypatch.setattr(species100, "allow_urls", narrowed)
        assert "allowed hosts" in str(species100.predict(url).error)
    monkeypatch.setattr(species100, "allow_urls", False)
    off = species100.predict(url).error
    assert isinstance(off, speciesclf.UrlNotAllowedError) and "allow_urls" in str(off)


@pytest.mark.shared
def test_predict_url_from_inside_a_running_event_loop(species100, origin, monkeypatch) -> None:
    monkeypatch.setattr(species100, "allow_urls", LOOPBACK)

    async def notebook_cell():
        return species100.predict(f"{origin.base}/cat.jpg")

    assert asyncio.run(notebook_cell()).ok


@pytest.mark.shared
def test_url_failures_are_typed_and_coded(species100, origin, monkeypatch) -> None:
    monkeypatch.setattr(species100, "allow_urls", dataclasses.replace(LOOPBACK, max_bytes=2**20))
    cases = {"missing": (UrlFetchError, "url_fetch_failed"), "500": (UrlFetchError, "url_fetch_failed"),
             "big": (PayloadTooLargeError, "image_too_large"),
             "text": (speciesclf.UnsupportedFormatError, "unsupported_format")}
    for path, (error, code) in cases.items():
        p = species100.predict(f"{origin.base}/{path}")
        assert isinstance(p.error, error) and p.to_dict()["error"]["code"] == code, (path, p.error)


# --- one implementation each -------------------------------------------------------------------------------------

_PACKAGE = REPO / "python" / "speciesclf"
# what: (pattern, the files allowed to hold it). Image sizes are read by the native probe (or Pillow, for
# the formats it decodes) through decoding.image_size; byte-level format facts (chunks, markers, EXIF) live
# in _formats.py, the Python twin of the native core, and nowhere else.
_ONE_PLACE = {
    # Two clients of two concerns: images from allowed addresses (fetch.py), and the admin API of a service
    # its operator names, with a bearer token (admin_client.py).
    "an HTTP client": (r"urllib\.request|http\.client|open_connection|getaddrinfo|import (requests|httpx|aiohttp)",
                       {"sources/fetch.py", "serve/admin_client.py"}),
    "a base64 decoder": (r"b64decode|a2b_base64|base64\.decode", {"sources/sources.py"}),
    "a JPEG marker walker": (r"jpeg_markers|0xC0 <=|0xC4, 0xC8", {"preprocessing/_formats.py"}),
    "a header reader": (r"IHDR|VP8|unpack_from\(\"[<>](HH|II|ii)\"", {"preprocessing/_formats.py"}),
}


@pytest.mark.parametrize("what", sorted(_ONE_PLACE))
def test_one_implementation_each(what: str) -> None:
    pattern, homes = _ONE_PLACE[what]
    holders = {str(path.relative_to(_PACKAGE)) for path in _PACKAGE.rglob("*.py")
               if re.search(pattern, path.read_text(encoding="utf-8"))}
    assert holders <= homes, f"{what} in {sorted(holders - homes)}"
    assert not homes or holders, f"{what}: its one implementation is gone from {homes}"
