"""Bounded state against the running daemon: lockout keys, sessions per user, one rhost per host.

The decisions are unit-tested in tests/lockout/test_cap.py, tests/lockout/test_rhost.py and
tests/test_session_limit.py; here each bound is shown through the real socket.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from authd.client import ReplyError

from ..daemon import PASSWORD, Daemon, wait_for
from .helpers import counters, lockout_table

AUDIT = '\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n'


def fail_names(d: Daemon, names: list[str]) -> list[str]:
    """One wrong password for each name, ten at a time on one connection; the error codes.

    Ten, not all: keys with an attempt in PAM cannot be evicted, so more names in flight at
    once than `max_keys` would be refused for want of room (tested in tests/lockout/test_cap.py).
    """

    async def run() -> list[str]:
        async with d.aclient() as client:

            async def one(name: str) -> str:
                try:
                    await client.auth(name, "a-guess", "login", open_session=False)
                except ReplyError as exc:
                    return exc.code
                return "ok"

            codes = []
            for start in range(0, len(names), 10):
                codes += await asyncio.gather(*(one(name) for name in names[start:start + 10]))
            return codes

    return asyncio.run(run())


def test_a_flood_of_user_names_stays_within_max_keys_and_cannot_lift_a_lock(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(lockout_table(user="{ max_failures = 3, lock_time = 600.0 }", rhost="{ max_failures = 0 }",
                                  max_keys="20")).start()
    assert fail_names(d, ["alice-1", "alice-2", "alice-3"]) == ["auth_failed"] * 3  # other names, not locked
    for i in range(3):
        assert d.auth("alice", f"wrong-{i}")["error"] == "auth_failed"
    assert d.auth("alice")["error"] == "locked_out"

    assert set(fail_names(d, [f"flood-{i:04d}" for i in range(300)])) == {"auth_failed"}
    assert d.auth("alice")["error"] == "locked_out", "the lock outlived the flood"
    status = d.call("status")["lockout"]
    assert status["keys"] <= 20 and status["evicted"] >= 283 and status["refused_full"] == 0, status
    rows = d.call("lockouts")["lockouts"]
    assert len(rows) <= 20 and ("alice", True) in [(r["key"], r["locked"]) for r in rows]
    assert d.auth("bob")["ok"], "a real user still logs in"


def test_sessions_per_user_refused_past_the_limit(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon('max_sessions_per_user = 3\nsession_limit = "refuse"\n').start()
    tokens = [d.auth()["session"]["token"] for _ in range(3)]
    refused = d.auth()
    assert (refused["ok"], refused["error"]) == (False, "session_limit")
    assert "alice" not in refused["message"] and "3" not in refused["message"]
    assert all(d.call("session", token=token)["ok"] for token in tokens), "the sessions she has are kept"
    assert d.auth("bob")["ok"] and d.auth(open_session=False)["ok"]
    assert d.call("logout", token=tokens[0])["ok"]
    assert d.auth()["ok"], "a logout makes room"
    assert counters(d)["auth:session_limit"] == 1


def test_sessions_per_user_evict_the_oldest(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon('max_sessions_per_user = 2\nsession_limit = "evict_oldest"\n' + AUDIT).start()
    first, second, third = (d.auth()["session"] for _ in range(3))
    assert d.call("session", token=first["token"])["error"] == "invalid_session"
    assert d.call("session", token=second["token"])["ok"] and d.call("session", token=third["token"])["ok"]
    assert [s["id"] for s in d.call("sessions", user="alice")["sessions"]] == [second["id"], third["id"]]

    def closed() -> list[dict]:
        path = d.root / "audit.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e for e in map(json.loads, lines) if e["name"] == "session.closed"]

    (event,) = wait_for(closed, 10, what="session.closed")
    assert (event["session_id"], event["reason"], event["user"]) == (first["id"], "evicted", "alice")


def test_rhost_spellings_are_refused_or_counted_as_one_host(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(lockout_table(user="{ max_failures = 0 }", rhost="{ max_failures = 3, lock_time = 600.0 }")).start()
    for odd in ("198.051.100.007", "3325256711", "0xc6.0x33.0x64.7"):
        reply = d.auth(rhost=odd)
        assert reply["error"] == "bad_request", odd
        assert odd not in reply["message"] and "051" not in reply["message"]
    for i in range(3):  # three addresses of one IPv6 /64
        assert d.auth("alice", f"wrong-{i}", rhost=f"2001:db8:7:8::{i + 1}")["error"] == "auth_failed"
    assert d.auth(rhost="2001:db8:7:8:ffff::99")["error"] == "locked_out"
    assert d.auth(rhost="2001:db8:7:9::1")["ok"], "the next /64 is another host"
    rows = d.call("lockouts")["lockouts"]
    assert [(r["scope"], r["key"], r["locked"]) for r in rows] == [("rhost", "2001:db8:7:8::/64", True)]
    assert d.call("unlock", key="2001:db8:7:8::1", scope="rhost")["ok"]
    assert d.auth(rhost="2001:db8:7:8::1")["ok"]
    assert PASSWORD not in d.output()
