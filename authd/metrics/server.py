"""The scrape endpoint on the event loop: a TCP or Unix listener answering `GET /metrics`.

Bounded so that a scraper (or anyone who can reach the port) cannot cost a login anything:
at most `max_connections` exchanges at a time (beyond that, as many again are answered 503,
and the rest are closed at once), a request head of at most `scrape.MAX_HEAD` bytes (else
431), and `timeout` seconds for the whole exchange (a client that has not finished its
request by then gets 408; one that does not read its answer is cut off). One request per
connection; the answer is built from in-memory counters, on the loop, in about a millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ..errors import AuthdError
from ..server import bind_unix
from . import scrape
from .collector import Observed, render
from .config import Tcp, Unix

if TYPE_CHECKING:
    from ..runtime import Runtime

log = structlog.get_logger("authd.metrics")

LINGER = 1.0  # seconds a refused or timed-out client gets to read its answer


class MetricsServer:
    def __init__(self, rt: Runtime, lifecycle: Observed) -> None:
        self.rt = rt
        self.lifecycle = lifecycle
        self.active = 0
        self.refusing = 0  # answered 503, waiting for the client to read it; also bounded
        self._server: asyncio.AbstractServer | None = None
        self._owned_path: Path | None = None

    async def listen(self) -> None:
        """Listen if `[metrics] listen` is set, accepting from `serve()`; AuthdError if the address is unusable."""
        policy = self.rt.policy
        config = policy.config.metrics
        endpoint = config.endpoint(policy.base_dir)
        if isinstance(endpoint, Unix):
            sock = bind_unix(endpoint.path, "metrics.listen", config.socket_mode, config.socket_group)
            self._owned_path = endpoint.path
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=scrape.MAX_HEAD,
                                                           start_serving=False)
            address = str(endpoint)
        elif isinstance(endpoint, Tcp):
            try:
                self._server = await asyncio.start_server(self._serve, endpoint.host, endpoint.port, limit=scrape.MAX_HEAD,
                                                          reuse_address=True, start_serving=False)
            except OSError as exc:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise AuthdError(f"metrics.listen: cannot listen on {endpoint}: {reason}") from None
            host, port = self._server.sockets[0].getsockname()[:2]
            address = str(Tcp(host, port))  # port 0 resolved
        else:
            return
        log.info("metrics listening", address=address)

    async def serve(self) -> None:
        """Start accepting scrapes, if `listen` set up a socket."""
        if self._server is not None:
            await self._server.start_serving()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._owned_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._owned_path.unlink()
            self._owned_path = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = self.rt.policy.config.metrics
        loop = asyncio.get_running_loop()
        if self.active >= config.max_connections:
            if self.refusing >= config.max_connections:
                writer.transport.abort()
                return
            self.refusing += 1
            try:
                await _finish(reader, writer, scrape.error(503, "too many scrapes at once"), loop.time() + LINGER)
            finally:
                self.refusing -= 1
            return
        self.active += 1
        try:
            deadline = loop.time() + config.timeout
            try:
                async with asyncio.timeout_at(deadline):
                    answer = await self._answer(reader)
            except TimeoutError:
                answer = scrape.error(408, f"request not completed within {config.timeout:g}s")
            except (ConnectionError, OSError):
                answer = None
            if answer is None:
                writer.transport.abort()
                return
            await _finish(reader, writer, answer, max(deadline, loop.time() + LINGER))
        finally:
            self.active -= 1

    async def _answer(self, reader: asyncio.StreamReader) -> bytes | None:
        """The response to the request on `reader`, or None if the client left first."""
        try:
            head = await reader.readuntil(scrape.END_OF_HEAD)
        except asyncio.LimitOverrunError:
            return scrape.error(431, f"request head over {scrape.MAX_HEAD} bytes")
        except asyncio.IncompleteReadError:
            return None
        request = scrape.parse_head(head)
        if isinstance(request, bytes):
            return request
        body, content_type = render(self.rt, self.lifecycle, request.accept or "")
        return scrape.response(200, body, content_type, head_only=request.head_only)


async def _finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes, deadline: float) -> None:
    """Send `answer`, then close when the client does, or at `deadline`.

    Closing while input the client sent is still unread makes the kernel reset the connection,
    which can destroy the answer before the client reads it; so the rest is read and dropped.
    """
    try:
        writer.write(answer)
        writer.write_eof()
        async with asyncio.timeout_at(deadline):
            while await reader.read(64 * 1024):
                pass
    except (TimeoutError, ConnectionError, OSError):
        writer.transport.abort()  # it does not read what it asked for, or it is gone
    finally:
        writer.close()
