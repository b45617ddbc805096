"""Idle and hard expiry of sessions, on a clock the tests move (the daemon's sweeper is in
`tests/events/test_daemon_handlers.py`, where `session.closed` reaches the audit log)."""

from __future__ import annotations

from pathlib import Path

from authd.sessions import Session, SessionStore

from .clock import ManualClock


def opened(path: Path, clock: ManualClock) -> SessionStore:
    store = SessionStore(path, clock=clock, retry_clock=clock)
    store.open()
    return store


def issue(store: SessionStore, user: str, *, ttl: float = 3.0, idle_timeout: float = 1.0) -> tuple[Session, str]:
    return store.create(user=user, groups=(), service="login", rhost=None, ttl=ttl, idle_timeout=idle_timeout)


def test_activity_pushes_idle_expiry_out_up_to_the_ttl(tmp_path: Path) -> None:
    clock = ManualClock()
    store = opened(tmp_path / "sessions.db", clock)
    idle, idle_token = issue(store, "alice", ttl=2.5)
    kept, kept_token = issue(store, "bob", ttl=2.5)
    for _ in range(4):
        clock.now += 0.5
        assert store.lookup(kept_token) is kept, "each check is activity"
    assert store.lookup(idle_token) is None, "idle for 2 s with idle_timeout = 1"
    assert kept.last_seen + 1.0 > kept.created + 2.5
    assert kept.expires_at == kept.created + 2.5, "the ttl caps what activity earns"
    clock.now = kept.created + 2.5 - 0.001
    assert store.lookup(kept_token) is kept
    clock.now = kept.created + 2.5
    assert store.lookup(kept_token) is None, "past the ttl, however active"
    assert store.list() == []
    store.settle()
    store.close()


def test_a_lookup_without_touch_is_not_activity(tmp_path: Path) -> None:
    clock = ManualClock()
    store = opened(tmp_path / "sessions.db", clock)
    session, token = issue(store, "alice")
    clock.now += 0.9
    assert store.lookup(token, touch=False) is session
    clock.now += 0.1
    assert store.lookup(token) is None
    store.close()


def test_no_idle_timeout_means_only_the_ttl(tmp_path: Path) -> None:
    clock = ManualClock()
    store = opened(tmp_path / "sessions.db", clock)
    session, token = issue(store, "alice", idle_timeout=0.0)
    clock.now += 2.9
    assert store.lookup(token) is session
    clock.now += 0.1
    assert store.lookup(token) is None
    store.close()


def test_the_sweep_removes_expired_sessions_from_memory_and_file(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    clock = ManualClock()
    store = opened(path, clock)
    idle, _ = issue(store, "alice")
    ttl, ttl_token = issue(store, "bob", ttl=2.0, idle_timeout=0.0)
    live, live_token = issue(store, "carol", ttl=60.0, idle_timeout=0.0)
    clock.now += 1.0
    assert store.expire() == [idle]
    assert store.lookup(ttl_token) is ttl
    clock.now += 1.0
    assert store.remove_token(ttl_token) is None, "expired, not yet swept: it cannot be logged out"
    assert store.expire() == [ttl], "so the sweep, not the logout, reports it"
    assert [s.id for s in store.all()] == [live.id]
    store.close()
    clock.now -= 2.0  # even at the time they were live, the file no longer has them
    reopened = opened(path, clock)
    assert [s.id for s in reopened.all()] == [live.id]
    reopened.close()


def test_sessions_that_expired_while_stopped_are_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    clock = ManualClock()
    store = opened(path, clock)
    issue(store, "alice")
    _, live_token = issue(store, "bob", ttl=60.0, idle_timeout=30.0)
    store.close()
    clock.now += 10.0
    reopened = opened(path, clock)
    assert [s.user for s in reopened.all()] == ["bob"]
    assert reopened.lookup(live_token) is not None
    reopened.close()
