"""Write-through of in-memory state to one SQLite file, by a writer thread, never on the event loop.

The session table and the lockout engine answer from memory; every change they make is queued
here as a job and a writer thread runs what is queued in one transaction (group commit: however
many requests change state at once, one commit), the same shape as the event outbox. A request
whose reply must not go out before its change is on disk awaits `durable()`.

A full, read-only, locked or corrupt file never stops authentication: a failed batch is logged
once (through the owner's `failed`), the connection is dropped, and the queued jobs are given up,
because memory already holds their effect. At most once a second after that, on the next change
(or `flush`), the owner's `rewrite()` snapshots memory on the event loop and the writer rewrites
the whole file from it; when that commits, the owner's `recovered` says so. A corrupt file is
moved aside and the owner's `quarantined` may salvage it.

The writer never touches the owner's memory: what it learns from the file (rows to merge back)
it hands over with `post`, and the event loop runs those callbacks on its next call here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from . import sqlitefile
from .securefs import UnsafePath

Job = Callable[[sqlite3.Connection], object]
"""One change, run in the writer thread inside the batch's transaction."""
Rewrite = Callable[[sqlite3.Connection], bool]
"""A whole-file rewrite from a memory snapshot; False if the owner must merge the file first."""

RETRY_INTERVAL = 1.0  # after a fault, the file is retried at most this often
FAULTS = (sqlite3.Error, OSError, UnsafePath)  # unsafe at start-up refuses the start (the owner's open)


