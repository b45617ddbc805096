"""``audit``: one JSON line per event, mode 0600, a fresh file after logrotate + SIGHUP."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from authd.events import AUTH_FAILED, AUTH_SUCCEEDED, SESSION_CLOSED, EventBus, HandlerContext

from .conftest import CANARY, eventually, from_toml, login_event, run

REQUEST = {
    "user": "alice", "password": CANARY, "service": "imap", "rhost": "192.0.2.7",
    "pid": 4242, "uid": 1000, "gid": 1000,
}  # fmt: skip


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_audit_lines_for_success_failure_logout_and_rotation(ctx: HandlerContext) -> None:
    path = ctx.base_dir / "log" / "audit.jsonl"  # log/ is created on the first event

    async def main() -> None:
        bus = EventBus()
        bus.set_handlers(from_toml('[[handler]]\ntype = "audit"\npath = "log/audit.jsonl"\n', ctx))
        await bus.start()
        first = [
            login_event(AUTH_SUCCEEDED, REQUEST, session_id="sess-1", latency=0.012),
            login_event(AUTH_FAILED, REQUEST, reason="auth_failed", latency=2.0),
            login_event(SESSION_CLOSED, REQUEST, session_id="sess-1", reason="logout"),
        ]
        for event in first:
            bus.emit(event)
        await eventually(lambda: len(lines(path)) == 3)
        assert lines(path) == [e.to_dict() for e in first]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

        os.rename(path, path.with_suffix(".jsonl.1"))  # logrotate, then SIGHUP
        bus.reopen()
        after = login_event(AUTH_SUCCEEDED, REQUEST, session_id="sess-2")
        bus.emit(after)
        assert await bus.close(10) == 0
        assert lines(path.with_suffix(".jsonl.1")) == [e.to_dict() for e in first]
        assert lines(path) == [after.to_dict()]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert CANARY not in path.read_text() + path.with_suffix(".jsonl.1").read_text()

    run(main())
