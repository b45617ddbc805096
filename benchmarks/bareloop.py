"""The floor under authd's cheapest op: a bare asyncio server that answers `hello` lines.

    python -m benchmarks.bareloop SOCKET

What one Python event loop can do per request with nothing of authd's around it: an
`asyncio.Protocol` that splits lines, decodes each with msgspec, and writes the same reply
authd's `hello` gives, from `data_received` (no task, no timer, no limits, no logging).
`bench_peers --stacks ops` drives it beside authd's `hello` and `session` with the same
client, so the ratio says how much of what is left is authd's and how much Python's.
"""

from __future__ import annotations

import asyncio
import os
import sys

import msgspec

from authd import PROTOCOL_VERSION, __version__


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


async def serve(path: str) -> None:
    server = await asyncio.get_running_loop().create_unix_server(Lines, path)
    os.chmod(path, 0o666)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
