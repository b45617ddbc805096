"""max_sessions_per_user: the store's decision, on a real SQLite file (the daemon side is in tests/abuse)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from authd import config
from authd.errors import ConfigError
from authd.sessions import Session, SessionLimitReached, SessionStore


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    store = SessionStore(tmp_path / "sessions.db")
    store.open()
    return store


def issue(store: SessionStore, user: str = "alice", service: str = "login", *, limit: int = 3,
          evict_oldest: bool = False) -> tuple[Session, str, list[Session]]:
    evicted = store.make_room(user=user, service=service, limit=limit, evict_oldest=evict_oldest)
    session, token = store.create(user=user, groups=(), service=service, rhost=None, ttl=3600.0, idle_timeout=0.0)
    return session, token, evicted


def test_refuse_keeps_the_sessions_a_user_has(store: SessionStore) -> None:
    first = [issue(store)[1] for _ in range(3)]
    with pytest.raises(SessionLimitReached):
        issue(store)
    assert all(store.lookup(token) for token in first)
    assert len(store.list("alice")) == 3
    issue(store, "bob")  # per user ...
    issue(store, service="imap")  # ... and per service


def test_evict_oldest_ends_the_oldest_session(store: SessionStore) -> None:
    issued = [issue(store, evict_oldest=True) for _ in range(3)]
    assert all(evicted == [] for _, _, evicted in issued)
    newest, _, evicted = issue(store, evict_oldest=True)
    assert evicted == [issued[0][0]]
    assert store.lookup(issued[0][1]) is None, "the evicted token no longer works"
    assert {s.id for s in store.list("alice")} == {issued[1][0].id, issued[2][0].id, newest.id}


def test_a_lowered_limit_evicts_down_to_it(store: SessionStore) -> None:
    issued = [issue(store, limit=10)[0] for _ in range(6)]
    _, _, evicted = issue(store, limit=2, evict_oldest=True)
    assert evicted == issued[:5]
    assert len(store.list("alice")) == 2


def test_only_live_sessions_count(store: SessionStore) -> None:
    stale, _, _ = issue(store)
    stale.created -= 7200  # past its 3600 s TTL, waiting for the sweeper
    issue(store)
    issue(store)
    issue(store)  # the stale one does not count, and is left for the sweeper to report
    with pytest.raises(SessionLimitReached):
        issue(store)
    assert [s.id for s in store.expire()] == [stale.id]


def test_logout_and_revoke_make_room(store: SessionStore) -> None:
    tokens = [issue(store)[1] for _ in range(3)]
    store.remove_token(tokens[0])
    issue(store)
    store.revoke(user="alice")
    for _ in range(3):
        issue(store)


def test_the_count_survives_a_restart(tmp_path: Path, store: SessionStore) -> None:
    for _ in range(3):
        issue(store)
    store.close()
    reopened = SessionStore(tmp_path / "sessions.db")
    reopened.open()
    with pytest.raises(SessionLimitReached):
        issue(reopened)
    reopened.close()


def test_service_defaults_and_validation() -> None:
    service = config.parse('[[service]]\nname = "x"\n').service[0]
    assert (service.max_sessions_per_user, service.session_limit) == (100, "evict_oldest")
    for bad, message in [("max_sessions_per_user = 0", "service[0].max_sessions_per_user: Expected `int` >= 1"),
                         ('session_limit = "kick"', "service[0].session_limit: Invalid enum value")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            config.parse(f'[[service]]\nname = "x"\n{bad}\n')
