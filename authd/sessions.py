"""Sessions: opaque tokens out, only their SHA-256 kept; an in-memory table backed by SQLite.

The table answers lookups from memory; every change is written through to SQLite in WAL mode
so a restart, or a `kill -9`, keeps every session that was issued. A write that fails (disk
full, read-only) leaves the session valid in memory and is reported, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("authd.sessions")

TOKEN_BYTES = 32  # 256 bits

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


@dataclass(slots=True)
class Session:
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

    def public(self) -> dict[str, Any]:
        """What clients, dumps and logs may see: never the token or its hash."""
        return {
            "id": self.id,
            "user": self.user,
            "groups": list(self.groups),
            "service": self.service,
            "rhost": self.rhost,
            "created": self.created,
            "last_seen": self.last_seen,
            "expires_at": self.expires_at,
        }


class SessionStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_hash: dict[bytes, Session] = {}
        self._by_id: dict[str, Session] = {}
        self._db: sqlite3.Connection | None = None
        self.persist_error: str | None = None

    def open(self) -> None:
        self._connect()
        now = time.time()
        assert self._db is not None
        rows = self._db.execute(
            "SELECT id, token_hash, user, groups, service, rhost, created, last_seen, ttl, idle_timeout FROM sessions"
        ).fetchall()
        for row in rows:
            session = Session(row[0], row[1], row[2], tuple(filter(None, row[3].split("\n"))), *row[4:])
            if not session.expired(now):
                self._add(session)
        self._write("DELETE FROM sessions WHERE id NOT IN (SELECT value FROM json_each(?))", (_json_ids(self._by_id),))
        log.info("sessions loaded", count=len(self._by_id), path=str(self.path))

    def _connect(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.touch(mode=0o600, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

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
        self._write(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (session.id, session.token_hash, user, "\n".join(session.groups), service, rhost, now, now, ttl, idle_timeout),
        )
        return session, token

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
            self._write("UPDATE sessions SET last_seen = ? WHERE id = ?", (now, session.id))
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

    def expire(self, now: float | None = None) -> list[Session]:
        now = time.time() if now is None else now
        doomed = [s for s in self._by_id.values() if s.expired(now)]
        self._remove(doomed)
        return doomed

    def _add(self, session: Session) -> None:
        self._by_hash[session.token_hash] = session
        self._by_id[session.id] = session

    def _remove(self, sessions: list[Session]) -> None:
        if not sessions:
            return
        for session in sessions:
            self._by_hash.pop(session.token_hash, None)
            self._by_id.pop(session.id, None)
        self._write("DELETE FROM sessions WHERE id IN (SELECT value FROM json_each(?))", (_json_ids(s.id for s in sessions),))

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        """Write one change through; after a fault, rewrite the table from memory instead."""
        try:
            if self._db is None or self.persist_error is not None:
                self._connect()
                self._resync()
            else:
                self._db.execute(sql, params)
        except (sqlite3.Error, OSError) as exc:
            if self.persist_error is None:
                log.error("session store write failed; sessions are kept in memory only", error=str(exc), path=str(self.path))
            self.persist_error = f"{exc.__class__.__name__}: {exc}"
            self.close()
        else:
            if self.persist_error is not None:
                log.info("session store writable again", path=str(self.path), sessions=len(self._by_id))
                self.persist_error = None

    def _resync(self) -> None:
        assert self._db is not None
        rows = [
            (s.id, s.token_hash, s.user, "\n".join(s.groups), s.service, s.rhost, s.created, s.last_seen, s.ttl, s.idle_timeout)
            for s in self._by_id.values()
        ]
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM sessions")
            self._db.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def _json_ids(ids: Iterable[str]) -> str:
    return json.dumps(list(ids))
