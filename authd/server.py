"""The asyncio Unix-socket server every front end shares: listeners, accept, limits, drain.

Who may hold a connection is decided at accept, from the peer's credentials, before it takes a
slot; the connections themselves are `authd.connection`'s. A drain answers every line a client
managed to write (docs/protocol.md).
"""

from __future__ import annotations

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
from typing import Protocol

import structlog

from . import protocol as p
from . import securefs
from .config import Limits
from .connection import Connection
from .errors import AuthdError
from .intake import Intake
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

    def connection(self, server: Server) -> Connection:
        """A new connection's protocol; `Server.accepted` admits or refuses it."""


class Server:
    """Every listening socket, whatever its protocol, shares these limits and this drain."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.connections: set[Connection] = set()
        self.open = 0  # descriptors held: live connections and closed ones still flushing replies
        self.per_uid: Counter[int] = Counter()
        self.refusing = 0
        self._logged: dict[str, float] = {}
        self._servers: list[tuple[asyncio.AbstractServer, socket.socket]] = []  # and the socket each listens on
        self._owned_paths: list[Path] = []
        self.drain_started: float | None = None
        self._finishing = False  # past the drain's grace: every connection stops taking input once idle
        self._released = asyncio.Event()  # set whenever a connection gives its slot back
        self.intake = Intake(self._pam_full)
        rt.pam.room = self.intake.room

    def _pam_full(self, uid: int) -> bool:
        return self.rt.pam.queued(uid) >= self.rt.policy.daemon.limits.max_queued_per_uid

    async def listen(self, front: FrontEnd, path: Path | None, inherited: socket.socket | None = None) -> None:
        """Listen for `front` on a socket systemd passed in, or else bind our own at `path`.
        Clients queue in the kernel until `serve()`: start-up binds every socket first."""
        if inherited is None and path is None:
            raise AuthdError(f"no socket for the {front.name} front end")
        key = "daemon.socket" if front.name == "native" else f"{front.name}.socket"
        sock = inherited if inherited is not None else self._bind(path, key)  # type: ignore[arg-type]
        _raise_fd_limit(self.rt.policy.daemon.limits)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(functools.partial(front.connection, self), sock=sock,
                                               backlog=ACCEPT_BATCH, start_serving=False)
        self._servers.append((server, sock))
        log.info("listening", socket=sock.getsockname(), protocol=front.name, inherited=inherited is not None)

    async def serve(self) -> None:
        """Start accepting on every socket `listen` set up, the first one (native) last: a client
        it answers finds every other socket serving too."""
        for server, sock in reversed(self._servers):
            await server.start_serving()
            sock.listen(socket.SOMAXCONN)  # asyncio's `backlog` is also its accept batch; keep the kernel queue deep

    def _bind(self, path: Path, key: str) -> socket.socket:
        daemon = self.rt.policy.daemon
        sock = bind_unix(path, key, daemon.socket_mode, daemon.socket_group)
        self._owned_paths.append(path)
        return sock

    def stop_accepting(self) -> None:
        """Close the listeners; the socket file goes too unless systemd owns it."""
        for server, _ in self._servers:
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
            conn.transport.abort()

    def accepting_requests(self) -> bool:
        return self.drain_started is None or time.monotonic() - self.drain_started < DRAIN_GRACE

    def accepted(self, conn: Connection, transport: asyncio.Transport) -> None:
        """A client connected: start `conn` in a slot, or refuse it before it takes one."""
        try:
            peer = Peer.of(transport.get_extra_info("socket"))
        except OSError:
            transport.abort()
            return
        self.rt.counters["connections_total"] += 1
        if (refused := self.refusal(peer)) is not None:
            front = conn.front
            Refused(self, transport, front.forbidden if refused == p.CLIENT_FORBIDDEN else front.busy)
            return
        self.connections.add(conn)
        self.open += 1
        self.per_uid[peer.uid] += 1
        conn.start(transport, peer)
        if self._finishing:  # accepted just before the listener closed
            conn.drain()

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

    def finished(self, conn: Connection) -> None:
        """`conn` has queued its last reply; its slot is held until the client has read it."""
        self.connections.discard(conn)

    def released(self, conn: Connection) -> None:
        """`conn` is closed: its slot is free."""
        self.connections.discard(conn)
        self.open -= 1
        uid = conn.peer.uid
        self.per_uid[uid] -= 1
        if not self.per_uid[uid]:
            del self.per_uid[uid]
        self._released.set()

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


class Refused(asyncio.Protocol):
    """A refused client: the refusal, then time to finish writing its first request before the close.

    Closing at once fails a client's write (EPIPE) that races the close, and many clients then
    never read the reply. At most `max_connections` refusals (busy and forbidden alike) wait
    like this at a time; the rest are closed right after the reply.
    """

    def __init__(self, server: Server, transport: asyncio.Transport, reply: bytes) -> None:
        self.server = server
        self.timer: asyncio.TimerHandle | None = None
        transport.set_protocol(self)
        transport.write(reply)
        if server.refusing >= server.rt.policy.daemon.limits.max_connections:
            transport.close()
            return
        server.refusing += 1
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSE_LINGER, transport.close)

    def eof_received(self) -> bool:
        return False  # close: the client has written all it will

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.server.refusing -= 1


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
