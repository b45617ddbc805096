"""Sessions: opaque tokens out, only their SHA-256 kept; an in-memory table backed by SQLite.

The table answers lookups from memory; every change is written through to SQLite in WAL mode
by a writer thread (`writethrough`), and a request that issued or ended a session awaits
`durable()` before its reply, so a restart, or a `kill -9`, keeps every session that was
issued. Touches (a lookup moving `last_seen`, which pushes the idle expiry out) are not waited
for: they are collected and written together at most `TOUCH_INTERVAL` later, so a session
checked thousands of times a second costs the writer one row a second; a `kill -9` can lose
that last second of idle time, a clean stop loses none.

When the file cannot be written (disk full, read-only, locked by another process, corrupt)
sessions are still issued and checked from memory: the fault is logged once and shown in
`status`, and at most once a second (on the next change, or the expiry sweep) the file is
reopened and rewritten whole from memory, so it catches up once the fault clears. A corrupt
file is moved aside and what can still be read from it is kept.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from . import sqlitefile
from .protocol import PublicSession
from .sqlitefile import BUSY_TIMEOUT, Corrupt
from .writethrough import WriteThrough

log = structlog.get_logger("authd.sessions")

TOKEN_BYTES = 32  # 256 bits
TOUCH_INTERVAL = 1.0  # seconds a touch may wait to be written with the others
_SELECT = "SELECT id, token_hash, user, groups, service, rhost, created, last_seen, ttl, idle_timeout FROM sessions"
Row = tuple[Any, ...]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    token_hash BLOB NOT NULL UNIQUE,
    user TEXT NOT NULL,
    groups TEXT NOT NULL,
    service TEXT NOT NULL,
    rhost TEXT,
    created REAL NOT NULL,
    last_seen REAL NOT NULL,
    ttl REAL NOT NULL,
    idle_timeout REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(user);
"""


def new_token() -> str:
    """256 random bits, URL-safe; never starting with `-`, so no command line reads it as an option."""
    return _no_dash(TOKEN_BYTES)


def new_session_id() -> str:
    return _no_dash(12)


def _no_dash(nbytes: int) -> str:
    while (value := secrets.token_urlsafe(nbytes)).startswith("-"):
        pass  # one in 64 draws: costs under 0.03 bits of the token's 256
    return value


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class Session(msgspec.Struct, gc=False):
    """One issued session. `gc=False`: it holds no reference cycles, so the cyclic garbage
    collector never walks the table; with a million sessions a full collection (which a dump's
    allocations trigger) would otherwise stop the event loop for most of a second."""

    id: str
    token_hash: bytes
    user: str
    groups: tuple[str, ...]
    service: str
    rhost: str | None
    created: float
    last_seen: float
    ttl: float
    idle_timeout: float

    @property
    def expires_at(self) -> float:
        hard = self.created + self.ttl
        return min(hard, self.last_seen + self.idle_timeout) if self.idle_timeout else hard

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def public(self) -> PublicSession:
        return PublicSession(self.id, self.user, self.groups, self.service, self.rhost, self.created, self.last_seen,
                             self.expires_at)


class SessionLimitReached(Exception):
    """The user already holds the service's `max_sessions_per_user` live sessions, and it refuses more."""


