"""The SQLite files in the state dir: created 0600, WAL, checked on open, moved aside when corrupt.

Shared by the session and lockout stores, which both mirror in-memory state and must keep
authenticating whatever happens to their file, and by the handlers that keep a database. None
of them is ever opened through a symlink or in a directory another user controls (`prepare`).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

from . import securefs

BUSY_TIMEOUT = 0.1  # replies wait on the stores' commits: never wait long for another process's lock
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_COMPANIONS = ("-wal", "-shm", "-journal")


class Corrupt(sqlite3.DatabaseError):
    """The file is not a usable SQLite database; it gets moved aside."""


def prepare(path: Path, what: str = "daemon.state_dir") -> None:
    """Create the file 0600 in a trusted directory, before SQLite opens it by name.

    SQLite follows symlinks, for the database and for its `-wal`, `-shm` and `-journal`: so
    every one of them that exists must be a regular file of ours (`securefs.UnsafePath` if not).
    """
    securefs.make_dir(path.parent, what)
    for suffix in _COMPANIONS:
        securefs.check_existing(path.with_name(path.name + suffix), what)
    fd = securefs.open_file(path, os.O_RDWR | os.O_CREAT, 0o600, what)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def check(path: Path, what: str = "daemon.state_dir") -> None:
    """Before opening an existing database read-only: it and its companions must be ours."""
    for suffix in ("", *_COMPANIONS):
        securefs.check_existing(path.with_name(path.name + suffix), what)


def connect(path: Path, schema: str, **options: Any) -> sqlite3.Connection:
    """Open (creating it 0600) and check the database; `Corrupt` if it is not a usable one."""
    prepare(path)
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, **options)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        (check,) = db.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise Corrupt(f"integrity check failed: {check}")
        db.executescript(schema)
    except sqlite3.DatabaseError as exc:
        db.close()
        if isinstance(exc, Corrupt) or getattr(exc, "sqlite_errorcode", None) not in _CORRUPT_CODES:
            raise
        raise Corrupt(str(exc)) from exc
    return db


def move_aside(path: Path) -> Path:
    """Rename a corrupt database (with its WAL and shared memory) to `NAME.corrupt-TIME`."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            source.rename(aside.with_name(aside.name + suffix))
    return aside
