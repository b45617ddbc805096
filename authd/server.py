"""The asyncio Unix-socket server around the sans-I/O codec: connections, limits, drain.

Each request runs as its own task, so replies leave in completion order: a failed login
waiting out its delay never holds up the requests behind it on the same connection.
Who may hold a connection is decided at accept, from the peer's credentials, before it
takes a slot. A connection at `max_inflight`, or of a uid whose PAM queue is full
(`authd.intake`), is not read from until it has room, so a client that resends every `busy`
at once cannot keep the loop answering `busy`. A drain answers every line a client managed to
write (docs/protocol.md).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import functools
import grp
import os
import resource
import socket
import stat
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import structlog

from . import protocol as p, securefs
from .authflow import AuthCore
from .config import Limits
from .errors import AuthdError
from .eventops import Subscribe, serve_subscription
from .intake import Intake
from .ops import Context, dispatch
from .outcome import AuthRequest, Denied, Outcome
from .peer import Peer
from .runtime import Runtime

log = structlog.get_logger("authd.server")

ACCEPT_BATCH = 4  # accepted per loop turn: a flood waits in the kernel queue, not in front of replies
DRAIN_GRACE = 0.2  # requests already in the kernel's buffer when draining starts are still served
FD_HEADROOM = 256  # descriptors beyond the connections: listeners, PAM workers, SQLite, logs
REFUSE_LINGER = 0.5  # a refused client gets this long to send its request and read `busy`
LOG_INTERVAL = 10.0  # what a client can repeat at will (a flood) is logged once per interval, counted always


class FrontEnd(Protocol):
    """One protocol served on one socket: what a refused client hears, and its connections."""

    name: str
    busy: bytes  # the reply to a connection refused by the limits (b"": just close)
    forbidden: bytes  # the reply to a peer that [clients] does not allow (b"": just close)

    def connection(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   peer: Peer) -> Connection: ...


class Server:
    """Every listening socket, whatever its protocol, shares these limits and this drain."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.connections: set[Connection] = set()
        self.open = 0  # descriptors held: live connections and closed ones still flushing replies
        self.per_uid: Counter[int] = Counter()
        self.refusing = 0
        self._logged: dict[str, float] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._owned_paths: list[Path] = []
        self.drain_started: float | None = None
        self._finishing = False  # past the drain's grace: every connection stops taking input once idle
        self._released = asyncio.Event()  # set whenever a connection gives its slot back
        self.intake = Intake(self._pam_full)
        rt.pam.room = self.intake.room

    def _pam_full(self, uid: int) -> bool:
        return self.rt.pam.queued(uid) >= self.rt.policy.daemon.limits.max_queued_per_uid

    async def listen(self, front: FrontEnd, path: Path | None, inherited: socket.socket | None = None) -> None:
        """Serve `front` on a socket systemd passed in, or else bind our own at `path`."""
        if inherited is None and path is None:
            raise AuthdError(f"no socket for the {front.name} front end")
        key = "daemon.socket" if front.name == Native.name else f"{front.name}.socket"
        sock = inherited if inherited is not None else self._bind(path, key)  # type: ignore[arg-type]
        _raise_fd_limit(self.rt.policy.daemon.limits)
        accept = functools.partial(self._accept, front)
        server = await asyncio.start_unix_server(accept, sock=sock, limit=64 * 1024, backlog=ACCEPT_BATCH)
        sock.listen(socket.SOMAXCONN)  # asyncio's `backlog` is also its accept batch; keep the kernel queue deep
        self._servers.append(server)
        log.info("listening", socket=sock.getsockname(), protocol=front.name, inherited=inherited is not None)

    def _bind(self, path: Path, key: str) -> socket.socket:
        daemon = self.rt.policy.daemon
        sock = bind_unix(path, key, daemon.socket_mode, daemon.socket_group)
        self._owned_paths.append(path)
        return sock

    def stop_accepting(self) -> None:
        """Close the listeners; the socket file goes too unless systemd owns it."""
        for server in self._servers:
            server.close()
        for path in self._owned_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._owned_paths.clear()

    async def drain(self) -> None:
        """Serve what arrives within the grace, then drain every connection (`Connection.drain`)
        and wait until each has written its last reply and closed. The caller bounds the wait."""
        self.drain_started = time.monotonic()
        self.stop_accepting()
        await asyncio.sleep(DRAIN_GRACE)
        self._finishing = True
        self.intake.open_all()
        for conn in list(self.connections):
            conn.drain()
        while self.open:
            self._released.clear()
            await self._released.wait()

    def abort(self) -> None:
        for conn in list(self.connections):
            conn.writer.transport.abort()

    def accepting_requests(self) -> bool:
        return self.drain_started is None or time.monotonic() - self.drain_started < DRAIN_GRACE

    async def _accept(self, front: FrontEnd, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = Peer.of(writer.get_extra_info("socket"))
        except OSError:
            writer.transport.abort()
            return
        self.rt.counters["connections_total"] += 1
        if (refused := self.refusal(peer)) is not None:
            await self.refuse(reader, writer, front.forbidden if refused == p.CLIENT_FORBIDDEN else front.busy)
            return
        await self.serve(front.connection(self, reader, writer, peer))

    def refusal(self, peer: Peer) -> str | None:
        """The error code that turns `peer` away at accept, before it takes a slot, or None.

        A peer `[clients]` forbids never holds a connection, so forbidden uids cannot use up
        `max_connections`. Non-admins leave `admin_reserve` slots free: during a flood of
        allowed connections an admin can still connect to `status` and `revoke`.
        """
        policy = self.rt.policy
        limits = policy.daemon.limits
        counters = self.rt.counters
        if not policy.is_client(peer):
            counters["connections_refused_forbidden"] += 1
            if self.sometimes("forbidden"):
                log.warning("peer not allowed by [clients]; refusing", **peer.log_fields())
            return p.CLIENT_FORBIDDEN
        cap = limits.max_connections - (0 if policy.is_admin(peer) else limits.admin_reserve)
        if self.open >= cap or self.per_uid[peer.uid] >= limits.max_connections_per_uid:
            counters["connections_refused_busy"] += 1
            if self.sometimes("busy"):
                log.warning("connection limit reached; refusing", open=self.open, max_connections=limits.max_connections,
                            admin_reserve=limits.admin_reserve, uid_open=self.per_uid[peer.uid],
                            max_connections_per_uid=limits.max_connections_per_uid, **peer.log_fields())
            return p.BUSY
        return None

    async def serve(self, conn: Connection) -> None:
        """Run an admitted connection in its slot until it is closed and its replies are read."""
        uid = conn.peer.uid
        self.connections.add(conn)
        self.open += 1
        self.per_uid[uid] += 1
        if self._finishing:  # accepted just before the listener closed
            conn.drain()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            try:
                await conn.linger()
            finally:
                self.open -= 1
                self.per_uid[uid] -= 1
                if not self.per_uid[uid]:
                    del self.per_uid[uid]
                self._released.set()

    async def refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: bytes) -> None:
        """Send the refusal, then let the client finish writing its first request before closing.

        Closing at once fails a client's write (EPIPE) that races the close, and many clients
        then never read the reply. At most `max_connections` refusals (busy and forbidden
        alike) wait like this at a time; the rest are closed right after the reply.
        """
        writer.write(reply)
        if self.refusing >= self.rt.policy.daemon.limits.max_connections:
            writer.close()
            return
        self.refusing += 1
        try:
            writer.write_eof()
            async with asyncio.timeout(REFUSE_LINGER):
                while await reader.read(64 * 1024):
                    pass
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            self.refusing -= 1
            writer.close()

    def sometimes(self, what: str) -> bool:
        """True at most once per LOG_INTERVAL for each `what`: rate-limits client-triggered log lines."""
        now = time.monotonic()
        if now - self._logged.get(what, -LOG_INTERVAL) < LOG_INTERVAL:
            return False
        self._logged[what] = now
        return True

    def stats(self) -> dict[str, int]:
        return {"connections": len(self.connections), "open": self.open,
                "inflight": sum(len(c.inflight) for c in self.connections), "paused": self.intake.waiting()}


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