class WriteThrough:
    def __init__(
        self, path: Path, schema: str, *, name: str, rewrite: Callable[[], Rewrite], failed: Callable[[str], None],
        recovered: Callable[[], None], quarantined: Callable[[Path, sqlitefile.Corrupt], None],
        retry_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._retry_clock = retry_clock  # paces the retries after a fault: monotonic, passed in for tests
        self.error: str | None = None  # why the file is behind memory right now (for `status`)
        self._schema = schema
        self._name = name
        self._rewrite = rewrite
        self._failed_hook = failed
        self._recovered_hook = recovered
        self._quarantined_hook = quarantined
        self._db: sqlite3.Connection | None = None
        self._dirty = False  # the file may lack what memory holds: rewrite it whole when it can be
        self._retry_at = 0.0
        self._queued: list[tuple[Job, bool]] = []  # (job, is a rewrite)
        self._rewriting = False  # a rewrite is queued or running
        self._snapshots = 0  # rewrites queued so far
        self._submitted = 0
        self._settled = 0
        self._waiters: list[tuple[int, concurrent.futures.Future[None]]] = []
        self._inbox: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    # -- on the event loop (or the owner's thread) ---------------------------------------------

    def open(self, load: Callable[[sqlite3.Connection], object]) -> None:
        """At start-up, before the writer runs: open the file and `load(db)` from it, here.

        Raises what the file raises (the owner falls back to reading it read-only); the store
        is then dirty, and the file is rewritten from memory once it can be written.
        """
        try:
            load(self._connection())
        except FAULTS as exc:
            if isinstance(exc, UnsafePath):
                raise
            self._fail(exc)
            raise
        finally:
            self.drain()

    def write(self, job: Job) -> None:
        """Queue one change (the owner's memory has it already). While the file is behind
        memory, the next due rewrite covers it; once a rewrite is queued (its snapshot taken),
        the change queues behind it."""
        snapshots = self._snapshots
        self.drain()
        if self._dirty and not self._rewriting:
            self.flush()  # a rewrite queued now takes its snapshot now: this change is in it
            return
        if self._snapshots != snapshots:
            return  # that drain queued a rewrite (a resync): its snapshot has this change
        self._enqueue(job)

    def flush(self) -> None:
        """After a fault, queue the whole-file rewrite if one is due (at most once a second)."""
        self.drain()
        if self._dirty and not self._rewriting and self._retry_clock() >= self._retry_at:
            self._rewriting = True
            self._snapshots += 1
            self._enqueue(self._rewrite(), rewrite=True)

    def resync(self) -> None:
        """Memory has what the file lacks (merged or salvaged rows): rewrite the file now."""
        self._dirty = True
        self._retry_at = 0.0
        self.flush()

    def post(self, callback: Callable[[], None]) -> None:
        """From the writer: run `callback` on the owner's side at its next call here."""
        self._inbox.append(callback)

    def drain(self) -> None:
        while self._inbox:
            self._inbox.popleft()()

    async def durable(self) -> None:
        """Wait until every change queued so far is committed, or given up to a fault (and
        what the writer handed back is merged, with the rewrite that follows)."""
        while True:
            self.drain()
            target = self._submitted
            with self._cond:
                if target <= self._settled:
                    return
                future: concurrent.futures.Future[None] = concurrent.futures.Future()
                self._waiters.append((target, future))
            await asyncio.wrap_future(future)

    def settle(self) -> None:
        """Blocking `durable`, for the owner's synchronous callers (close, tests)."""
        while True:
            self.drain()
            target = self._submitted
            with self._cond:
                if target <= self._settled:
                    return
                while self._settled < target:
                    self._cond.wait()

    def close(self) -> None:
        """One last try to persist what a fault kept in memory only, then stop and close the file."""
        if self._dirty:
            self._retry_at = 0.0
            self.flush()
        self.settle()
        if self._thread is not None:
            with self._cond:
                self._closing = True
                self._cond.notify()
            self._thread.join()
            self._thread = None
            self._closing = False
        self.drain()
        if self._db is not None:
            self._db.close()
            self._db = None

    def _enqueue(self, job: Job, *, rewrite: bool = False) -> None:
        with self._cond:
            self._submitted += 1
            self._queued.append((job, rewrite))
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"authd-{self._name}", daemon=True)
            self._thread.start()

    # -- in the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._closing:
                    self._cond.wait()
                batch, self._queued = self._queued, []
            if not batch:
                return
            self._commit(batch)
            with self._cond:
                self._settled += len(batch)
                done = [f for target, f in self._waiters if target <= self._settled]
                self._waiters = [(t, f) for t, f in self._waiters if t > self._settled]
                self._cond.notify_all()
            for future in done:
                future.set_result(None)

    def _commit(self, batch: list[tuple[Job, bool]]) -> None:
        rewrites = [i for i, (_, rewrite) in enumerate(batch) if rewrite]
        if self._dirty:
            if not rewrites:
                return  # a fault before this batch: memory has these changes, the next rewrite writes them
            batch = batch[rewrites[-1]:]  # what came before the last rewrite is in it
        complete = True
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                for job, rewrite in batch:
                    done = job(db)
                    complete = complete and not (rewrite and done is False)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except FAULTS as exc:
            if rewrites:  # only this batch's rewrite is over: one queued behind a failed batch is not
                self._rewriting = False
            self._fail(exc)
            return
        if not rewrites:
            return
        self._rewriting = False
        if not complete:
            self._retry_at = 0.0  # the owner merges what the file held (`post`), then asks again
            return
        self._dirty = False
        if self.error is not None:
            self._recovered_hook()  # logged before `error` clears: whoever sees it cleared finds the line
            self.error = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self._db = self._connect()
            except sqlitefile.Corrupt as exc:
                aside = sqlitefile.move_aside(self.path)
                self._quarantined_hook(aside, exc)
                self._dirty = True  # the fresh file must be given everything memory holds
                self._retry_at = 0.0
                self._db = self._connect()
        return self._db

    def _connect(self) -> sqlite3.Connection:
        return sqlitefile.connect(self.path, self._schema, isolation_level=None, check_same_thread=False)

    def _fail(self, exc: BaseException) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._dirty = True
        self._retry_at = self._retry_clock() + RETRY_INTERVAL
        message = f"{exc.__class__.__name__}: {exc}"
        if self.error is None:
            self._failed_hook(message)
        self.error = message
