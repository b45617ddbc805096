"""The floors under authd: bare Python servers that answer with nothing of authd's around them.

    python -m benchmarks.bareloop SOCKET [hello|saslauthd|saslauthd-raw] [PROCESSES]

- ``hello`` (the default): what one Python event loop can do per request on a persistent
  connection. An `asyncio.Protocol` splits lines, decodes each with msgspec and writes the
  reply authd's `hello` gives, from `data_received` (no task, no timer, no limits, no logging).
  `bench_peers --stacks ops` drives it beside authd's `hello` and `session`.
- ``saslauthd``: the same for a connection per request: an `asyncio.Protocol` that decodes one
  saslauthd request with authd's own codec, answers `OK` and closes. What asyncio's accept path
  and transports cost per login before any authentication.
- ``saslauthd-raw``: the same without asyncio's transports: non-blocking sockets watched with
  the loop's `add_reader`, accepted, read, answered and closed by hand.

`PROCESSES` (default 1) binds the socket once and forks that many processes in all, each
with its own event loop accepting from it, as saslauthd's `-n` workers share theirs: the
lever of "more than one event-loop process sharing the listening sockets", with nothing
else in the way.

`bench_peers --stacks cache` drives the last two beside saslauthd ``-c`` and authd's cache
hits, one process and two, so the ratios say how much of a hit's cost is authd's, how much
the connection's, and what more loops would buy.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import sys

import msgspec

from authd import PROTOCOL_VERSION, __version__
from authd.saslauthd import codec


class Hello(msgspec.Struct):
    id: int
    op: str


class HelloReply(msgspec.Struct):
    id: int
    ok: bool
    server: str
    version: str
    protocol: int
    generation: int


_decode = msgspec.json.Decoder(Hello).decode
_encode = msgspec.json.Encoder().encode


class Lines(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        if lines:
            replies = [_encode(HelloReply(_decode(line).id, True, "authd", __version__, PROTOCOL_VERSION, 1)) for line in lines]
            self.transport.write(b"\n".join(replies) + b"\n")  # type: ignore[attr-defined]


class OneRequest(asyncio.Protocol):
    """saslauthd's protocol: one request, `OK`, close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.decoder = codec.Decoder()

    def data_received(self, data: bytes) -> None:
        if _one_request(self.decoder, data):
            self.transport.write(codec.ok())  # type: ignore[attr-defined]
            self.transport.close()


def _one_request(decoder: codec.Decoder, data: bytes) -> bool:
    """True once `data` completed a request (its own writev: a 4-field one, as libsasl 2.1.28 sends)."""
    item = decoder.feed(data)
    if item is None and decoder.waiting_for_fifth:
        item = decoder.finish()
    return item is not None


def _serve_raw(listener: socket.socket) -> None:
    """Accept, read, answer and close with the sockets themselves: no transport, no protocol."""
    loop = asyncio.get_running_loop()

    def readable(conn: socket.socket, decoder: codec.Decoder) -> None:
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and not _one_request(decoder, data):
            return
        loop.remove_reader(conn)
        try:
            if data:
                conn.send(codec.ok())  # a few bytes into an empty socket buffer: never partial
        except OSError:
            pass  # the client left: nothing to answer
        finally:
            conn.close()

    def accept() -> None:
        for _ in range(16):
            try:
                conn, _ = listener.accept()
            except OSError:  # nothing more to accept (or EMFILE, ECONNABORTED): next time
                return
            conn.setblocking(False)
            loop.add_reader(conn, readable, conn, codec.Decoder())

    listener.setblocking(False)
    loop.add_reader(listener, accept)


async def serve(listener: socket.socket, kind: str) -> None:
    loop = asyncio.get_running_loop()
    if kind == "saslauthd-raw":
        _serve_raw(listener)
        await loop.create_future()
    server = await loop.create_unix_server(OneRequest if kind == "saslauthd" else Lines, sock=listener)
    async with server:
        await server.serve_forever()


def main(path: str, kind: str, processes: int) -> None:
    """Bind once, fork the other processes, and serve in each until killed (the children die
    with the parent: `PR_SET_PDEATHSIG` is Linux's, and so is this benchmark)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(socket.SOMAXCONN)
    os.chmod(path, 0o666)
    parent = os.getpid()
    for _ in range(processes - 1):
        if os.fork() == 0:
            if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
            if os.getppid() != parent:  # the parent died before the signal was asked for
                os._exit(0)
            break
    asyncio.run(serve(listener, kind))


KINDS = ("hello", "saslauthd", "saslauthd-raw")

if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 4 or (len(sys.argv) >= 3 and sys.argv[2] not in KINDS) \
            or (len(sys.argv) == 4 and not (sys.argv[3].isdigit() and int(sys.argv[3]) >= 1)):
        raise SystemExit(f"usage: python -m benchmarks.bareloop SOCKET [{'|'.join(KINDS)}] [PROCESSES >= 1]")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) >= 3 else "hello", int(sys.argv[3]) if len(sys.argv) == 4 else 1)
