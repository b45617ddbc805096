"""One client connection, of any protocol: what it may leave unread, its requests as tasks, drain.

A front end (`authd.native`, `authd.saslauthd.listener`, `authd.dovecot.listener`) subclasses
`Connection` with its codec; the server (`authd.server`) accepts and counts them. A connection
is an `asyncio.Protocol`: bytes are decoded in `data_received` as they arrive, with no stream
reader, per-read timer or task between the socket and the codec. Each request then runs as its
own task, so replies leave in completion order: a failed login waiting out its delay never
holds up the requests behind it on the same connection. A connection at `max_inflight`, or of
a uid whose PAM queue is full (`authd.intake`), is not read from until it has room, so a
client that resends every `busy` at once cannot keep the loop answering `busy`.

Reading goes in turns, as a read loop would: each turn reads what is there (or hands out one
request held from an earlier read), then lets the uid's next connection in (`Intake.room`).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from . import eager, protocol as p
from .authflow import AuthCore
from .config import Limits
from .outcome import AuthRequest, Denied, Outcome
from .peer import Peer

if TYPE_CHECKING:
    from .server import FrontEnd, Server

log = structlog.get_logger("authd.server")


class Connection(asyncio.Protocol, abc.ABC):
    """One client connection of any protocol: limits on what it may leave unread, in-flight
    requests as tasks, linger and drain. The base reads a line protocol: subclasses give the
    decoder and what to do with each item it yields."""

    timed_from_connect = False  # `request_timeout` runs from the connect (a protocol with no idle state)

    def __init__(self, server: Server, front: FrontEnd) -> None:
        self.server = server
        self.front = front
        self.rt = server.rt
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None  # set when the server admits the connection (`start`)
        self.inflight: set[asyncio.Task[None]] = set()
        self.read_closed = asyncio.Event()  # the client sent EOF, or reading ended
        self._held: collections.deque[Any] = collections.deque()  # read while the uid's PAM queue was full
        self._reading = True  # as the transport: a turn waits for bytes (not for room, nor handing out held ones)
        self._waited = False  # this turn had to wait for room: it takes one request
        self._waiter: asyncio.Task[None] | None = None  # waiting for room (`_wait_turn`)
        self._freed: asyncio.Future[None] | None = None  # set when an in-flight request ends
        self._read_since = 0.0  # the idle timeout counts from here
        self._partial_since: float | None = None  # a request is unfinished since
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False  # stop reading (a front end's protocol error); replies in flight still go out
        self._draining = False
        self._input_done = False
        self._finished = False
        self._lost = False
        self._linger: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._unstarted = 0  # requests given a task that has not taken its first step yet

    # -- what a front end gives ------------------------------------------------------------------

    @abc.abstractmethod
    def make_decoder(self, limits: Limits) -> Any:
        """A sans-I/O decoder for this connection."""

    @abc.abstractmethod
    def handle(self, item: Any) -> None:
        """Answer an item the decoder yielded, or `spawn` the work that will."""

    def opened(self) -> None:
        """The connection was admitted: a greeting, for protocols that have one."""

    def received(self, data: bytes) -> list[Any]:
        """The items `data` completes."""
        return self.decoder.feed(data)  # type: ignore[no-any-return]

    def unfinished(self, data: bytes) -> bool:
        """After reading `data`, is a request still in progress? (Then `request_timeout` runs.)

        Not the decoder's `pending`: a line being skipped as too large is still a line in progress."""
        return not data.endswith(b"\n")

    def at_eof(self) -> list[Any]:
        """The items the client's EOF completes."""
        return []

    def timed_out(self, limits: Limits) -> bytes:
        """The reply to a request left unfinished for `request_timeout` (b"": just close)."""
        return b""

    def malformed(self) -> bytes:
        """The reply when the decoder itself failed (b"": just close)."""
        return b""

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server.accepted(self, transport)  # type: ignore[arg-type]

    def start(self, transport: asyncio.Transport, peer: Peer) -> None:
        """Admitted by the server: greet, then take the first turn."""
        self.transport = transport
        self.peer = peer
        self.decoder = self.make_decoder(self.rt.policy.daemon.limits)
        if self.timed_from_connect:
            self._partial_since = self.loop.time()
        self.opened()
        self._turn()

    def data_received(self, data: bytes) -> None:
        if self._input_done:
            return
        try:
            items = self.received(data)
        except Exception:  # a codec bug costs this connection, never the daemon or its log
            self.rt.counters["internal_errors"] += 1
            if self.server.sometimes("undecodable"):
                log.exception("request could not be decoded; closing the connection", **self.peer.log_fields())
            self.send(self.malformed())
            self._end_input()
            return
        if self.unfinished(data):
            if self._partial_since is None:
                self._partial_since = self.loop.time()
                self._arm()
        else:
            self._partial_since = None
        self._take(items, 1 if self._waited else len(items))
        self._waited = False
        self.server.intake.room(self.peer.uid)  # a turn taken: the next connection of this uid, if there is room
        self._turn()

    def eof_received(self) -> bool:
        for item in self.at_eof():  # a saslauthd client that half-closed after 4 fields still gets its answer
            self.handle(item)
        self._end_input()
        return True  # keep the transport open: the replies in flight still go out

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is None:
            return
        self._lost = True
        try:
            if self._linger is not None:
                self._linger.cancel()
            for waiter in self._drain_waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionResetError("connection lost"))
            self._end_input()
        finally:  # whatever failed above, the slot comes back
            self.server.released(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drained(self) -> None:
        """Return once the client has read what is buffered (below the transport's low-water mark)."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            self._drain_waiters.remove(waiter)

    # -- turns -----------------------------------------------------------------------------------

    def _turn(self) -> None:
        """The next turn: wait for room, hand out one held request, or read."""
        if self._closing:
            self._end_input()
        elif self._input_done:
            return
        elif self._full() or not self.server.intake.ready(self.peer.uid):
            self._set_reading(False)
            self._waiter = self.loop.create_task(self._wait_turn())
        else:
            self._proceed(waited=False)

    def _proceed(self, waited: bool) -> None:
        if self._held:  # one request per turn, in order, each behind the uid's other connections
            self._set_reading(False)
            self.handle(self._held.popleft())
            self.loop.call_soon(self._safely, self._after_held)  # let it reach the PAM queue before the next turn is judged
        else:
            self._waited = waited
            self._set_reading(True)
            if waited:  # let in: if nothing is waiting to be read, the uid's next connection goes first
                self.loop.call_at(self.loop.time(), self._safely, self._unused_turn)

    def _unused_turn(self) -> None:
        """A timer, so it runs after the poll that follows the resume: bytes already in the
        socket reach `data_received` first. A connection let in with nothing to send would
        otherwise hold the uid's turn until its client writes or idles out."""
        if self._waited and self._reading and not self._input_done:
            self.server.intake.room(self.peer.uid)

    def _safely(self, step: Callable[[], None]) -> None:
        """A step of the turns run from a timer, a callback or the wait: a bug in it costs this
        connection (it reads no more; what is in flight is answered, then it closes), never
        leaves it paused with its slot held."""
        try:
            step()
        except Exception:
            self.rt.counters["internal_errors"] += 1
            log.exception("connection step failed; closing the connection", **self.peer.log_fields())
            self._end_input()

    def _after_held(self) -> None:
        if not self._input_done:
            self.server.intake.room(self.peer.uid)
            self._turn()

    async def _wait_turn(self) -> None:
        """Wait while this connection has `max_inflight` requests in flight, or the peer's uid
        a full PAM queue (`authd.intake`). Either way a client that resends each `busy` at once
        would keep the loop answering `busy`: its lines wait unread instead. A line left
        unfinished is not timed while it waits."""
        intake, uid = self.server.intake, self.peer.uid
        started = self.loop.time()
        while self._full():
            self.rt.counters["paused_inflight"] += 1
            self._freed = self.loop.create_future()
            await self._freed
        if not intake.ready(uid):
            self.rt.counters["paused_uid_queue"] += 1
            await intake.wait(uid)
        if self._partial_since is not None:
            self._partial_since += self.loop.time() - started
        self._waiter = None
        self._safely(lambda: self._proceed(waited=True))

    def _take(self, items: list[Any], now: int) -> None:
        """Handle up to `now` of the items one read completed, while the uid's PAM queue has
        room; hold the rest to hand out one per turn. After a wait `now` is 1: a uid under
        pressure takes one request per turn, so what it resent meanwhile does not overrun its
        queue and bounce off `busy` again."""
        intake, uid = self.server.intake, self.peer.uid
        for i, item in enumerate(items):
            if i == now or not intake.ready(uid):
                self._held.extend(items[i:])
                return
            self.handle(item)

    def _set_reading(self, on: bool) -> None:
        if on:
            self._read_since = self.loop.time()
            self._arm()
            if not self._reading:
                self._reading = True
                self.transport.resume_reading()
        elif self._reading:
            self._reading = False
            self.transport.pause_reading()

    def _deadline(self) -> float:
        limits = self.rt.policy.daemon.limits
        if self._partial_since is not None:
            return self._partial_since + limits.request_timeout
        return self._read_since + limits.idle_timeout

    def _arm(self) -> None:
        """One timer per connection, moved only when its deadline comes nearer; when it fires
        while the deadline has moved on, it is set again (`_expired`)."""
        when = self._deadline()
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._safely, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if not self._reading:  # waiting for room, or done: timed again when reading resumes
            return
        if self.loop.time() < self._deadline():
            self._arm()
            return
        limits, counters = self.rt.policy.daemon.limits, self.rt.counters
        if self._partial_since is not None:
            counters["connections_closed_slow_request"] += 1
            self.send(self.timed_out(limits))
        elif self.inflight:  # idle while requests are in flight: not idle
            self._read_since = self.loop.time()
            self._arm()
            return
        else:
            counters["connections_closed_idle"] += 1
        self._end_input()

    def _end_input(self) -> None:
        """Read no more; close once the replies in flight are queued."""
        if self._input_done:
            return
        self._input_done = True
        self._set_reading(False)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiter is not None:
            self._waiter.cancel()  # its place in the uid's line goes to the next (`Intake.wait`)
            self._waiter = None
        self.read_closed.set()
        self.server.intake.room(self.peer.uid)
        if not self.inflight:
            self._finish()

    def _finish(self) -> None:
        """Every reply is queued: close once the client has read them. A client that never
        reads would otherwise keep its descriptor and up to `write_buffer` bytes after the
        connection is done, beyond the reach of `max_connections`: it gets `request_timeout`."""
        if self._finished:
            return
        self._finished = True
        self.server.finished(self)
        self.transport.close()
        if not self._lost:
            self._linger = self.loop.call_later(self.rt.policy.daemon.limits.request_timeout, self._unread)

    def _unread(self) -> None:
        self.rt.counters["connections_aborted_unread"] += 1
        self.transport.abort()

    # -- requests --------------------------------------------------------------------------------

    def admit(self) -> str | None:
        """Why a request that just arrived cannot be served now (a counter name), or None."""
        if not self.server.accepting_requests():
            self.rt.counters["refused_shutting_down"] += 1
            return "refused_shutting_down"
        if self._full():
            self.rt.counters["refused_busy"] += 1
            return "refused_busy"
        return None

    def _full(self) -> bool:
        return len(self.inflight) >= self.rt.policy.daemon.limits.max_inflight

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

    def spawn(self, work: Any, *, at_once: bool = False) -> None:
        """Serve one request as its own task; replies leave in completion order. `at_once`:
        run it now, and give it a task only if it waits (`authd.eager`: only for work whose
        first step needs no task of its own). Not while a request before it has yet to take
        its first step (each request's effects begin in the order they came: a `logout`
        before a `session` of the same token), and not from inside a task (the turns' wait),
        where a misplaced `asyncio.timeout` would bind to that task instead of failing."""
        if at_once and not self._unstarted and asyncio.current_task(self.loop) is None:
            try:
                task = eager.start(self.loop, work, self._served)
            except BaseException:
                self._done()
                raise
            if task is None:
                self._done()
            else:
                self.inflight.add(task)
            return
        self._unstarted += 1
        self.inflight.add(self.loop.create_task(self._served(work, first=True)))

    async def _served(self, work: Any, first: bool = False) -> None:
        """`work`, then its slot is free at once: in the same step as its reply, so the
        client's next request, however fast, finds it free (a done callback would run a
        loop turn later). `first`: this is the request's first step."""
        if first:
            self._unstarted -= 1
        try:
            await work
        finally:
            self.inflight.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._done()

    def _done(self) -> None:
        if self._freed is not None and not self._freed.done():
            self._freed.set_result(None)
        if not self.inflight:
            if self._draining:
                self._stop_input()
            if self._input_done:
                self._finish()

    def send(self, data: bytes) -> None:
        """Queue a reply; a client that left more than `write_buffer` unread is cut off instead.

        Checked before writing, so one reply larger than the buffer (an admin's `sessions`)
        still reaches a client that reads: unread data stays below `write_buffer` + one reply.
        """
        transport = self.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > self.rt.policy.daemon.limits.write_buffer:
            self.rt.counters["connections_closed_not_reading"] += 1
            if self.server.sometimes("not_reading"):
                log.warning("client is not reading its replies; closing", **self.peer.log_fields())
            transport.abort()
            return
        transport.write(data)

    # -- drain -----------------------------------------------------------------------------------

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
        and then dropped. What was queued before is still read: the turns answer it and then
        see EOF, and the connection closes with nothing unread (a close with unread input
        would reset the client's connection instead of giving it EOF).
        """
        with contextlib.suppress(OSError):
            self.transport.get_extra_info("socket").shutdown(socket.SHUT_RD)
