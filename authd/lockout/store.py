"""SQLite persistence for lockout state.

The engine's in-memory state is authoritative and every change is written through, by a
writer thread (`writethrough`), never on the event loop. When the database cannot be written
(disk full, read-only, locked, corrupt) authentication goes on from memory: the store records
the error, and on a later write (at most once a second) reopens the file, merges what it holds
and rewrites the whole state, so nothing committed is lost and the file catches up once the
fault clears. A corrupt file is moved aside, never silently reused.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from .. import sqlitefile
from ..sqlitefile import Corrupt
from ..writethrough import WriteThrough

FailureRow = tuple[str, str, float]
"""(scope, key, time of the failure)."""
LockRow = tuple[str, str, float, float | None, int]
"""(scope, key, locked at, locked until or None for permanent, lock count)."""
Rows = tuple[list[FailureRow], list[LockRow]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS failures (scope TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS failures_by_key ON failures (scope, key);
CREATE TABLE IF NOT EXISTS locks (
    scope TEXT NOT NULL, key TEXT NOT NULL, since REAL NOT NULL, until REAL,
    strikes INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
PRAGMA user_version = 1;
"""

log = structlog.get_logger("authd.lockout")


class LockoutStore:
    """Write-through SQLite mirror (WAL, mode 0600) of failures and locks."""

    def __init__(
        self, path: Path, *, snapshot: Callable[[], Rows], merge: Callable[[Rows], None],
        retry_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(path)
        self._snapshot = snapshot
        self._merge = merge
        self._loaded = False
        self._file = WriteThrough(self._path, _SCHEMA, name="lockout", rewrite=self._rewrite, failed=self._failed,
                                  recovered=self._recovered, quarantined=self._quarantined, retry_clock=retry_clock)

    @property
    def error(self) -> str | None:
        return self._file.error

    def open(self) -> None:
        """Load persisted state into the engine; if the file cannot be written, read it anyway."""
        try:
            self._file.open(self._load)
        except (sqlite3.Error, OSError):
            self._load_read_only()

    async def durable(self) -> None:
        await self._file.durable()

    def add_failure(self, scope: str, key: str, at: float) -> None:
        self._write(lambda c: c.execute("INSERT INTO failures VALUES (?, ?, ?)", (scope, key, at)))

    def set_lock(
        self, scope: str, key: str, since: float, until: float | None, strikes: int
    ) -> None:
        """Record a lock; the failures that led to it are spent."""

        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM failures WHERE scope = ? AND key = ?", (scope, key))
            row = (scope, key, since, until, strikes)
            c.execute("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?, ?)", row)

        self._write(op)

    def clear(self, scope: str, key: str) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM failures WHERE scope = ? AND key = ?", (scope, key))
            c.execute("DELETE FROM locks WHERE scope = ? AND key = ?", (scope, key))

        self._write(op)

    def purge(self, failures_before: dict[str, float], locks_before: float) -> None:
        """Drop failures older than their scope's interval and locks long expired."""

        def op(c: sqlite3.Connection) -> None:
            for scope, cutoff in failures_before.items():
                c.execute("DELETE FROM failures WHERE scope = ? AND at < ?", (scope, cutoff))
            c.execute("DELETE FROM locks WHERE until IS NOT NULL AND until < ?", (locks_before,))

        self._write(op)

    def close(self) -> None:
        """Persist what is still pending (one last try), then close the file."""
        self._file.close()

    def _write(self, op: Callable[[sqlite3.Connection], object]) -> None:
        self._file.write(op)

    def _rewrite(self) -> Callable[[sqlite3.Connection], bool]:
        """On the event loop: the engine's state, for the writer to replace the file's with; if
        the file was never read, the writer reads it first and the engine merges it."""
        if not self._loaded:
            def merge_first(conn: sqlite3.Connection) -> bool:
                rows = _read(conn)
                self._file.post(lambda: self._merged(rows))
                return False
            return merge_first
        failures, locks = self._snapshot()

        def rewrite(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM failures")
            conn.execute("DELETE FROM locks")
            conn.executemany("INSERT INTO failures VALUES (?, ?, ?)", failures)
            conn.executemany("INSERT INTO locks VALUES (?, ?, ?, ?, ?)", locks)
            return True
        return rewrite

    def _merged(self, rows: Rows) -> None:
        self._merge(rows)
        self._loaded = True
        self._file.resync()

    def _load(self, conn: sqlite3.Connection) -> None:
        self._merge(_read(conn))
        self._loaded = True

    def _load_read_only(self) -> None:
        """Persisted locks stay enforced on a read-only state dir; writes resume when it heals.

        `mode=ro` needs a -shm file it can use (left by an unclean stop); after a clean stop
        there is none and no -wal either, and `immutable=1` reads the file as it is.
        """
        if not self._path.exists():
            return
        sqlitefile.check(self._path)
        for options in ("mode=ro", "immutable=1"):
            try:
                conn = sqlite3.connect(f"{self._path.as_uri()}?{options}", uri=True, timeout=0.1)
                try:
                    rows = _read(conn)
                finally:
                    conn.close()
            except sqlite3.Error:
                continue
            self._merge(rows)
            self._loaded = True
            return

    def _quarantined(self, aside: Path, exc: Corrupt) -> None:
        log.error("lockout database corrupt, moved aside", db=str(self._path), moved_to=str(aside), error=str(exc))

    def _failed(self, message: str) -> None:
        log.error("lockout state not persisted", db=str(self._path), error=message)

    def _recovered(self) -> None:
        log.warning("lockout state persisted again", db=str(self._path))


def _read(conn: sqlite3.Connection) -> Rows:
    failures: list[FailureRow] = conn.execute("SELECT scope, key, at FROM failures").fetchall()
    locks: list[LockRow] = conn.execute("SELECT scope, key, since, until, strikes FROM locks").fetchall()
    return failures, locks
