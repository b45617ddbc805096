"""The outbox: every event is written to SQLite before the reply that caused it leaves.

Events get a sequence number when emitted and are committed in batches by one writer thread
(group commit: however many requests emit at once, one transaction). A request that emitted
events waits, before its reply is sent, until they are committed (`durable`), so an answered
request's events survive `kill -9`. WAL with `synchronous=NORMAL` keeps a commit in the
kernel's page cache: that outlives the process, not the machine (`synchronous = "full"` for
power loss, at the cost of an fsync per batch).

Each handler has a cursor (the last sequence number it is done with); on start, a handler
delivers from its cursor, so what was undelivered at a crash is delivered after it: at least
once, de-duplicated by the event `id`. Events that exhausted their retries are kept per handler
as dead letters until replayed or dropped. Retention is bounded by age and count; what is
pruned before every handler saw it is counted and logged.

All database work happens in the writer thread, never on the event loop. If the database
fails (disk full, read-only), events keep flowing in memory and replies are not held back:
the failure is logged and shown in `status`, and writing resumes when it clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog

from authd import sqlitefile
from authd.clock import SYSTEM, Clock
from authd.events.model import Event
from authd.events.retention import PRUNE_EVERY, Retention

log = structlog.get_logger("authd.events")

T = TypeVar("T")
FILENAME = "events.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, time REAL NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS events_id ON events (id);
CREATE TABLE IF NOT EXISTS cursors (handler TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead (handler TEXT NOT NULL, seq INTEGER NOT NULL, attempts INTEGER NOT NULL,
                                 error TEXT NOT NULL, time REAL NOT NULL, PRIMARY KEY (handler, seq));
"""
_decode = msgspec.json.Decoder(Event).decode
_emitted: contextvars.ContextVar[int] = contextvars.ContextVar("authd_emitted", default=0)
RETRY_WRITE = 1.0  # seconds between attempts to write to a failing log
MAX_UNWRITTEN = 100_000  # events held for a failing log; older ones are given up (counted)


@dataclass
class _Batch:
    events: list[tuple[int, Event]] = field(default_factory=list)
    cursors: dict[str, int] = field(default_factory=dict)
    dead: list[tuple[str, int, int, str, float]] = field(default_factory=list)
    forgotten: set[str] = field(default_factory=set)  # handlers whose cursors go
    jobs: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any] | None]] = field(default_factory=list)

    def busy(self) -> bool:
        return bool(self.events or self.cursors or self.dead or self.forgotten or self.jobs)


