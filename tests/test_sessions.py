"""The session store in memory with a driven clock: how often a touch reaches the file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from authd.sessions import TOUCH_INTERVAL, SessionStore


def saved_last_seen(path: Path, session_id: str) -> float:
    with sqlite3.connect(path) as db:
        (value,) = db.execute("SELECT last_seen FROM sessions WHERE id = ?", (session_id,)).fetchone()
    return value


def test_touches_reach_the_file_at_most_once_per_interval(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions.db")
    store.open()
    session, token = store.create(user="alice", groups=(), service="web", rhost=None, ttl=3600, idle_timeout=60)
    start = session.created
    for step in range(1, 10):  # nine lookups within one interval: memory moves, the file does not
        now = start + step * TOUCH_INTERVAL / 10
        assert store.lookup(token, now=now) is session and session.last_seen == now
    assert saved_last_seen(store.path, session.id) == start
    later = start + TOUCH_INTERVAL
    assert store.lookup(token, now=later) is session
    assert saved_last_seen(store.path, session.id) == later
    assert store.lookup(token, now=later + 0.5, touch=False) is session and session.last_seen == later
    store.close()

    reopened = SessionStore(tmp_path / "sessions.db")  # a restart sees at most one interval less
    reopened.open()
    assert reopened.lookup(token, touch=False, now=later).last_seen == later  # type: ignore[union-attr]
    reopened.close()


def test_idle_expiry_follows_the_in_memory_touch(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions.db")
    store.open()
    session, token = store.create(user="alice", groups=(), service="web", rhost=None, ttl=3600, idle_timeout=10)
    t = session.created
    for _ in range(5):
        t += 9
        assert store.lookup(token, now=t) is session, "each touch pushes the idle expiry out"
    assert store.lookup(token, now=t + 10) is None
    store.close()
