"""authd.connection's turns in process: the real Server and Connection over socketpairs.

The runtime is a stand-in whose PAM queue is a counter per uid: each line a connection reads
is one call that joins its uid's queue and is answered when the test completes it, as the
pool does (`room(uid)` first, then the result). No sleeping: each step runs the loop until
everything that can move has moved.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any

from authd.config import Limits
from authd.connection import Connection
from authd.server import Server


class Pam:
    def __init__(self) -> None:
        self.queue: Counter[int] = Counter()

    def queued(self, uid: int) -> int:
        return self.queue[uid]


class Lines:
    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        return lines


class Front:
    """A line protocol whose every line is a PAM call that the test completes."""

    name, busy, forbidden = "test", b"busy\n", b"forbidden\n"

    def __init__(self, **limits: Any) -> None:
        daemon = SimpleNamespace(limits=Limits(**limits))
        policy = SimpleNamespace(daemon=daemon, is_client=lambda peer: True, is_admin=lambda peer: True)
        self.server = Server(SimpleNamespace(policy=policy, counters=Counter(), pam=Pam()))  # type: ignore[arg-type]
        self.calls: list[tuple[Connection, bytes, asyncio.Future[None]]] = []
        self.started: list[bytes] = []  # items in the order their work took its first step

    def connection(self, server: Server) -> Connection:
        return Calls(server, self)

    async def connect(self) -> tuple[socket.socket, Connection]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(5)
        theirs.setblocking(False)
        _, conn = await asyncio.get_running_loop().connect_accepted_socket(lambda: self.connection(self.server), theirs)
        await settle()
        return ours, conn  # type: ignore[return-value]

    def complete(self) -> None:
        """The oldest call leaves its uid's PAM queue and is answered."""
        conn, _, done = self.calls.pop(0)
        self.server.rt.pam.queue[conn.peer.uid] -= 1
        self.server.intake.room(conn.peer.uid)
        done.set_result(None)


class Calls(Connection):
    def make_decoder(self, limits: Limits) -> Lines:
        return Lines()

    def handle(self, item: bytes) -> None:
        if item == b"boom":
            raise RuntimeError("a bug in a front end")
        if item.startswith(b"now "):  # work that never waits, run at once
            if self.admit() is None:
                self.spawn(self._now(item), at_once=True)
            return
        pam = self.rt.pam
        if self.admit() is not None or pam.queue[self.peer.uid] >= self.rt.policy.daemon.limits.max_queued_per_uid:
            self.send(b"busy " + item + b"\n")
            return
        pam.queue[self.peer.uid] += 1
        done = self.loop.create_future()
        self.front.calls.append((self, item, done))
        self.spawn(self._serve(item, done), at_once=item.startswith(b"eager "))

    async def _serve(self, item: bytes, done: asyncio.Future[None]) -> None:
        self.front.started.append(item)
        await done
        self.send(b"ok " + item + b"\n")

    async def _now(self, item: bytes) -> None:
        self.front.started.append(item)
        self.send(b"ok " + item + b"\n")


async def settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def run(scenario: Coroutine[Any, Any, None]) -> list[dict[str, Any]]:
    """Run `scenario`; what reached the loop's exception handler (callbacks that raised)."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        await asyncio.wait_for(scenario, 20)

    asyncio.run(main())
    return errors


def test_a_connection_lost_while_waiting_for_its_turn_gives_its_slot_back() -> None:
    """The uid's queue is full and three connections wait in line. A call completes: the first
    is let in, and in the same step the second's client goes (EPIPE on a reply, or
    `write_buffer`), which cancels its wait while its turn is still in the line. The next
    `room` must pass over that turn, and the connection's slot must come back."""
    front = Front(max_queued_per_uid=2)

    async def scenario() -> None:
        s0, _ = await front.connect()
        s0.sendall(b"a\nb\n")  # fills the uid's queue
        await settle()
        s1, c1 = await front.connect()
        s2, _ = await front.connect()
        s1.sendall(b"c\n")
        s2.sendall(b"d\n")
        await settle()
        assert front.server.intake.waiting() == 3 and front.server.open == 3
        front.complete()  # c0 is let in (its task has not run yet); c1 is first in line
        assert c1.transport is not None
        c1.transport.abort()
        await settle()
        for s in (s0, s1, s2):
            s.close()
        while front.calls:
            front.complete()
            await settle()
        await settle()
        assert (front.server.open, dict(front.server.per_uid)) == (0, {})

    assert run(scenario()) == []


