"""The canary password of a login reaches no handler's output, state file or log line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from structlog.testing import capture_logs

from authd.events import (
    AUTH_FAILED,
    AUTH_LOCKED_OUT,
    AUTH_SUCCEEDED,
    SESSION_CLOSED,
    SESSION_OPENED,
    Event,
    EventBus,
    HandlerContext,
)

from .conftest import CANARY, HttpReceiver, SmtpServer, from_toml, login_event, run

RECORD = """\
import os, sys
with open(sys.argv[1], "a") as f:
    f.write(sys.stdin.read() + repr(sorted(os.environ.items())) + "\\n")
"""


def test_no_handler_output_contains_the_password(
    ctx: HandlerContext,
    tmp_path: Path,
    http_receiver: HttpReceiver,
    smtp_server: SmtpServer,
    plugin_path: Path,
) -> None:
    import authd_test_plugin as plugin

    plugin.RECEIVED.clear()
    http_receiver.statuses = [500]  # one retry, so failure paths log too
    exec_out = tmp_path / "exec.out"
    (tmp_path / "record.py").write_text(RECORD)
    toml = f"""
[[handler]]
type = "audit"
path = "audit.jsonl"

[[handler]]
type = "lastlog"

[[handler]]
type = "webhook"
url = "{http_receiver.url}"
secret = "hmac-key"
backoff = 0.01

[[handler]]
type = "mail"
host = "{smtp_server.host}"
port = {smtp_server.port}
from = "authd@example.org"
to = "{{user}}@example.org"
subject = "Welcome {{user}}"
body = "{{user}} {{service}} {{rhost}} {{time}} {{event}} {{session_id}} {{reason}}"

[[handler]]
type = "exec"
command = [{json.dumps(sys.executable)}, "record.py", {json.dumps(str(exec_out))}]

[[handler]]
type = "python"
callable = "authd_test_plugin:record"

[[handler]]
name = "raises"
type = "python"
callable = "json:loads"
"""
    # What the daemon sees from a client, with the password the event must never carry.
    request = {
        "id": 1, "op": "auth", "user": "alice", "password": CANARY,
        "service": "imap", "rhost": "192.0.2.7",
    }  # fmt: skip
    events = [
        login_event(AUTH_FAILED, request, reason="auth_failed", pid=10, uid=1000, gid=1000, latency=2.0),
        login_event(AUTH_SUCCEEDED, request, pid=10, uid=1000, gid=1000, latency=0.1),
        login_event(SESSION_OPENED, request, session_id="sid-1"),
        login_event(AUTH_LOCKED_OUT, request),
        login_event(SESSION_CLOSED, request, session_id="sid-1", reason="logout"),
    ]

    async def main() -> EventBus:
        bus = EventBus()
        bus.set_handlers(from_toml(toml, ctx))
        await bus.start()
        for event in events:
            bus.emit(event)
        bus.reopen()
        assert await bus.close(60) == 0
        return bus

    with capture_logs() as logs:
        bus = run(main())
    totals = bus.stats()["totals"]
    assert totals["delivered"] >= 5 * 6 and totals["failed"] == 5  # json.loads(Event) raises

    outputs = {
        "audit": (tmp_path / "audit.jsonl").read_bytes(),
        "state": b"".join(p.read_bytes() for p in ctx.state_dir.iterdir()),
        "webhook": b"".join(r.body + repr(r.headers).encode() for r in http_receiver.requests),
        "mail": b"".join(e.content for e in smtp_server.mailbox.envelopes),
        "exec": exec_out.read_bytes(),
        "python": repr(plugin.RECEIVED).encode() + b"".join(e.to_json() for _, e in plugin.RECEIVED),
        "logs": repr(logs).encode(),
    }
    assert len(http_receiver.requests) == 6 and len(smtp_server.mailbox.envelopes) == 1
    assert b"alice" in outputs["audit"] and b"alice" in outputs["exec"] and b"alice" in outputs["mail"]
    for name, data in outputs.items():
        assert CANARY.encode() not in data, name
    assert "password" not in Event.__struct_fields__
