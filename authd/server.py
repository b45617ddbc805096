"""The asyncio Unix-socket server around the sans-I/O codec: connections, limits, drain.

Each request runs as its own task, so replies leave in completion order: a failed login
waiting out its delay never holds up the requests behind it on the same connection.
"""

from __future__ import annotations

import abc
import asyncio
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
        try:  # whoever may write the directory could swap the socket for their own
            securefs.make_dir(path.parent, key, 0o755)
        except OSError as exc:
            raise AuthdError(f"{key}: cannot use {path.parent}: {exc.strerror}") from None
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o777 & ~daemon.socket_mode)
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise AuthdError(f"cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, daemon.socket_mode)
        if daemon.socket_group is not None:
            os.chown(path, -1, grp.getgrnam(daemon.socket_group).gr_gid)
        sock.listen(socket.SOMAXCONN)
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
        """Answer what was received, then close every connection. The caller bounds the wait."""
        self.drain_started = time.monotonic()
        self.stop_accepting()
        await asyncio.sleep(DRAIN_GRACE)
        for conn in list(self.connections):
            conn.close_when_idle()
        while self.connections:
            await asyncio.sleep(0.01)

    def abort(self) -> None:
        for conn in list(self.connections):
            conn.writer.transport.abort()

    def accepting_requests(self) -> bool:
        return self.drain_started is None or time.monotonic() - self.drain_started < DRAIN_GRACE

    async def _accept(self, front: FrontEnd, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits = self.rt.policy.daemon.limits
        try:
            peer = Peer.of(writer.get_extra_info("socket"))
        except OSError:
            writer.transport.abort()
            return
        counters = self.rt.counters
        counters["connections_total"] += 1
        if self.open >= limits.max_connections or self.per_uid[peer.uid] >= limits.max_connections_per_uid:
            counters["connections_refused_busy"] += 1
            if self.sometimes("busy"):
                log.warning("connection limit reached; refusing", open=self.open, max_connections=limits.max_connections,
                            uid_open=self.per_uid[peer.uid], max_connections_per_uid=limits.max_connections_per_uid,
                            **peer.log_fields())
            await self._refuse(reader, writer, limits, front.busy)
            return
        conn = front.connection(self, reader, writer, peer)
        self.connections.add(conn)
        self.open += 1
        self.per_uid[peer.uid] += 1
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            try:
                await conn.linger()
            finally:
                self.open -= 1
                self.per_uid[peer.uid] -= 1
                if not self.per_uid[peer.uid]:
                    del self.per_uid[peer.uid]

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: Limits,
                      busy: bytes) -> None:
        """Answer `busy`, then let the client finish writing its first request before closing.

        Closing at once fails a client's write (EPIPE) that races the close, and many clients
        then never read the reply. At most `max_connections` refusals wait like this at a time.
        """
        writer.write(busy)
        if self.refusing >= limits.max_connections:
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
                "inflight": sum(len(c.inflight) for c in self.connections)}


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
        self._closing = False

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
            await self._read_loop()
            if self.inflight:
                await asyncio.wait(self.inflight)
        except (ConnectionError, OSError):
            pass
        finally:
            self.writer.close()

    async def _read_loop(self) -> None:
        counters = self.rt.counters
        while not self._closing:
            limits = self.rt.policy.daemon.limits
            try:
                async with asyncio.timeout(self._read_timeout(limits)):
                    data = await self.reader.read(64 * 1024)
            except TimeoutError:
                if self.inflight and self._partial_since is None:
                    continue
                if self._partial_since is not None:
                    counters["connections_closed_slow_request"] += 1
                    self.send(self.timed_out(limits))
                else:
                    counters["connections_closed_idle"] += 1
                return
            if not data:
                return
            try:
                items = self.decoder.feed(data)
            except Exception:  # a codec bug costs this connection, never the daemon or its log
                counters["internal_errors"] += 1
                if self.server.sometimes("undecodable"):
                    log.exception("request could not be decoded; closing the connection", **self.peer.log_fields())
                self.send(self.malformed())
                return
            for item in items:
                self.handle(item)
            # Not `decoder.pending`: a line being skipped as too large is still a line in progress.
            partial = not data.endswith(b"\n")
            self._partial_since = (self._partial_since or time.monotonic()) if partial else None

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
            return await core.decide(self.peer, request)
        except Exception:
            self.rt.counters["internal_errors"] += 1
            log.exception("request failed", protocol=request.protocol, **self.peer.log_fields())
            return Denied(code=p.UNAVAILABLE)

    def spawn(self, work: Any) -> None:
        """Serve one request as its own task; replies leave in completion order."""
        task = asyncio.create_task(work)
        self.inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if not self.inflight and self._closing:
            self.writer.close()

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

    def close_when_idle(self) -> None:
        self._closing = True
        if not self.inflight:
            self.writer.close()


class Native:
    """authd's own protocol: JSON lines, many requests per connection, pipelined."""

    name = "native"
    busy = p.error(None, p.BUSY, "too many connections")

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
            self.spawn(self._serve(item))

    async def _serve(self, req: p.Request) -> None:
        structlog.contextvars.bind_contextvars(request_id=req.id, **self.peer.log_fields())
        try:
            out = p.encode(req.id, await dispatch(self.ctx, self.peer, req))
        except Exception:
            self.rt.counters["internal_errors"] += 1
            log.exception("request failed", op=req.__struct_config__.tag)
            out = p.error(req.id, p.UNAVAILABLE, "internal error")
        self.send(out)


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