class Native:
    """authd's own protocol: JSON lines, many requests per connection, pipelined."""

    name = "native"
    busy = p.error(None, p.BUSY, "too many connections")
    forbidden = p.error(None, p.CLIENT_FORBIDDEN, "this uid/gid may not use authd")

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def connection(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   peer: Peer) -> Connection:
        return NativeConnection(server, reader, writer, peer, self.ctx)


class NativeConnection(Connection):
    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer,
                 ctx: Context) -> None:
        super().__init__(server, reader, writer, peer)
        self.ctx = ctx

    def make_decoder(self, limits: Limits) -> p.Decoder:
        return p.Decoder(limits.max_line)

    def timed_out(self, limits: Limits) -> bytes:
        return p.error(None, p.BAD_REQUEST, f"request not completed within {limits.request_timeout:g}s")

    def malformed(self) -> bytes:
        return p.error(None, p.BAD_REQUEST, "malformed request")

    def handle(self, item: p.Request | p.ProtocolError) -> None:
        if isinstance(item, p.ProtocolError):
            self.rt.counters[f"protocol:{item.error}"] += 1
            self.send(p.error(item.id, item.error, item.message))
            return
        refused = self.admit()
        if refused == "refused_shutting_down":
            self.send(p.error(item.id, p.SHUTTING_DOWN, "authd is shutting down; retry"))
        elif refused is not None:
            self.send(p.error(item.id, p.BUSY, "too many requests in flight on this connection"))
        else:
            self.rt.counters[f"op:{item.__struct_config__.tag}"] += 1
            self.spawn(self._subscribe(item) if isinstance(item, Subscribe) else self._serve(item))

    async def _serve(self, req: p.Request) -> None:
        structlog.contextvars.bind_contextvars(request_id=req.id, **self.peer.log_fields())
        try:
            out = p.encode(req.id, await dispatch(self.ctx, self.peer, req))
        except Exception:
            self.rt.counters["internal_errors"] += 1
            log.exception("request failed", op=req.__struct_config__.tag)
            out = p.error(req.id, p.UNAVAILABLE, "internal error")
        self.send(out)

    async def _subscribe(self, req: Subscribe) -> None:
        """A stream of events on this connection, beside its other requests (`authd.eventops`)."""
        structlog.contextvars.bind_contextvars(request_id=req.id, **self.peer.log_fields())
        if self.forbidden():
            self.send(p.error(req.id, p.CLIENT_FORBIDDEN, "this uid/gid may not use authd"))
            return
        last = await serve_subscription(self.ctx, self.peer, req, self.writer, self.read_closed)
        if last is not None:
            self.writer.write(last)  # past the write_buffer check: the last word of a slow stream