def test_a_connection_let_in_with_nothing_to_send_passes_the_turn_on() -> None:
    """A's one request fills the uid's queue, so A waits its turn with nothing more to send; B
    waits behind it with a line ready. When A's call completes and A is let in, B must not wait
    until A's client writes again or idles out."""
    front = Front(max_queued_per_uid=1)

    async def scenario() -> None:
        sa, _ = await front.connect()
        sa.sendall(b"a\n")
        await settle()
        sb, _ = await front.connect()
        sb.sendall(b"b\n")
        await settle()
        assert front.server.intake.waiting() == 2
        front.complete()
        await settle()
        assert [item for _, item, _ in front.calls] == [b"b"]
        front.complete()
        await settle()
        assert sa.recv(100) == b"ok a\n" and sb.recv(100) == b"ok b\n"
        sa.close()
        sb.close()
        await settle()

    assert run(scenario()) == []


def test_a_bug_in_a_step_run_from_the_wait_closes_that_connection_and_frees_its_slot() -> None:
    """Handing out a held request after a wait runs outside any transport callback: a front
    end that raises there costs its connection (counted; what was in flight is still
    answered), and the slot comes back."""
    front = Front(max_queued_per_uid=1)

    async def scenario() -> None:
        sock, _ = await front.connect()
        sock.sendall(b"b\nboom\n")  # `b` fills the uid's queue: `boom` is held
        await settle()
        assert front.server.open == 1 and front.server.intake.waiting() == 1
        front.complete()  # let in: the held `boom` is handed out, and raises
        await settle()
        assert sock.recv(100) == b"ok b\n" and sock.recv(100) == b""  # then closed
        assert front.server.open == 0 and front.server.rt.counters["internal_errors"] == 1
        sock.close()

    assert run(scenario()) == []


def test_work_run_at_once_that_never_waits_gets_no_task_and_holds_no_slot() -> None:
    front = Front()
    created: list[Any] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        sock, conn = await front.connect()
        loop.set_task_factory(lambda loop, coro, **kw: created.append(coro) or asyncio.Task(coro, loop=loop, **kw))
        sock.sendall(b"now 1\nnow 2\n")
        await settle()
        loop.set_task_factory(None)
        assert sock.recv(100) == b"ok now 1\nok now 2\n"
        assert created == [] and conn.inflight == set()
        sock.close()
        await settle()
        assert front.server.open == 0

    assert run(scenario()) == []


def test_work_run_at_once_that_waits_goes_on_in_a_task_and_counts_against_max_inflight() -> None:
    front = Front(max_inflight=2, max_queued_per_uid=8)

    async def scenario() -> None:
        sock, conn = await front.connect()
        sock.sendall(b"eager a\neager b\neager c\n")
        await settle()
        assert sock.recv(100) == b"busy eager c\n"  # two in flight: the third is refused
        assert len(conn.inflight) == 2
        front.complete()
        front.complete()
        await settle()
        assert sock.recv(100) == b"ok eager a\nok eager b\n"
        assert conn.inflight == set()
        sock.sendall(b"eager d\n")  # the slots came back
        await settle()
        front.complete()
        await settle()
        assert sock.recv(100) == b"ok eager d\n"
        sock.close()

    assert run(scenario()) == []


def test_work_run_at_once_never_starts_before_a_request_that_came_earlier() -> None:
    """Effects begin in request order: a `logout` pipelined before a `session` of the same
    token must remove it before the lookup runs, so what follows a request still waiting for
    its first step takes a task too."""
    front = Front()

    async def scenario() -> None:
        sock, _ = await front.connect()
        sock.sendall(b"a\nnow 1\n")
        await settle()
        assert front.started == [b"a", b"now 1"]
        front.complete()
        await settle()
        assert sock.recv(100) == b"ok now 1\nok a\n"  # completion order
        sock.sendall(b"now 2\n")  # nothing waits to start: at once again
        await settle()
        assert sock.recv(100) == b"ok now 2\n"
        sock.close()

    assert run(scenario()) == []
