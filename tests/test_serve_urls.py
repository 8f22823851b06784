"""URL inputs of the HTTP service: the address checks, the fetcher (resolver and connector injected, so no
real DNS), and the live server fetching from a local origin server on 127.0.0.1 that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime
import io
import ipaddress
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from speciesclf.serve import ServeConfig  # noqa: E402
from speciesclf.serve._fetch import UrlFetcher, address_refusal, host_allowed  # noqa: E402
from speciesclf.serve._images import ApiError  # noqa: E402


def jpeg(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 140, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


# --- a local origin that misbehaves on purpose --------------------------------------------------------------


class Origin:
    """A threaded HTTP/1.1 server on 127.0.0.1 (optionally TLS) serving ``image`` and the failure modes."""

    def __init__(self, image: bytes, tls: ssl.SSLContext | None = None):
        self.image = image
        self.hosts: list[str] = []  # the Host header of every request
        self.paths: list[str] = []  # the request target of every request, as sent
        self.stop = threading.Event()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {"Content-Length": str(len(body))}).items():
                    self.send_header(k, v)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 (http.server's naming)
                origin.hosts.append(self.headers.get("Host", ""))
                origin.paths.append(self.path)
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                path = url.path
                try:
                    self.route(path, query)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the fetcher hung up on purpose (size cap, timeout)

            def route(self, path: str, query: dict) -> None:
                image = origin.image
                if path == "/cat.jpg":
                    self.send(200, image, {"Content-Length": str(len(image)), "Content-Type": "image/jpeg"})
                elif path == "/chunked.jpg":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for i in range(0, len(image), 1000):
                        piece = image[i:i + 1000]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                elif path == "/nolength.jpg":
                    self.send(200, image, {})
                elif path == "/redirect":
                    self.send(302, b"", {"Location": query["to"][0], "Content-Length": "0"})
                elif path == "/loop":
                    self.send(302, b"", {"Location": "/loop", "Content-Length": "0"})
                elif path.startswith("/chain/"):
                    n = int(path.rsplit("/", 1)[1])
                    location = "/cat.jpg" if n <= 1 else f"/chain/{n - 1}"
                    self.send(301, b"", {"Location": location, "Content-Length": "0"})
                elif path == "/no-location":
                    self.send(302, b"", {"Content-Length": "0"})
                elif path == "/big":  # no Content-Length: the cap must stop the stream
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(image[:4])
                    for _ in range(64):
                        self.wfile.write(bytes(2**16))
                elif path == "/big-chunked":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for _ in range(64):
                        self.wfile.write(b"10000\r\n" + bytes(2**16) + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                elif path == "/huge-length":  # declares 1 TB, then stalls: must be refused from the header
                    self.send_response(200)
                    self.send_header("Content-Length", str(10**12))
                    self.end_headers()
                    self.wfile.flush()
                    origin.stop.wait(5)
                elif path == "/slow-start":  # headers, then silence longer than the read timeout
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    self.wfile.flush()
                    origin.stop.wait(5)
                elif path == "/drip":  # a byte at a time, never silent long enough for the read timeout
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    for b in image:
                        if origin.stop.wait(0.1):
                            return
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                elif path == "/text":
                    self.send(200, b"hello, not an image", {"Content-Length": "19", "Content-Type": "image/jpeg"})
                elif path == "/500":
                    self.send(500, b"oops")
                else:
                    self.send(404, b"not found")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Origin:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


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


@pytest.mark.parametrize("kwargs", [
    {"url_inputs": True}, {"url_inputs": 1, "url_allow_hosts": ("a.com",)},
    {"url_allow_hosts": "example.com"}, {"url_allow_hosts": ("http://example.com/",)},
    {"url_allow_hosts": ("a*.com",)}, {"url_allow_networks": ("10.0.0.1/8",)},
    {"url_allow_networks": ("not-a-net",)}, {"url_timeout_s": 0}, {"url_read_timeout_s": -1},
    {"url_max_redirects": -1}, {"url_max_bytes": 0}, {"url_max_concurrent": 0},
])
def test_url_settings_are_validated_up_front(kwargs) -> None:
    with pytest.raises(ValueError, match="ServeConfig.url_"):
        ServeConfig(**kwargs)


def test_url_inputs_are_off_by_default() -> None:
    c = ServeConfig()
    assert c.url_inputs is False and c.url_allow_hosts == () and c.url_allow_networks == ()


# --- the fetcher, with an injected resolver and connector ---------------------------------------------------


def config(**kw) -> ServeConfig:
    base = dict(url_inputs=True, url_allow_hosts=("*",), url_read_timeout_s=1.0, url_timeout_s=3.0)
    return ServeConfig(**{**base, **kw})


class FakeDNS:
    """Resolves from a table, counting lookups; the connector sends every connection to the local origin
    and records which address it was asked for."""

    def __init__(self, table: dict[str, list[str]], origin_port: int):
        self.table = table
        self.origin_port = origin_port
        self.lookups: list[str] = []
        self.connects: list[tuple[str, int, str | None]] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        answer = self.table[host]
        if len(answer) > 1 and isinstance(answer[0], list):  # successive answers: a rebinding name
            return answer.pop(0)
        return answer

    async def connect(self, address: str, port: int, **kw):
        self.connects.append((address, port, kw.get("server_hostname")))
        return await asyncio.open_connection("127.0.0.1", self.origin_port, **kw)


def fetch(fetcher: UrlFetcher, url: str, timeout_s: float = 5.0) -> bytes:
    return asyncio.run(fetcher.fetch(url, timeout_s))


def refused(fetcher: UrlFetcher, url: str) -> ApiError:
    with pytest.raises(ApiError) as e:
        fetch(fetcher, url)
    return e.value


def test_a_name_resolving_to_a_private_address_is_refused_without_connecting() -> None:
    image = jpeg()
    with Origin(image) as origin:
        dns = FakeDNS({"intranet.example": ["10.1.2.3"], "mixed.example": ["93.184.215.14", "127.0.0.1"],
                       "meta.example": ["169.254.169.254"], "v6meta.example": ["::ffff:169.254.169.254"],
                       "public.example": ["93.184.215.14"]}, origin.port)
        fetcher = UrlFetcher(config(), resolver=dns.resolve, connector=dns.connect)
        for host in ("intranet.example", "mixed.example", "meta.example", "v6meta.example"):
            e = refused(fetcher, f"http://{host}/cat.jpg")
            assert (e.status, e.code) == (400, "url_not_allowed") and "refused address" in e.message
        assert dns.connects == []  # nothing was ever connected to
        # the same service fetches a name that resolves to a public address, connecting to that address
        assert fetch(fetcher, "http://public.example/cat.jpg") == image
        assert dns.connects == [("93.184.215.14", 80, None)]
        assert origin.hosts[-1] == "public.example"  # the Host header names the host, not the address


def test_the_vetted_address_is_the_one_connected_to_so_rebinding_cannot_swap_it() -> None:
    image = jpeg()
    with Origin(image) as origin:
        # first answer public, any later one private: a resolver that is asked twice would connect inside
        dns = FakeDNS({"rebind.example": [["93.184.215.14"], ["127.0.0.1"], ["127.0.0.1"]]}, origin.port)
        fetcher = UrlFetcher(config(), resolver=dns.resolve, connector=dns.connect)
        assert fetch(fetcher, "http://rebind.example:8080/cat.jpg") == image
        assert dns.lookups == ["rebind.example"] and dns.connects == [("93.184.215.14", 8080, None)]
        assert origin.hosts[-1] == "rebind.example:8080"


def test_non_ascii_urls_are_sent_encoded_not_failed() -> None:
    # An IDN host goes out in its ASCII (punycode) form, a non-ASCII path percent-encoded as UTF-8; a host
    # that is no valid domain name is refused. None of them may end as a server error.
    with Origin(jpeg()) as origin:
        dns = FakeDNS({"xn--exmple-cua.example": ["93.184.215.14"]}, origin.port)
        fetcher = UrlFetcher(config(), resolver=dns.resolve, connector=dns.connect)
        e = refused(fetcher, "http://exämple.example/chat-noir-é.jpg?q=ü")
        assert (e.status, e.code) == (400, "url_fetch_failed") and "404" in e.message
        assert origin.hosts[-1] == "xn--exmple-cua.example"
        assert origin.paths[-1] == "/chat-noir-%C3%A9.jpg?q=%C3%BC"
        e = refused(fetcher, "http://bad..example/cat.jpg")
        assert (e.status, e.code) == (400, "url_not_allowed")


def test_every_redirect_is_checked_again() -> None:
    image = jpeg()
    with Origin(image) as origin:
        dns = FakeDNS({"a.example": ["93.184.215.14"], "b.example": ["10.0.0.5"], "c.example": ["8.8.8.8"]},
                      origin.port)
        fetcher = UrlFetcher(config(url_allow_hosts=("a.example", "b.example")), resolver=dns.resolve,
                             connector=dns.connect)
        e = refused(fetcher, "http://a.example/redirect?to=" + quote("http://b.example/cat.jpg"))
        assert e.code == "url_not_allowed" and "b.example" in e.message
        e = refused(fetcher, "http://a.example/redirect?to=" + quote("http://c.example/cat.jpg"))
        assert e.code == "url_not_allowed" and "url_allow_hosts" in e.message
        e = refused(fetcher, "http://a.example/redirect?to=" + quote("file:///etc/passwd"))
        assert e.code == "url_not_allowed" and "scheme" in e.message
        assert [c[0] for c in dns.connects] == ["93.184.215.14"] * 3  # never past the first hop
        assert fetch(fetcher, "http://a.example/redirect?to=/cat.jpg") == image  # relative, same host


def _certificate(hostname: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_https_checks_the_certificate_against_the_host_name_while_connecting_to_the_address(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    cert, key = _certificate("images.example")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_tls = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    image = jpeg()
    with Origin(image, tls=server_tls) as origin:
        dns = FakeDNS({"images.example": ["93.184.215.14"], "other.example": ["93.184.215.14"]}, origin.port)
        fetcher = UrlFetcher(config(), resolver=dns.resolve, connector=dns.connect, ssl_context=client_tls)
        assert fetch(fetcher, "https://images.example/cat.jpg") == image
        assert dns.connects == [("93.184.215.14", 443, "images.example")]  # SNI is the name
        e = refused(fetcher, "https://other.example/cat.jpg")  # the certificate is not for this name
        assert e.code == "url_fetch_failed" and "TLS" in e.message


def test_an_unresolvable_name_is_a_fetch_failure() -> None:
    async def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    e = refused(UrlFetcher(config(), resolver=nxdomain), "http://nowhere.example/cat.jpg")
    assert (e.status, e.code) == (400, "url_fetch_failed")


# --- the live server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clf(species100):
    return species100


@pytest.fixture(scope="module")
def photo(sample_photos: list[Path], clf) -> tuple[bytes, str]:
    data = sample_photos[0].read_bytes()
    return data, clf.predict(data).label


@pytest.fixture(scope="module")
def origin(photo):
    with Origin(photo[0]) as o:
        yield o


@pytest.fixture(scope="module")
def server(clf):
    from serve_server import LiveServer

    from speciesclf.serve import create_app

    # Loopback is refused by default: the test allows exactly 127.0.0.1 (where the origin listens).
    cfg = ServeConfig(url_inputs=True, url_allow_networks=("127.0.0.1/32",),
                      url_allow_hosts=("127.0.0.1", "127.0.0.2", "10.0.0.1", "169.254.169.254", "::1",
                                       "::ffff:169.254.169.254", "0.0.0.0", "224.0.0.1"),
                      url_max_bytes=2**20, url_read_timeout_s=0.5, url_timeout_s=1.5, url_max_redirects=3)
    with LiveServer(create_app(clf, cfg)) as live:
        yield live


def _url_cases(base: str, port: int) -> list[tuple[str, int, str]]:
    redirect = lambda to: f"{base}/redirect?to={quote(to, safe='')}"  # noqa: E731
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    not_allowed = [
        "ftp://127.0.0.1/cat.jpg", "file:///etc/passwd", "gopher://127.0.0.1:70/", "javascript:alert(1)",
        "//127.0.0.1/cat.jpg", "http://", "http:///cat.jpg", f"http://user:pw@127.0.0.1:{port}/cat.jpg",
        "http://example.com/cat.jpg", f"http://localhost:{port}/cat.jpg", "http://10.0.0.1/cat.jpg",
        "http://169.254.169.254/latest/meta-data/", f"http://127.0.0.2:{port}/cat.jpg",
        f"http://[::1]:{port}/cat.jpg", "http://[::ffff:169.254.169.254]/", "http://0.0.0.0/",
        "http://224.0.0.1/", f"http://127.0.0.1:{port}/cat.jpg\r\nX-Injected: 1", "http://127.0.0.1:99999/",
        "http://" + "a" * 3000 + ".com/",
        redirect("http://10.0.0.1/cat.jpg"), redirect("http://169.254.169.254/latest/meta-data/iam"),
        redirect("ftp://127.0.0.1/cat.jpg"), redirect("http://example.com/"),
        redirect(f"http://127.0.0.2:{port}/cat.jpg"), redirect(f"http://[::1]:{port}/cat.jpg"),
    ]
    cases = [(u, 400, "url_not_allowed") for u in not_allowed]
    cases += [(f"{base}/{p}", 400, "url_fetch_failed") for p in
              ("missing", "500", "loop", "chain/5", "no-location", "slow-start", "drip")]
    cases.append((f"http://127.0.0.1:{closed_port}/cat.jpg", 400, "url_fetch_failed"))
    cases += [(f"{base}/{p}", 413, "image_too_large") for p in ("big", "big-chunked", "huge-length")]
    cases.append((f"{base}/text", 415, "unsupported_format"))
    return cases


@pytest.mark.shared
def test_url_inputs_fetch_valid_images(server, origin, photo) -> None:
    data, label = photo
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("cat.jpg", "chunked.jpg", "nolength.jpg", "chain/3", "redirect?to=/cat.jpg"):
            r = c.post("/v1/predict", json={"url": f"{origin.base}/{path}", "top_k": 2})
            assert r.status_code == 200 and r.json()["label"] == label and len(r.json()["top_k"]) == 2, (path, r.text)
        items = c.post("/v1/predict/batch", json={"images": [
            {"url": f"{origin.base}/cat.jpg"}, base64.b64encode(data).decode(), {"url": "http://10.0.0.1/x.jpg"},
            {"url": f"{origin.base}/missing"}, {"url": f"{origin.base}/big"}]}).json()["predictions"]
        assert [i.get("label") or i["error"]["code"] for i in items] == [
            label, label, "url_not_allowed", "url_fetch_failed", "image_too_large"]
        both = c.post("/v1/predict", json={"url": f"{origin.base}/cat.jpg", "image": "QUJD"})
        assert both.status_code == 422 and both.json()["error"]["code"] == "invalid_request"


@pytest.mark.shared
def test_bad_urls_get_precise_4xx_while_valid_requests_keep_being_served(server, origin, photo) -> None:
    data, label = photo
    cases = _url_cases(origin.base, origin.port)
    assert len(cases) >= 35
    stop = threading.Event()
    good: list[tuple[int, str | None]] = []

    def valid_traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", content=data, headers={"content-type": "image/jpeg"})
                good.append((r.status_code, r.json().get("label")))

    def bad(case):
        url, status, code = case
        with httpx.Client(base_url=server.url, timeout=30) as c:
            t0 = time.perf_counter()
            r = c.post("/v1/predict", json={"url": url})
            return case, r.status_code, r.json().get("error", {}).get("code"), time.perf_counter() - t0

    feeder = threading.Thread(target=valid_traffic)
    feeder.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(bad, cases))
        # while slow origins hold fetches open, the event loop still answers at once
        with httpx.Client(base_url=server.url, timeout=30) as c:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                slow = [pool.submit(bad, (f"{origin.base}/drip", 400, "url_fetch_failed")) for _ in range(4)]
                time.sleep(0.3)
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                assert time.perf_counter() - t0 < 0.25
                answers += [f.result() for f in slow]
    finally:
        stop.set()
        feeder.join()
    wrong = [(case[0][:80], status, code) for case, status, code, _ in answers if (status, code) != case[1:]]
    assert not wrong
    assert max(seconds for *_, seconds in answers) < 1.5 + 1.0  # url_timeout_s bounds every fetch
    assert good and all(g == (200, label) for g in good), good[:5]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        m = c.get("/metrics").text
        assert 'speciesclf_errors_total{code="url_not_allowed"}' in m
        assert 'speciesclf_requests_total{route="/v1/predict",status="500"}' not in m


@pytest.mark.shared
def test_the_request_deadline_bounds_the_fetch(server, origin) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        # the client's deadline (300 ms) runs out first: 503, as for any request that cannot meet its deadline
        t0 = time.perf_counter()
        r = c.post("/v1/predict", json={"url": f"{origin.base}/drip"}, headers={"x-request-timeout-ms": "300"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "deadline_exceeded"
        assert time.perf_counter() - t0 < 0.3 + 0.4
        # the service's own fetch limit (url_timeout_s 1.5 s) runs out first: the fetch failed
        r = c.post("/v1/predict", json={"url": f"{origin.base}/drip"}, headers={"x-request-timeout-ms": "5000"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "url_fetch_failed"


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
def test_any_url_string_ends_in_an_api_error_never_an_exception(url: str) -> None:
    origin = _NotFoundOrigin()
    fetcher = UrlFetcher(config(), resolver=origin.resolve, connector=origin.connect)
    with pytest.raises(ApiError) as e:
        asyncio.run(fetcher.fetch(url, 2.0))
    assert 400 <= e.value.status < 500
