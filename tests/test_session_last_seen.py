"""A lookup's `last_seen` is written behind: batched, yet on disk after the sweep and on close."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from authd.sessions import SessionStore


def persisted_last_seen(path: Path, session_id: str) -> float:
    db = sqlite3.connect(path)
    try:
        (seen,) = db.execute("SELECT last_seen FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return float(seen)
    finally:
        db.close()


def open_store(path: Path) -> SessionStore:
    store = SessionStore(path)
    store.open()
    return store


def test_lookups_between_writes_are_batched_and_memory_stays_exact(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    store = open_store(path)
    session, token = store.create(user="alice", groups=(), service="login", rhost=None, ttl=3600.0, idle_timeout=600.0)
    first = store.lookup(token)  # the first lookup is written at once
    assert first is not None and persisted_last_seen(path, session.id) == first.last_seen
    later = [store.lookup(token) for _ in range(100)]  # within LAST_SEEN_EVERY of it: held back
    newest = later[-1]
    assert newest is not None and newest.last_seen >= first.last_seen
    assert store.lookup(token, touch=False).last_seen == newest.last_seen  # type: ignore[union-attr]
    store.expire()  # the periodic sweep writes what was held back
    assert persisted_last_seen(path, session.id) == newest.last_seen
    store.close()


def test_close_writes_the_held_back_last_seen(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    store = open_store(path)
    session, token = store.create(user="alice", groups=(), service="login", rhost=None, ttl=3600.0, idle_timeout=600.0)
    for _ in range(10):
        store.lookup(token)
    last = store.lookup(token)
    assert last is not None
    store.close()  # drain and SIGTERM end here
    reopened = open_store(path)
    found = reopened.lookup(token, touch=False)
    assert found is not None and found.last_seen == last.last_seen
    reopened.close()


def test_a_held_back_last_seen_of_a_removed_session_does_not_revive_it(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    store = open_store(path)
    _, token = store.create(user="alice", groups=(), service="login", rhost=None, ttl=3600.0, idle_timeout=600.0)
    store.lookup(token)
    store.lookup(token)  # held back
    assert store.remove_token(token) is not None
    store.close()
    assert open_store(path).lookup(token) is None
