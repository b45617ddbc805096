"""Real servers on loopback for the handler tests: an HTTP receiver and an SMTP server."""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiosmtpd.controller import Controller

from authd.events import Event, Handler, HandlerConfig, HandlerContext, build_handlers

CANARY = "canary-Pa55w0rd-7f3a9c"
PLUGIN_DIR = Path(__file__).parent / "plugin_pkg"


class Policy(msgspec.Struct, forbid_unknown_fields=True):
    """The slice of the daemon's policy struct that holds ``[[handler]]`` tables."""

    handler: list[HandlerConfig] = []


def decode(toml: str) -> list[HandlerConfig]:
    return msgspec.toml.decode(toml.encode(), type=Policy).handler


def from_toml(toml: str, ctx: HandlerContext) -> list[Handler]:
    return build_handlers(decode(toml), ctx)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def eventually(predicate: Callable[[], Any], timeout: float = 20.0) -> None:
    """Poll until ``predicate()`` is true; generous deadline, never a speed assertion."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def login_event(name: str, request: dict[str, Any], **extra: Any) -> Event:
    """What the daemon does with a client request: copy the event fields, nothing else."""
    copied = set(Event.__struct_fields__) - {"name", "id", "time"}
    fields = {k: v for k, v in request.items() if k in copied}
    return Event.create(name, **fields, **extra)


@pytest.fixture
def ctx(tmp_path: Path) -> HandlerContext:
    return HandlerContext(state_dir=tmp_path / "state", base_dir=tmp_path)


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HttpReceiver:
    """Answers each POST with the next scripted status (then 200) and records it."""

    url: str
    statuses: list[int] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


@contextmanager
def serve_http(tls: ssl.SSLContext | None = None) -> Iterator[HttpReceiver]:
    receiver: HttpReceiver

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            receiver.requests.append(Request(self.path, dict(self.headers), body))
            status = receiver.statuses.pop(0) if receiver.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    scheme = "https" if tls else "http"
    receiver = HttpReceiver(url=f"{scheme}://127.0.0.1:{server.server_address[1]}/hook")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    with serve_http() as receiver:
        yield receiver


@dataclass
class Cert:
    """A self-signed certificate for 127.0.0.1: its own trust anchor (``ca_file``)."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    out = tmp_path_factory.mktemp("tls")
    cert = Cert(out / "cert.pem", out / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(cert.key), "-out", str(cert.cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert


class _Controller(Controller):
    def _trigger_server(self) -> None:
        self.port = self.server.sockets[0].getsockname()[1]  # we bound port 0
        super()._trigger_server()


class Mailbox:
    """aiosmtpd handler that keeps every envelope."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


@dataclass
class SmtpServer:
    host: str
    port: int
    mailbox: Mailbox


@contextmanager
def serve_smtp(**options: Any) -> Iterator[SmtpServer]:
    """aiosmtpd on 127.0.0.1; ``options`` go to its Controller (TLS, AUTH)."""
    mailbox = Mailbox()
    controller = _Controller(mailbox, hostname="127.0.0.1", port=0, **options)
    controller.start()
    try:
        yield SmtpServer("127.0.0.1", controller.port, mailbox)
    finally:
        controller.stop()


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    with serve_smtp() as server:
        yield server


@pytest.fixture
def plugin_path() -> Iterator[Path]:
    """Put the test plugin distribution (package + .dist-info with entry points) on sys.path."""
    sys.path.insert(0, str(PLUGIN_DIR))
    importlib.invalidate_caches()
    yield PLUGIN_DIR
    sys.path.remove(str(PLUGIN_DIR))
    importlib.invalidate_caches()