def _raise_fd_limit(limits: Limits) -> None:
    """Every connection is a descriptor: lift the soft limit so `max_connections` refuses, not EMFILE.

    On EMFILE asyncio stops accepting for everyone for a second, and SQLite, the audit log and
    worker respawns fail too; systemd's default soft limit (1024) is below the default cap. Up
    to the hard limit, like Go's runtime does, so a reload that raises the cap is covered too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + FD_HEADROOM
    target = max(soft, wanted) if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    if target < wanted:
        log.warning("descriptor limit is below max_connections; raise LimitNOFILE", nofile=target,
                    max_connections=limits.max_connections)


def bind_unix(path: Path, key: str, mode: int, group: str | None) -> socket.socket:
    """A listening Unix socket at `path` with `mode` and `group` from the start (no window
    in which it has the umask's mode), replacing a stale socket file left by a crash.
    `key` names the setting in errors."""
    try:  # whoever may write the directory could swap the socket for their own
        securefs.make_dir(path.parent, key, 0o755)
    except OSError as exc:
        raise AuthdError(f"{key}: cannot use {path.parent}: {exc.strerror}") from None
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise AuthdError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    if group is not None:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(socket.SOMAXCONN)
    return sock


def _remove_stale_socket(path: Path) -> None:
    """A socket file nobody answers on is left from a crash; one that answers is in use."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AuthdError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise AuthdError(f"{path} is in use by another process (is authd already running?)")
