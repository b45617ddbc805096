"""Sessions: opaque tokens out, only their SHA-256 kept; an in-memory table backed by SQLite.

The table answers lookups from memory; every change is written through to SQLite in WAL mode
so a restart, or a `kill -9`, keeps every session that was issued. When the file cannot be
written (disk full, read-only, locked by another process, corrupt) sessions are still issued
and checked from memory: the fault is logged once and shown in `status`, and at most once a
second (on the next change, or the expiry sweep) the store reopens the file and rewrites it
whole from memory, so the file catches up once the fault clears. A corrupt file is moved
aside and what can still be read from it is kept.

One change is written behind instead of through: a lookup's new `last_seen` (idle expiry).
A token checked on every web request would otherwise cost a SQLite commit per check, more
than the rest of the lookup together. The new values are written together at most once per
`LAST_SEEN_EVERY` (on a later lookup), by the expiry sweep, and on close (drain, SIGTERM);
memory is always exact, so only a `kill -9` can lose them, and then a session's idle time
restarts from a `last_seen` at most that stale (or the sweep interval, with no lookups since).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from . import sqlitefile
from .protocol import PublicSession
from .securefs import UnsafePath
from .sqlitefile import BUSY_TIMEOUT, Corrupt

log = structlog.get_logger("authd.sessions")

TOKEN_BYTES = 32  # 256 bits
RETRY_INTERVAL = 1.0  # after a fault, the file is retried at most this often
LAST_SEEN_EVERY = 1.0  # seconds between batched writes of lookups' `last_seen`
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
    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_hash: dict[bytes, Session] = {}
        self._by_id: dict[str, Session] = {}
        self._by_owner: dict[tuple[str, str], dict[str, Session]] = {}  # (user, service) -> its sessions
        self._db: sqlite3.Connection | None = None
        self._dirty = False  # the file may lack what memory holds: rewrite it whole when it can be
        self._retry_at = 0.0
        self._complete = True  # memory holds every session the file does
        self._gone: set[str] = set()  # removed while incomplete: a later merge must not revive them
        self._seen: dict[str, float] = {}  # last_seen values not written yet, by session id
        self._seen_due = 0.0  # monotonic time of the next batched last_seen write
        self.persist_error: str | None = None

    def open(self) -> None:
        """Load the persisted sessions; read-only if the file cannot be written, then serve on."""
        try:
            rows = _read(self._connection())
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
            rows, self._complete = _read_only(self.path)
        self._load(rows)
        now = time.time()
        self._write("DELETE FROM sessions WHERE created + ttl <= ? OR (idle_timeout > 0 AND last_seen + idle_timeout <= ?)",
                    (now, now))
        log.info("sessions loaded", count=len(self._by_id), path=str(self.path))

    def close(self) -> None:
        """One last try to persist what a fault kept in memory only, then close the file."""
        self._write_seen()
        if self._dirty:
            self._retry_at = 0.0
            self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None

    def flush(self) -> None:
        """Retry persisting after a fault (rate-limited); nothing to do while the file is current."""
        if self._dirty:
            self._write(None, ())

    def __len__(self) -> int:
        return len(self._by_id)

    def create(
        self, *, user: str, groups: Iterable[str], service: str, rhost: str | None, ttl: float, idle_timeout: float
    ) -> tuple[Session, str]:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = time.time()
        session = Session(
            id=secrets.token_urlsafe(12), token_hash=hash_token(token), user=user, groups=tuple(groups),
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
        now = time.time()
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
        now = time.time()
        if session.expired(now):
            return None
        if touch:
            session.last_seen = now
            self._seen[session.id] = now
            if time.monotonic() >= self._seen_due:
                self._write_seen()
        return session

    def remove_token(self, token: str) -> Session | None:
        session = self._by_hash.get(hash_token(token))
        if session is None or session.expired(time.time()):
            return None
        self._remove([session])
        return session

    def revoke(self, *, session_id: str | None = None, user: str | None = None) -> list[Session]:
        doomed = [s for s in self._by_id.values() if (session_id is None or s.id == session_id) and (user is None or s.user == user)]
        self._remove(doomed)
        return doomed

    def list(self, user: str | None = None) -> list[Session]:
        now = time.time()
        return [s for s in self._by_id.values() if (user is None or s.user == user) and not s.expired(now)]

    def all(self) -> list[Session]:
        return list(self._by_id.values())

    def expire(self, now: float | None = None, candidates: Iterable[Session] | None = None) -> list[Session]:
        """Drop expired sessions (among `candidates`, by default all); run periodically, it is
        also when a faulted file is retried."""
        now = time.time() if now is None else now
        pool = self._by_id.values() if candidates is None else candidates
        doomed = [s for s in pool if s.expired(now) and self._by_id.get(s.id) is s]
        self._remove(doomed)
        self._write_seen()
        self.flush()
        return doomed

    def _add(self, session: Session) -> None:
        self._by_hash[session.token_hash] = session
        self._by_id[session.id] = session
        self._by_owner.setdefault((session.user, session.service), {})[session.id] = session

    def _load(self, rows: Iterable[Row]) -> None:
        """Add persisted sessions that are still live and not already (or no longer) in memory."""
        now = time.time()
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
            owned = self._by_owner.get((session.user, session.service))
            if owned is not None and owned.pop(session.id, None) is not None and not owned:
                del self._by_owner[session.user, session.service]
        if not self._complete:
            self._gone.update(s.id for s in sessions)
        self._write("DELETE FROM sessions WHERE id IN (SELECT value FROM json_each(?))", (_json_ids(s.id for s in sessions),))

    def _write_seen(self) -> None:
        """Write the `last_seen` values of lookups since the last time (see the module doc)."""
        self._seen_due = time.monotonic() + LAST_SEEN_EVERY
        if self._seen:
            rows = [(seen, session_id) for session_id, seen in self._seen.items()]
            self._seen.clear()
            self._write("UPDATE sessions SET last_seen = ? WHERE id = ?", rows, many=True)

    def _write(self, sql: str | None, params: Any, *, many: bool = False) -> None:
        """Write one change through (`many`: one statement over rows of parameters); after a
        fault, rewrite the table from memory instead."""
        if self._dirty and time.monotonic() < self._retry_at:
            return
        try:
            db = self._connection()
            if self._dirty:
                self._resync(db)
            elif sql is not None and many:
                with db:  # one transaction, one commit, for all the rows
                    db.execute("BEGIN IMMEDIATE")
                    db.executemany(sql, params)
            elif sql is not None:
                db.execute(sql, params)
        except (sqlite3.Error, OSError, UnsafePath) as exc:  # unsafe at start-up refuses the start (open)
            self._failed(exc)
            return
        if self._dirty:
            self._dirty = False
            if self.persist_error is not None:
                log.warning("session store writable again; sessions persisted", path=str(self.path), sessions=len(self._by_id))
            self.persist_error = None

    def _resync(self, db: sqlite3.Connection) -> None:
        if not self._complete:
            self._load(_read(db))
            self._complete = True
            self._gone.clear()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM sessions")
            rows = [_row(s) for s in self._by_id.values()]
            db.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self._db = _connect(self.path)
            except Corrupt as exc:
                self._quarantine(exc)
                self._db = _connect(self.path)
        return self._db

    def _quarantine(self, exc: Corrupt) -> None:
        """Move the corrupt file (and its WAL) aside, keep what can still be read, start afresh."""
        aside = sqlitefile.move_aside(self.path)
        before = len(self._by_id)
        self._load(_salvage(aside))
        self._dirty = True
        log.error("session database corrupt; moved aside", path=str(self.path), moved_to=str(aside), error=str(exc),
                  salvaged=len(self._by_id) - before)

    def _failed(self, exc: BaseException) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._dirty = True
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        message = f"{exc.__class__.__name__}: {exc}"
        if self.persist_error is None:
            log.error("session store write failed; sessions are kept in memory only", error=message, path=str(self.path))
        self.persist_error = message


def _connect(path: Path) -> sqlite3.Connection:
    return sqlitefile.connect(path, _SCHEMA, isolation_level=None, check_same_thread=False)


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
