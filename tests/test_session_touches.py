"""Touches (lookups moving `last_seen`) reach the session file together, not one write each."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from authd.sessions import SessionStore


def on_disk(path: Path, session_id: str) -> float | None:
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT last_seen FROM sessions WHERE id = ?", (session_id,)).fetchone()
    return None if row is None else row[0]


def opened(path: Path, **kwargs: float) -> tuple[SessionStore, list[int]]:
    """A store on `path`, and a list that counts the jobs it queues for its file."""
    store = SessionStore(path, **kwargs)
    store.open()
    store.settle()
    writes: list[int] = []
    queue = store._file.write
    store._file.write = lambda job: (writes.append(1), queue(job))[1]  # type: ignore[method-assign]
    return store, writes


def test_a_thousand_lookups_in_a_turn_are_one_write_of_the_last_time(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"

    async def scenario() -> None:
        store, writes = opened(path, touch_interval=0.0)
        session, token = store.create(user="alice", groups=(), service="login", rhost=None, ttl=3600.0, idle_timeout=600.0)
        created = session.created
        await store.durable()
        writes.clear()
        for _ in range(1000):
            assert store.lookup(token) is session
        await store.durable()
        assert writes == [] and on_disk(path, session.id) == created  # not yet: memory has it
        for _ in range(2):  # the timer (interval 0) is due in the next turn, after this task's step in it
            await asyncio.sleep(0)
        await store.durable()
        assert writes == [1] and on_disk(path, session.id) == session.last_seen > created
        store.close()

    asyncio.run(scenario())


def test_a_clean_close_writes_pending_touches_and_a_removed_session_is_not_touched(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"

    async def scenario() -> tuple[str, float, str]:
        store, _ = opened(path, touch_interval=3600.0)
        kept, token = store.create(user="alice", groups=(), service="login", rhost=None, ttl=7200.0, idle_timeout=600.0)
        gone, other = store.create(user="bob", groups=(), service="login", rhost=None, ttl=7200.0, idle_timeout=600.0)
        store.lookup(token)
        store.lookup(other)
        store.remove_token(other)
        store.close()  # well before the hour is up
        return kept.id, kept.last_seen, gone.id

    kept, seen, gone = asyncio.run(scenario())
    assert on_disk(path, kept) == seen
    assert on_disk(path, gone) is None


def test_without_an_event_loop_a_touch_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    store, writes = opened(path)
    session, token = store.create(user="alice", groups=(), service="login", rhost=None, ttl=3600.0, idle_timeout=600.0)
    writes.clear()
    store.lookup(token)
    assert writes == [1]
    store.settle()
    assert on_disk(path, session.id) == session.last_seen
    store.close()
