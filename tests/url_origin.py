"""Local origin servers on 127.0.0.1 for the URL fetcher's tests: one that misbehaves on purpose (optionally
over TLS), a resolver/connector pair that sends any name to it, and a self-signed certificate for a name.
Shared by tests/test_fetch.py (the library's fetcher) and tests/test_serve_urls.py (the service's URL inputs).
"""

from __future__ import annotations

import asyncio
import datetime
import io
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image

__all__ = ["FakeDNS", "Origin", "certificate", "jpeg", "record_connects"]


def record_connects(monkeypatch) -> list[str]:
    """The address of every socket connect in this process from now on, for the test's duration (through
    pytest's ``monkeypatch``; the connections still happen): proof that a refused address was never tried."""
    seen: list[str] = []
    real = socket.socket.connect

    def connect(sock, address):
        seen.append(address[0])
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def jpeg(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 140, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


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


def certificate(hostname: str) -> tuple[bytes, bytes]:
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