class Outbox:
    def __init__(
        self, path: Path | None, retention: Retention = Retention(), *, clock: Clock = SYSTEM,
        retry_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`path` None keeps the log in memory (tests, and `check-config`): same code, no file.
        `retry_clock` (monotonic) paces the writer's tries at a failing log."""
        self.path = path
        self.retention = retention
        self.clock = clock
        self.appended = 0  # highest sequence number handed out
        self.committed = 0  # highest one written, or given up on by the replies (see `storage_error`)
        self.written = 0  # highest one written: what a reader of the log can find there
        self._unwritable = False  # on the loop: the last write failed, so no reply waits for one
        self._stopped = False  # on the loop: the writer has ended (closed, or crashed): nothing waits for it
        self._retry_clock = retry_clock
        self.cursors: dict[str, int] = {}
        self.storage_error: str | None = None
        self.pruned_undelivered = 0
        self.unwritten_dropped = 0
        self._pending = _Batch()
        self._cond = threading.Condition()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # replies: until committed
        self._readers: list[tuple[int, asyncio.Future[None]]] = []  # readers of the log: until written
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._closing = False
        self._kick_queued = False
        self._last_prune = time.monotonic()
        self._retry_at = 0.0
        self._failing = False  # in the writer: its last write failed
        self._dead = False  # under `_cond`: the writer has ended, and takes no job any more
        self._inflight: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any] | None]] = []

    # -- on the event loop ------------------------------------------------------------------

    def open(self) -> None:
        """Open the log and learn where it ends and every handler's cursor (at start-up).

        A log that cannot be opened (permissions, a broken disk) must not stop the daemon:
        events then live in memory only, and `status` says so.
        """
        if self._db is not None:
            return
        try:
            self._db = self._connect()
        except (OSError, sqlite3.Error) as exc:
            log.error("event log cannot be opened; events are kept in memory only", path=str(self.path), error=str(exc))
            self.storage_error = str(exc)
            self.path = None
            self._db = self._connect()
        # the highest number ever given out: the events holding it may be pruned, or left out,
        # while a cursor or a dead letter still names it, and a number must never come back
        (last,) = self._db.execute(
            "SELECT max(coalesce((SELECT max(seq) FROM events), 0), coalesce((SELECT max(seq) FROM cursors), 0),"
            " coalesce((SELECT max(seq) FROM dead), 0))").fetchone()
        self.appended = self.committed = self.written = last
        self.cursors = dict(self._db.execute("SELECT handler, seq FROM cursors"))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer: what was appended before is written first."""
        self.open()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="authd-outbox", daemon=True)
        self._thread.start()

    def append(self, event: Event) -> int:
        """Give the event its sequence number and queue it for the next commit.

        The writer is woken once per turn of the event loop, not per event: the events of
        every request served in this turn go into one commit, and the writer does not wake
        (and take the GIL from the loop) in the middle of the turn.
        """
        self.appended += 1
        with self._cond:
            self._pending.events.append((self.appended, event))
        if not self._kick_queued and self._loop is not None:
            self._kick_queued = True
            self._loop.call_soon(self._kick)
        _emitted.set(self.appended)
        return self.appended

    def _kick(self) -> None:
        self._kick_queued = False
        with self._cond:
            self._cond.notify()

    def settled(self) -> bool:
        """Are the events this task emitted committed (true when it emitted none)?"""
        return self._committed(_emitted.get())

    async def durable(self) -> None:
        """Wait until the events this task emitted are committed (a no-op when it emitted none)."""
        await self.flushed(_emitted.get())

    @property
    def stopped(self) -> bool:
        """The writer has ended (or is ending): nothing more is written or read."""
        return self._stopped or self._dead

    @property
    def unwritable(self) -> bool:
        """The last write failed (and none has succeeded since), or the writer has ended."""
        return self._unwritable or self._stopped

    def _committed(self, target: int) -> bool:
        return target <= self.committed or self._loop is None or self._unwritable or self._stopped

    async def flushed(self, target: int) -> None:
        """Wait until everything up to sequence number `target` is committed (or, while the log
        cannot be written, given up on: a reply never waits for a broken disk)."""
        if self._committed(target):
            return
        future = self._loop.create_future()
        self._waiters.append((target, future))
        await future

    async def written_upto(self, target: int) -> None:
        """Wait until everything up to `target` is in the log, for `read`, or until a try to
        write fails (once a second while the log cannot be written): the caller looks again."""
        if target <= self.written or self._loop is None or self._stopped:
            return
        future = self._loop.create_future()
        self._readers.append((target, future))
        await future

    def set_cursor(self, handler: str, seq: int) -> None:
        """`handler` is done with everything up to `seq`; written with the next batch."""
        if self.cursors.get(handler, -1) >= seq:
            return
        self.cursors[handler] = seq
        with self._cond:
            self._pending.cursors[handler] = seq
            self._pending.forgotten.discard(handler)  # a handler of that name again
            self._cond.notify()

    def add_dead(self, handler: str, seq: int, attempts: int, error: str) -> None:
        error = error.encode("utf-8", "replace").decode()  # a handler's text may hold what SQLite cannot bind
        with self._cond:
            self._pending.dead.append((handler, seq, attempts, error, self.clock.time()))
            self._cond.notify()

    def forget(self, handler: str) -> None:
        """A handler left the configuration: its cursor no longer holds events back."""
        self.cursors.pop(handler, None)
        with self._cond:
            self._pending.cursors.pop(handler, None)
            self._pending.forgotten.add(handler)  # written (and retried) like a cursor
            self._cond.notify()

    async def dead_letters(self, handler: str | None = None) -> list[dict[str, Any]]:
        rows = await self.run(lambda db: db.execute(
            "SELECT d.handler, d.seq, d.attempts, d.error, d.time, e.body FROM dead d JOIN events e USING (seq)"
            " WHERE ? IS NULL OR d.handler = ? ORDER BY d.handler, d.seq", (handler, handler),
        ).fetchall())
        return [{"handler": h, "seq": seq, "attempts": attempts, "error": error, "time": when,
                 "event": msgspec.json.decode(body)} for h, seq, attempts, error, when, body in rows]

    async def take_dead(self, handler: str, seqs: list[int] | None) -> list[tuple[int, Event]]:
        """Remove dead letters of `handler` (all, or those `seqs`) and return their events."""
        def take(db: sqlite3.Connection) -> list[tuple[int, bytes]]:
            with db:
                rows = db.execute("SELECT d.seq, e.body FROM dead d JOIN events e USING (seq) WHERE d.handler = ?"
                                  " ORDER BY d.seq", (handler,)).fetchall()
                rows = [r for r in rows if seqs is None or r[0] in seqs]
                db.executemany("DELETE FROM dead WHERE handler = ? AND seq = ?", [(handler, seq) for seq, _ in rows])
            return rows
        return [(seq, _decode(body)) for seq, body in await self.run(take)]

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job(db)` in the writer thread, after what is pending now is written; while the
        log cannot be written, at once, without waiting for the next try (`read` reads only
        what is written anyway)."""
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        with self._cond:
            if self._dead:
                raise RuntimeError("the event log is closed")
            self._pending.jobs.append((job, future))
            self._cond.notify()
        return await future

    async def read(self, after: int, upto: int, limit: int) -> list[tuple[int, Event]]:
        """Committed events with `after < seq <= upto`, oldest first, at most `limit`."""
        rows = await self.run(lambda db: db.execute(
            "SELECT seq, body FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?", (after, upto, limit),
        ).fetchall())
        return [(seq, _decode(body)) for seq, body in rows]

    async def seq_of(self, event_id: str) -> int | None:
        row = await self.run(lambda db: db.execute("SELECT seq FROM events WHERE id = ?", (event_id,)).fetchone())
        return row[0] if row else None

    async def first_seq(self) -> int:
        (first,) = await self.run(lambda db: db.execute("SELECT coalesce(min(seq), 0) FROM events").fetchone())
        return first

    async def close(self) -> None:
        """Write what is pending, then stop the writer and close the file."""
        if self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the writer has ended already (it crashed): nothing to wait for
            await self.run(lambda db: None)
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def stats(self) -> dict[str, Any]:
        return {"last_seq": self.appended, "storage_error": self.storage_error,
                "pruned_undelivered": self.pruned_undelivered, "unwritten_dropped": self.unwritten_dropped}

    def _gave_up(self) -> None:
        """A write failed: release every reply waiting for one, and until a write succeeds
        again, let new ones go at once instead of waiting a retry out."""
        self._unwritable = True
        self.committed = max(self.committed, self.appended)
        self._waiters = _release(self._waiters, self.committed)
        self._readers = _release(self._readers, self.appended)  # not written: they look again

    def _wrote(self, upto: int) -> None:
        """A write succeeded, with the events up to `upto` (0: none) in it: replies wait for
        their commit again."""
        self._unwritable = False
        self.written = max(self.written, upto)
        self.committed = max(self.committed, upto)
        self._waiters = _release(self._waiters, self.committed)
        self._readers = _release(self._readers, self.written)

    def _ended(self) -> None:
        """The writer ended: nothing more is written, so nobody waits for it."""
        self._stopped = True
        self._waiters = _release(self._waiters, self.appended)
        self._readers = _release(self._readers, self.appended)

    # -- in the writer thread ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.path is None:
            db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            db.executescript(_SCHEMA)
            return db
        try:
            return sqlitefile.connect(self.path, _SCHEMA, isolation_level=None, check_same_thread=False)
        except sqlitefile.Corrupt as exc:
            aside = sqlitefile.move_aside(self.path)
            log.error("event log was corrupt; moved aside, starting a new one", path=str(self.path), moved_to=str(aside),
                      error=str(exc))
            return sqlitefile.connect(self.path, _SCHEMA, isolation_level=None, check_same_thread=False)

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # logged here, whole; the thread ends, and `_ended` frees whoever waits for it
            log.critical("event log writer crashed; events are kept in memory only from now on", exc_info=True)
            self.storage_error = f"the writer crashed: {exc!r}"
        finally:
            with self._cond:
                self._dead = True
                jobs, self._pending.jobs = self._inflight + self._pending.jobs, []
            for _, future in jobs:
                if future is not None:  # one already resolved is left alone (`_fail` looks)
                    self._call(_fail, future, RuntimeError("the event log is closed"))
            self._call(self._ended)

    def _serve(self) -> None:
        assert self._db is not None and self._loop is not None
        while True:
            with self._cond:
                while True:
                    wait = self._retry_at - self._retry_clock()
                    due = self._closing or (self._pending.busy() and wait <= 0)
                    if due or self._pending.jobs or self._prune_due(time.monotonic()):
                        break
                    self._cond.wait(max(wait, 0.01) if self._pending.busy() else PRUNE_EVERY)
                if due:
                    batch, self._pending = self._pending, _Batch()
                else:  # a failed write's next try is not due: the jobs (reads) do not wait for it
                    batch, self._pending.jobs = _Batch(jobs=self._pending.jobs), []
                self._inflight = batch.jobs
            if self._closing and not batch.busy():
                self._db.close()
                return
            if not due:
                self._run_jobs(batch.jobs)
            elif batch.busy() and not self._write(batch) and self._closing:
                self._abandon()
            if self._prune_due(time.monotonic()):
                self._prune()

    def _abandon(self) -> None:
        """Closing, and the last try failed too: what is still unwritten is given up (counted),
        so that close ends. A handler's undelivered events are reported by the bus as always."""
        with self._cond:
            lost = len(self._pending.events)
            self._pending.events, self._pending.cursors, self._pending.dead, self._pending.forgotten = [], {}, [], set()
        self.unwritten_dropped += lost
        log.error("event log not writable at close; events not written", path=str(self.path), unwritten=lost,
                  error=self.storage_error)

    def _write(self, batch: _Batch) -> bool:
        """One transaction for the batch, then its jobs; False if the write failed."""
        assert self._db is not None and self._loop is not None
        upto = batch.events[-1][0] if batch.events else 0  # `written` passes a left-out event too
        batch.events, rows = self._encoded(batch.events)  # a failed try re-queues only what can be written
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                # only the statements with rows: an empty executemany still costs its preparation
                if rows:
                    self._db.executemany("INSERT OR REPLACE INTO events (seq, id, time, body) VALUES (?, ?, ?, ?)", rows)
                if batch.forgotten:
                    self._db.executemany("DELETE FROM cursors WHERE handler = ?", [(h,) for h in batch.forgotten])
                if batch.cursors:
                    self._db.executemany("INSERT OR REPLACE INTO cursors (handler, seq) VALUES (?, ?)",
                                         batch.cursors.items())
                if batch.dead:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO dead (handler, seq, attempts, error, time) VALUES (?, ?, ?, ?, ?)", batch.dead)
            self._healthy()
            if upto or self._failing:  # a batch of cursors alone costs the loop nothing, unless after a fault
                self._call(self._wrote, upto)
            self._failing = False
            written = True
        except sqlite3.Error as exc:
            # Replies must not wait on a broken disk: they go out, the events are delivered from
            # memory, and the batch is written when the disk is back (the newest MAX_UNWRITTEN).
            self._failed(exc, len(batch.events))
            with self._cond:
                unwritten = batch.events + self._pending.events
                self.unwritten_dropped += max(0, len(unwritten) - MAX_UNWRITTEN)
                self._pending.events = unwritten[-MAX_UNWRITTEN:]
                newer = self._pending  # set since this batch was taken: it wins, and holds a name at most once
                older = {h: seq for h, seq in batch.cursors.items() if h not in newer.forgotten}
                newer.forgotten |= batch.forgotten - newer.cursors.keys()
                newer.cursors = {**older, **newer.cursors}
                self._pending.dead = batch.dead + self._pending.dead
            self._retry_at = self._retry_clock() + RETRY_WRITE
            self._failing = True
            self._call(self._gave_up)
            written = False
        self._run_jobs(batch.jobs)
        return written

    def _encoded(self, events: list[tuple[int, Event]]) -> tuple[list[tuple[int, Event]], list[tuple[int, str, float, bytes]]]:
        """The events that can be encoded, and their rows; one that cannot (no front end lets
        one through) is left out, logged and counted, once, rather than stop the log."""
        kept, rows = [], []
        for seq, event in events:
            try:
                rows.append((seq, event.id, event.time, event.to_json()))
            except (ValueError, TypeError, msgspec.EncodeError) as exc:  # UnicodeEncodeError is a ValueError
                self.unwritten_dropped += 1
                log.error("event cannot be written; left out of the log", event_id=event.id, event_name=event.name,
                          error=str(exc))
            else:
                kept.append((seq, event))
        return kept, rows

    def _run_jobs(self, jobs: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any] | None]]) -> None:
        for job, future in jobs:
            try:
                result = job(self._db)
            except Exception as exc:  # reported to the awaiting coroutine, never lost
                if future is None:
                    log.error("event log job failed", exc_info=True)
                else:
                    self._call(_fail, future, exc)
            else:
                if future is not None:
                    self._call(_resolve, future, result)

    def _prune(self) -> None:
        assert self._db is not None
        self._last_prune = time.monotonic()
        try:
            lost = self.retention.prune(self._db, self.clock.time(), list(self.cursors.values()))
        except sqlite3.Error as exc:
            self._failed(exc, 0)
            return
        if lost:
            self.pruned_undelivered += lost
            log.warning("events pruned before every handler delivered them", pruned_undelivered=lost,
                        max_age=self.retention.max_age, max_events=self.retention.max_events)

    def _prune_due(self, now: float) -> bool:
        return now - self._last_prune >= PRUNE_EVERY

    def _healthy(self) -> None:
        if self.storage_error is not None and self.path is not None:  # not the in-memory fallback
            log.info("event log writable again", path=str(self.path))
            self.storage_error = None

    def _failed(self, exc: sqlite3.Error, events: int) -> None:
        if self.storage_error is None:
            log.error("event log not writable; events are delivered from memory only", path=str(self.path),
                      error=str(exc), events=events)
        self.storage_error = str(exc)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _release(waiters: list[tuple[int, asyncio.Future[None]]], upto: int) -> list[tuple[int, asyncio.Future[None]]]:
    """Resolve the waiters for `upto` or before; the others still wait."""
    still = []
    for target, future in waiters:
        if target > upto:
            still.append((target, future))
        elif not future.done():
            future.set_result(None)
    return still


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
