"""``lastlog``: per-user last success/failure in SQLite in the state dir, and its lookup."""

from __future__ import annotations

import sqlite3

from authd.events import (
    AUTH_FAILED,
    AUTH_LOCKED_OUT,
    AUTH_SUCCEEDED,
    SESSION_OPENED,
    EventBus,
    HandlerContext,
    lastlog_lookup,
)

from .conftest import CANARY, eventually, from_toml, login_event, run


def test_lastlog_rows_and_lookup(ctx: HandlerContext) -> None:
    assert lastlog_lookup(ctx.state_dir, "alice") is None  # no database yet

    async def main() -> list:
        bus = EventBus()
        bus.set_handlers(from_toml('[[handler]]\ntype = "lastlog"\n', ctx))
        await bus.start()
        alice = {"user": "alice", "password": CANARY, "service": "imap"}
        events = [
            login_event(AUTH_SUCCEEDED, alice, rhost="192.0.2.1"),
            login_event(SESSION_OPENED, alice, rhost="192.0.2.1", session_id="s"),
            login_event(AUTH_FAILED, alice, rhost="198.51.100.9", reason="auth_failed"),
            login_event(AUTH_SUCCEEDED, {**alice, "service": "smtp"}, rhost="192.0.2.2"),
            login_event(AUTH_FAILED, alice, rhost="198.51.100.9", reason="auth_failed"),
            # the daemon announces the lock this failure imposed: not a further failure
            login_event(AUTH_LOCKED_OUT, alice, rhost="198.51.100.9", reason="user locked"),
            login_event(AUTH_FAILED, alice, rhost="203.0.113.5", reason="locked_out"),
            login_event(AUTH_FAILED, {"user": "mallory", "password": CANARY, "service": "imap"}),
        ]
        for event in events:
            bus.emit(event)
        assert await bus.close(10) == 0
        return events

    events = run(main())
    row = lastlog_lookup(ctx.state_dir, "alice")
    assert row == {
        "user": "alice",
        "last_success": events[3].time,
        "last_service": "smtp",
        "last_rhost": "192.0.2.2",
        "success_count": 2,
        "last_failure": events[6].time,
        "last_failure_rhost": "203.0.113.5",
        "failure_count": 3,
    }
    assert lastlog_lookup(ctx.state_dir, "mallory") is None  # guessed names leave no rows
    db = sqlite3.connect(ctx.state_dir / "lastlog.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("SELECT count(*) FROM lastlog").fetchone() == (1,)
    db.close()
    assert (ctx.state_dir / "lastlog.sqlite3").stat().st_mode & 0o777 == 0o600


def test_lookup_while_the_handler_holds_the_database(ctx: HandlerContext) -> None:
    async def main() -> None:
        bus = EventBus()
        bus.set_handlers(from_toml('[[handler]]\ntype = "lastlog"\nevents = ["auth.*"]\n', ctx))
        await bus.start()
        bus.emit(login_event(AUTH_SUCCEEDED, {"user": "bob", "service": "imap"}))
        await eventually(lambda: lastlog_lookup(ctx.state_dir, "bob") is not None)
        assert lastlog_lookup(ctx.state_dir, "bob")["success_count"] == 1  # type: ignore[index]
        await bus.close(10)

    run(main())
