"""bench_lifecycle's client loops: login and `session` loops in a child process that count
every request sent, answered, lost or refused, so the reload phases can say none was lost."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as MpEvent
from typing import Any, Self

from tests.daemon import Daemon

REPLY_TIMEOUT = 10.0  # a request unanswered this long counts as lost
GRACE = 60.0  # bound on any single wait


def request(request_id: int, op: str, **fields: Any) -> bytes:
    return json.dumps({"id": request_id, "op": op, **fields}).encode() + b"\n"


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    ok: int = 0
    lost: int = 0
    codes: Counter[str] = field(default_factory=Counter)


async def _client_loop(path: str, fields: dict[str, Any], stop: MpEvent, tally: Tally) -> None:
    """Requests one after another; a reply that never comes is lost, then reconnect."""
    request_id = 0
    conn = await _connect(path, tally)
    while conn is not None and not stop.is_set():
        reader, writer = conn
        request_id += 1
        tally.sent += 1
        try:
            writer.write(request(request_id, **fields))
            raw = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            raw, why = b"", f"client: {exc.__class__.__name__}"
        else:
            why = "connection closed by authd"
        if not raw:
            tally.lost += 1
            tally.codes[why] += 1
            writer.close()
            conn = await _connect(path, tally)
            continue
        reply = json.loads(raw)
        tally.answered += 1
        if reply.get("id") != request_id:
            tally.codes["reply with a wrong id"] += 1
        elif reply.get("ok"):
            tally.ok += 1
        else:
            tally.codes[reply.get("error", "?")] += 1
    if conn is not None:
        conn[1].close()


async def _connect(path: str, tally: Tally) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        return await asyncio.open_unix_connection(path)
    except OSError as exc:
        tally.codes[f"cannot connect: {exc.strerror or exc}"] += 1
        return None


def _load_child(path: str, auth: dict[str, Any], auth_loops: int, token: str, ready: MpEvent, stop: MpEvent,
                out: Connection) -> None:
    async def run() -> list[Tally]:
        kinds = [auth] * auth_loops + [{"op": "session", "token": token}]
        tallies = [Tally() for _ in kinds]
        tasks = [asyncio.create_task(_client_loop(path, kind, stop, t)) for kind, t in zip(kinds, tallies)]
        while sum(t.answered for t in tallies) < 10 * len(tallies) and not stop.is_set():
            await asyncio.sleep(0.01)
        ready.set()
        await asyncio.gather(*tasks)
        return tallies

    tallies = asyncio.run(run())
    out.send(Tally(
        sent=sum(t.sent for t in tallies), answered=sum(t.answered for t in tallies), ok=sum(t.ok for t in tallies),
        lost=sum(t.lost for t in tallies), codes=sum((t.codes for t in tallies), Counter()),
    ))


class Load:
    """`auth_loops` login loops and one `session` loop in a child process, so the client side
    shares no GIL with the reload timing."""

    def __init__(self, daemon: Daemon, token: str, user: str, password: str, auth_loops: int = 3) -> None:
        ctx = multiprocessing.get_context("fork")
        self.ready, self.stop = ctx.Event(), ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        auth = {"op": "auth", "user": user, "password": password, "service": "login", "open_session": False}
        self.proc = ctx.Process(target=_load_child,
                                args=(str(daemon.socket), auth, auth_loops, token, self.ready, self.stop, send))

    def __enter__(self) -> Self:
        self.proc.start()
        if not self.ready.wait(GRACE):
            raise RuntimeError("client loops did not get going")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.proc.join(REPLY_TIMEOUT + GRACE)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

    def result(self) -> Tally:
        if not self._recv.poll(GRACE):
            raise RuntimeError("client loops reported nothing")
        result: Tally = self._recv.recv()
        return result
