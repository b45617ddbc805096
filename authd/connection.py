"""One client connection, of any protocol: what it may leave unread, its requests as tasks, drain.

A front end (`authd.native`, `authd.saslauthd.listener`, `authd.dovecot.listener`) subclasses
`Connection` with its codec; the server (`authd.server`) accepts and counts them. Each request
runs as its own task, so replies leave in completion order: a failed login waiting out its
delay never holds up the requests behind it on the same connection. A connection at
`max_inflight`, or of a uid whose PAM queue is full (`authd.intake`), is not read from until it
has room, so a client that resends every `busy` at once cannot keep the loop answering `busy`.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import socket
import time
from typing import TYPE_CHECKING, Any

import structlog

from . import protocol as p
from .authflow import AuthCore
from .config import Limits
from .outcome import AuthRequest, Denied, Outcome
from .peer import Peer

if TYPE_CHECKING:
    from .server import Server

log = structlog.get_logger("authd.server")


class Connection(abc.ABC):
    """One client connection of any protocol: limits on what it may leave unread, in-flight
    requests as tasks, linger and drain. `run` here reads a line protocol: subclasses give the
    decoder and what to do with each item it yields."""

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer) -> None:
        self.server = server
        self.rt = server.rt
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.inflight: set[asyncio.Task[None]] = set()
        self.decoder = self.make_decoder(self.rt.policy.daemon.limits)
        self._partial_since: float | None = None
        self._closing = False  # stop reading (a front end's protocol error); replies in flight still go out
        self._draining = False
        self._held: collections.deque[Any] = collections.deque()  # read while the uid's PAM queue was full
        self._freed: asyncio.Future[None] | None = None  # set when an in-flight request ends
        self.read_closed = asyncio.Event()  # the client sent EOF or the read loop ended

    @abc.abstractmethod
    def make_decoder(self, limits: Limits) -> Any:
        """A sans-I/O decoder: `feed(bytes)` returns the items those bytes complete."""

    @abc.abstractmethod
    def handle(self, item: Any) -> None:
        """Answer an item the decoder yielded, or `spawn` the work that will."""

    def timed_out(self, limits: Limits) -> bytes:
        """The reply to a request left unfinished for `request_timeout` (b"": just close)."""
        return b""

    def malformed(self) -> bytes:
        """The reply when the decoder itself failed (b"": just close)."""
        return b""

    async def run(self) -> None:
        try:
            try:
                await self._read_loop()
            finally:
                self.read_closed.set()
            if self.inflight:
                await asyncio.wait(self.inflight)
        except (ConnectionError, OSError):
            pass
        finally:
            self.writer.close()

    async def _read_loop(self) -> None:
        """Until EOF (the client's, or the one `drain` arranges after the last line it took) or `_closing`."""
        while not self._closing:
            waited = await self.take_turn()
            try:
                if self._held:  # one request per turn, in order, each behind the uid's other connections
                    self.handle(self._held.popleft())
                    await asyncio.sleep(0)  # let it reach the PAM queue before the next turn is judged
                elif not await self._read(waited):
                    return
            finally:  # a turn taken, or given up: the next connection of this uid, if there is room
                self.server.intake.room(self.peer.uid)

    async def _read(self, waited: bool) -> bool:
        """Read and handle what arrives; False when the connection is done reading."""
        counters = self.rt.counters
        limits = self.rt.policy.daemon.limits
        try:
            async with asyncio.timeout(self._read_timeout(limits)):
                data = await self.reader.read(64 * 1024)
        except TimeoutError:
            if self.inflight and self._partial_since is None:
                return True
            if self._partial_since is not None:
                counters["connections_closed_slow_request"] += 1
                self.send(self.timed_out(limits))
            else:
                counters["connections_closed_idle"] += 1
            return False
        if not data:
            return False
        try:
            items = self.decoder.feed(data)
        except Exception:  # a codec bug costs this connection, never the daemon or its log
            counters["internal_errors"] += 1
            if self.server.sometimes("undecodable"):
                log.exception("request could not be decoded; closing the connection", **self.peer.log_fields())
            self.send(self.malformed())
            return False
        self._take(items, 1 if waited else len(items))
        # Not `decoder.pending`: a line being skipped as too large is still a line in progress.
        partial = not data.endswith(b"\n")
        self._partial_since = (self._partial_since or time.monotonic()) if partial else None
        return True

    async def take_turn(self) -> bool:
        """Wait while this connection has `max_inflight` requests in flight, or the peer's uid
        a full PAM queue (`authd.intake`); True if it had to. Either way a client that resends
        each `busy` at once would keep the loop answering `busy`: its lines wait unread instead.
        A line left unfinished is not timed while it waits."""
        intake, uid = self.server.intake, self.peer.uid
        if len(self.inflight) < self.rt.policy.daemon.limits.max_inflight and intake.ready(uid):
            return False
        started = time.monotonic()
        while len(self.inflight) >= self.rt.policy.daemon.limits.max_inflight:
            self.rt.counters["paused_inflight"] += 1
            self._freed = asyncio.get_running_loop().create_future()
            await self._freed
        if not intake.ready(uid):
            self.rt.counters["paused_uid_queue"] += 1
            await intake.wait(uid)
        if self._partial_since is not None:
            self._partial_since += time.monotonic() - started
        return True

    def _take(self, items: list[Any], now: int) -> None:
        """Handle up to `now` of the items one read completed, while the uid's PAM queue has
        room; hold the rest for `_read_loop` to hand out one per turn. After a wait `now` is 1:
        a uid under pressure takes one request per turn, so what it resent meanwhile does not
        overrun its queue and bounce off `busy` again."""
        intake, uid = self.server.intake, self.peer.uid
        for i, item in enumerate(items):
            if i == now or not intake.ready(uid):
                self._held.extend(items[i:])
                return
            self.handle(item)

    def _read_timeout(self, limits: Limits) -> float:
        if self._partial_since is not None:
            return max(0.0, self._partial_since + limits.request_timeout - time.monotonic())
        return limits.idle_timeout

    def admit(self) -> str | None:
        """Why a request that just arrived cannot be served now (a counter name), or None."""
        if not self.server.accepting_requests():
            self.rt.counters["refused_shutting_down"] += 1
            return "refused_shutting_down"
        if len(self.inflight) >= self.rt.policy.daemon.limits.max_inflight:
            self.rt.counters["refused_busy"] += 1
            return "refused_busy"
        return None

    def forbidden(self) -> bool:
        """The peer is not in [clients] (checked per request: a reload may change who is)."""
        if self.rt.policy.is_client(self.peer):
            return False
        self.rt.counters["client_forbidden"] += 1
        return True

    async def decide(self, core: AuthCore, request: AuthRequest) -> Outcome:
        """The auth decision for a front end's request; a bug in it costs this request only."""
        try:
            out = await core.decide(self.peer, request)
        except Exception:
            self.rt.counters["internal_errors"] += 1
            log.exception("request failed", protocol=request.protocol, **self.peer.log_fields())
            return Denied(code=p.UNAVAILABLE)
        await self.rt.bus.durable()  # its events are in the log before the front end answers
        return out

    def spawn(self, work: Any) -> None:
        """Serve one request as its own task; replies leave in completion order."""
        task = asyncio.create_task(work)
        self.inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if self._freed is not None and not self._freed.done():
            self._freed.set_result(None)
        if not self.inflight and self._draining:
            self._stop_input()

    def send(self, data: bytes) -> None:
        """Queue a reply; a client that left more than `write_buffer` unread is cut off instead.

        Checked before writing, so one reply larger than the buffer (an admin's `sessions`)
        still reaches a client that reads: unread data stays below `write_buffer` + one reply.
        """
        transport = self.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > self.rt.policy.daemon.limits.write_buffer:
            self.rt.counters["connections_closed_not_reading"] += 1
            if self.server.sometimes("not_reading"):
                log.warning("client is not reading its replies; closing", **self.peer.log_fields())
            transport.abort()
            return
        transport.write(data)

    async def linger(self) -> None:
        """After the last reply, give the client `request_timeout` to read what is still buffered.

        A client that never reads would otherwise keep its descriptor and up to `write_buffer`
        bytes after the connection is done, beyond the reach of `max_connections`.
        """
        self.writer.close()
        try:
            async with asyncio.timeout(self.rt.policy.daemon.limits.request_timeout):
                await self.writer.wait_closed()
        except TimeoutError:
            self.rt.counters["connections_aborted_unread"] += 1
            self.writer.transport.abort()
        except (ConnectionError, OSError):
            pass

    def drain(self) -> None:
        """Close without losing a request: once nothing is in flight, take no more input,
        answer every line already received (`shutting_down`), then close.

        Lines that arrive meanwhile are read and answered, however many. `_stop_input` is
        what makes the end race-free: see there.
        """
        self._draining = True
        if not self.inflight:
            self._stop_input()

    def _stop_input(self) -> None:
        """shutdown(SHUT_RD): from this instant the client's writes fail (EPIPE), never vanish.

        On a Linux Unix stream socket the kernel queues a write into our receive queue or
        refuses it, atomically with this call, so there is no window in which a line is taken
        and then dropped. What was queued before is still read: the read loop answers it and
        then sees EOF, and the connection closes with nothing unread (a close with unread
        input would reset the client's connection instead of giving it EOF).
        """
        with contextlib.suppress(OSError):
            self.writer.get_extra_info("socket").shutdown(socket.SHUT_RD)