class SessionStore:
    def __init__(
        self, path: Path, *, touch_interval: float = TOUCH_INTERVAL, clock: Callable[[], float] = time.time,
        retry_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.touch_interval = touch_interval
        self._clock = clock  # seconds since the epoch: a session's times are wall-clock times
        self._by_hash: dict[bytes, Session] = {}
        self._by_id: dict[str, Session] = {}
        self._by_owner: dict[tuple[str, str], dict[str, Session]] = {}  # (user, service) -> its sessions
        self._complete = True  # memory holds every session the file does
        self._gone: set[str] = set()  # removed while incomplete: a later merge must not revive them
        self._touched: dict[str, float] = {}  # session id -> last_seen, not yet queued for the file
        self._touch_timer: asyncio.TimerHandle | None = None
        self._file = WriteThrough(path, _SCHEMA, name="sessions", rewrite=self._rewrite, failed=self._failed,
                                  recovered=self._recovered, quarantined=self._quarantined, retry_clock=retry_clock)

    @property
    def persist_error(self) -> str | None:
        return self._file.error

    def open(self) -> None:
        """Load the persisted sessions; read-only if the file cannot be written, then serve on."""
        try:
            self._file.open(lambda db: self._load(_read(db)))
        except (sqlite3.Error, OSError):
            rows, self._complete = _read_only(self.path)
            self._load(rows)
        now = self._clock()
        self._write("DELETE FROM sessions WHERE created + ttl <= ? OR (idle_timeout > 0 AND last_seen + idle_timeout <= ?)",
                    (now, now))
        log.info("sessions loaded", count=len(self._by_id), path=str(self.path))

    def close(self) -> None:
        """One last try to persist what a fault kept in memory only, then close the file."""
        self._write_touches()
        self._file.close()

    def flush(self) -> None:
        """Retry persisting after a fault (rate-limited); nothing to do while the file is current."""
        self._file.flush()

    async def durable(self) -> None:
        """Wait until the changes made so far are on disk (or given up to a storage fault)."""
        await self._file.durable()

    def settle(self) -> None:
        """`durable`, blocking, touches included: for synchronous callers."""
        self._write_touches()
        self._file.settle()

    def __len__(self) -> int:
        return len(self._by_id)

    def create(
        self, *, user: str, groups: Iterable[str], service: str, rhost: str | None, ttl: float, idle_timeout: float
    ) -> tuple[Session, str]:
        token = new_token()
        now = self._clock()
        session = Session(
            id=new_session_id(), token_hash=hash_token(token), user=user, groups=tuple(groups),
            service=service, rhost=rhost, created=now, last_seen=now, ttl=ttl, idle_timeout=idle_timeout,
        )
        self._add(session)
        self._write("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _row(session))
        return session, token

    def make_room(self, *, user: str, service: str, limit: int, evict_oldest: bool) -> list[Session]:
        """Before `create`: keep the user's live sessions of `service` below `limit`.

        Returns the oldest sessions removed to make room (`evict_oldest`), or raises
        SessionLimitReached. Expired sessions do not count; the sweeper reports those.
        """
        owned = self._by_owner.get((user, service))
        if owned is None or len(owned) < limit:
            return []
        now = self._clock()
        live = [s for s in owned.values() if not s.expired(now)]
        if len(live) < limit:
            return []
        if not evict_oldest:
            raise SessionLimitReached
        live.sort(key=lambda s: s.created)
        doomed = live[: len(live) - limit + 1]
        self._remove(doomed)
        return doomed

    def lookup(self, token: str, *, touch: bool = True) -> Session | None:
        """The live session for a token; touching it pushes its idle expiry out."""
        session = self._by_hash.get(hash_token(token))
        if session is None:
            return None
        now = self._clock()
        if session.expired(now):
            return None
        if touch:
            session.last_seen = self._touched[session.id] = now
            if self._touch_timer is None:
                try:
                    self._touch_timer = asyncio.get_running_loop().call_later(self.touch_interval, self._write_touches)
                except RuntimeError:  # no event loop (a synchronous caller): now
                    self._write_touches()
        return session

    def _write_touches(self) -> None:
        if self._touch_timer is not None:
            self._touch_timer.cancel()
            self._touch_timer = None
        if self._touched:
            rows = [(seen, sid) for sid, seen in self._touched.items()]
            self._touched = {}
            self._file.write(lambda db: db.executemany("UPDATE sessions SET last_seen = ? WHERE id = ?", rows))

    def remove_token(self, token: str) -> Session | None:
        session = self._by_hash.get(hash_token(token))
        if session is None or session.expired(self._clock()):
            return None
        self._remove([session])
        return session

    def revoke(self, *, session_id: str | None = None, user: str | None = None) -> list[Session]:
        doomed = [s for s in self._by_id.values() if (session_id is None or s.id == session_id) and (user is None or s.user == user)]
        self._remove(doomed)
        return doomed

    def list(self, user: str | None = None) -> list[Session]:
        now = self._clock()
        return [s for s in self._by_id.values() if (user is None or s.user == user) and not s.expired(now)]

    def all(self) -> list[Session]:
        return list(self._by_id.values())

    def expire(self, now: float | None = None, candidates: Iterable[Session] | None = None) -> list[Session]:
        """Drop expired sessions (among `candidates`, by default all); run periodically, it is
        also when a faulted file is retried."""
        now = self._clock() if now is None else now
        pool = self._by_id.values() if candidates is None else candidates
        doomed = [s for s in pool if s.expired(now) and self._by_id.get(s.id) is s]
        self._remove(doomed)
        self.flush()
        return doomed

    def _add(self, session: Session) -> None:
        self._by_hash[session.token_hash] = session
        self._by_id[session.id] = session
        self._by_owner.setdefault((session.user, session.service), {})[session.id] = session

    def _load(self, rows: Iterable[Row]) -> None:
        """Add persisted sessions that are still live and not already (or no longer) in memory."""
        now = self._clock()
        for row in rows:
            session = _session(row)
            if session is None or session.expired(now) or session.id in self._by_id or session.id in self._gone:
                continue
            self._add(session)

    def _remove(self, sessions: list[Session]) -> None:
        if not sessions:
            return
        for session in sessions:
            self._by_hash.pop(session.token_hash, None)
            self._by_id.pop(session.id, None)
            self._touched.pop(session.id, None)
            owned = self._by_owner.get((session.user, session.service))
            if owned is not None and owned.pop(session.id, None) is not None and not owned:
                del self._by_owner[session.user, session.service]
        if not self._complete:
            self._gone.update(s.id for s in sessions)
        self._write("DELETE FROM sessions WHERE id IN (SELECT value FROM json_each(?))", (_json_ids(s.id for s in sessions),))

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        self._file.write(lambda db: db.execute(sql, params))

    def _rewrite(self) -> Callable[[sqlite3.Connection], bool]:
        """On the event loop: a snapshot of memory, for the writer to replace the file's rows with.

        While memory may lack sessions the file holds (it was read only in part), the writer
        first reads them and hands them back; the loop merges them and asks again."""
        if not self._complete:
            def merge_first(db: sqlite3.Connection) -> bool:
                rows = _read(db)
                self._file.post(lambda: self._merged(rows))
                return False
            return merge_first
        rows = [_row(s) for s in self._by_id.values()]

        def rewrite(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM sessions")
            db.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            return True
        return rewrite

    def _merged(self, rows: list[Row]) -> None:
        self._load(rows)
        self._complete = True
        self._gone.clear()
        self._file.resync()

    def _quarantined(self, aside: Path, exc: Corrupt) -> None:
        """In the writer (or at open): keep what can still be read from the file moved aside."""
        salvaged = _salvage(aside)

        def merge() -> None:
            before = len(self._by_id)
            self._load(salvaged)
            log.error("session database corrupt; moved aside", path=str(self.path), moved_to=str(aside), error=str(exc),
                      salvaged=len(self._by_id) - before)
            self._file.resync()
        self._file.post(merge)

    def _failed(self, message: str) -> None:
        log.error("session store write failed; sessions are kept in memory only", error=message, path=str(self.path))

    def _recovered(self) -> None:
        log.warning("session store writable again; sessions persisted", path=str(self.path), sessions=len(self._by_id))


def _read(db: sqlite3.Connection) -> list[Row]:
    return db.execute(_SELECT).fetchall()


def _read_only(path: Path) -> tuple[list[Row], bool]:
    """The sessions of a file that cannot be opened for writing, and whether that is all of them.

    `mode=ro` sees the WAL but needs a -shm it can use; `immutable=1` reads the main file as
    it is, which after a clean stop is everything (the WAL was checkpointed and removed).
    """
    if not path.exists():
        return [], True
    sqlitefile.check(path)
    for options, complete in (("mode=ro", True), ("immutable=1", False)):
        try:
            db = sqlite3.connect(f"{path.as_uri()}?{options}", uri=True, timeout=BUSY_TIMEOUT)
            try:
                return _read(db), complete
            finally:
                db.close()
        except sqlite3.Error:
            continue
    return [], False


def _salvage(path: Path) -> list[Row]:
    """Rows still readable from a corrupt file, up to the first damaged page."""
    rows: list[Row] = []
    for options in ("mode=ro", "immutable=1"):
        try:
            db = sqlite3.connect(f"{path.as_uri()}?{options}", uri=True, timeout=BUSY_TIMEOUT)
            try:
                for row in db.execute(_SELECT):
                    rows.append(row)
            finally:
                db.close()
        except sqlite3.Error:
            pass
        if rows:
            break
    return rows


def _row(s: Session) -> Row:
    return (s.id, s.token_hash, s.user, "\n".join(s.groups), s.service, s.rhost, s.created, s.last_seen, s.ttl, s.idle_timeout)


def _session(row: Row) -> Session | None:
    """A stored row as a Session; None for one that does not have the right shape (a damaged file)."""
    try:
        sid, token_hash, user, groups, service, rhost, created, last_seen, ttl, idle_timeout = row
        if not (isinstance(sid, str) and isinstance(token_hash, bytes) and isinstance(user, str) and isinstance(groups, str)
                and isinstance(service, str) and isinstance(rhost, str | None)):
            return None
        return Session(sid, token_hash, user, tuple(filter(None, groups.split("\n"))), service, rhost,
                       float(created), float(last_seen), float(ttl), float(idle_timeout))
    except (TypeError, ValueError):
        return None


def _json_ids(ids: Iterable[str]) -> str:
    return json.dumps(list(ids))
