"""``lastlog``: per user, the last successful and failed logins, in SQLite in the state dir.

Failures only update users who have logged in successfully before: ``auth.failed`` cannot tell
a wrong password from an unknown user, and rows for every name an attacker guesses would let
them grow the database without bound. Only ``auth.failed`` counts as a failure: every refused
login emits exactly one (a refusal while locked has ``reason = "locked_out"``), while
``auth.locked_out`` announces that one of those failures imposed a lock and is no login of its own.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from authd import sqlitefile
from authd.errors import ConfigError
from authd.events.handler import Handler
from authd.events.config import HandlerContext, LastlogConfig
from authd.events.model import AUTH_FAILED, AUTH_SUCCEEDED, Event

FILENAME = "lastlog.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lastlog (
    user TEXT PRIMARY KEY,
    last_success REAL,
    last_service TEXT,
    last_rhost TEXT,
    success_count INTEGER NOT NULL DEFAULT 0,
    last_failure REAL,
    last_failure_rhost TEXT,
    failure_count INTEGER NOT NULL DEFAULT 0
)
"""
_SUCCESS = """
INSERT INTO lastlog (user, last_success, last_service, last_rhost, success_count)
VALUES (?, ?, ?, ?, 1)
ON CONFLICT (user) DO UPDATE SET
    last_success = excluded.last_success, last_service = excluded.last_service,
    last_rhost = excluded.last_rhost, success_count = success_count + 1
"""
_FAILURE = """
UPDATE lastlog SET last_failure = ?, last_failure_rhost = ?, failure_count = failure_count + 1
WHERE user = ?
"""
_COLUMNS = (
    "user", "last_success", "last_service", "last_rhost", "success_count",
    "last_failure", "last_failure_rhost", "failure_count",
)  # fmt: skip


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating it, mode 0600) the lastlog database in WAL mode."""
    sqlitefile.prepare(path)
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(_SCHEMA)
    return db


class LastlogHandler(Handler):
    def __init__(self, path: Path, **base: Any) -> None:
        super().__init__(**base)
        self.path = path
        self._db: sqlite3.Connection | None = None

    def handle(self, event: Event) -> None:
        if event.user is None or event.name not in (AUTH_SUCCEEDED, AUTH_FAILED):
            return
        if self._db is None:
            self._db = connect(self.path)
        if event.name == AUTH_SUCCEEDED:
            self._db.execute(_SUCCESS, (event.user, event.time, event.service, event.rhost))
        else:
            self._db.execute(_FAILURE, (event.time, event.rhost, event.user))

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


def lastlog_lookup(state_dir: Path | str, user: str) -> dict[str, Any] | None:
    """The user's lastlog row (times are unix seconds), or None if they never logged in."""
    path = Path(state_dir) / FILENAME
    if not path.exists():
        return None
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        query = f"SELECT {', '.join(_COLUMNS)} FROM lastlog WHERE user = ?"
        row = db.execute(query, (user,)).fetchone()
    except sqlite3.OperationalError:  # the handler has not created the table yet
        return None
    finally:
        db.close()
    return dict(zip(_COLUMNS, row)) if row else None


def build(cfg: LastlogConfig, ctx: HandlerContext, where: str, **base: Any) -> LastlogHandler:
    state_dir = ctx.state_dir
    if state_dir.exists() and not (state_dir.is_dir() and os.access(state_dir, os.W_OK)):
        raise ConfigError(f"{where}: state dir {state_dir} is not a writable directory")
    return LastlogHandler(state_dir / FILENAME, **base)
