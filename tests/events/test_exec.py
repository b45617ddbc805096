"""``exec``: a real child process gets the event on stdin and as AUTHD_* variables."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from structlog.testing import capture_logs

from authd.events import AUTH_SUCCEEDED, SESSION_CLOSED, EventBus, HandlerContext

from .conftest import CANARY, eventually, from_toml, login_event, run

RECORD = """\
import json, os, sys
data = {"stdin": sys.stdin.read(), "env": dict(os.environ), "argv": sys.argv[1:]}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(data) + "\\n")
"""

HANG = """\
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "300"])
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
time.sleep(300)
"""

FAIL = "import sys; sys.stderr.write('no route to pager\\n'); sys.exit(3)"


def script(ctx: HandlerContext, name: str, source: str) -> Path:
    path = ctx.base_dir / name
    path.write_text(source)
    return path


def exec_toml(*argv: object, extra: str = "") -> str:
    return f'[[handler]]\ntype = "exec"\ncommand = {json.dumps([str(a) for a in argv])}\n{extra}\n'


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper that may not be there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_the_command_gets_the_event_on_stdin_and_in_its_environment(ctx: HandlerContext) -> None:
    out = ctx.base_dir / "out.jsonl"
    record = script(ctx, "record.py", RECORD)
    os.environ["AUTHD_TEST_DAEMON_SECRET"] = "daemon-only"
    request = {
        "user": "alice", "password": CANARY, "service": "imap", "rhost": "192.0.2.7",
        "pid": 77, "uid": 1000, "gid": 100,
    }  # fmt: skip
    events = [
        login_event(AUTH_SUCCEEDED, request, session_id="sess-9", latency=0.5),
        login_event(SESSION_CLOSED, request, session_id="sess-9", reason="expired"),
    ]

    async def main() -> None:
        bus = EventBus()
        bus.set_handlers(from_toml(exec_toml(sys.executable, record, out, extra='env = {SITE = "lab"}'), ctx))
        await bus.start()
        for event in events:
            bus.emit(event)
        assert await bus.close(30) == 0

    try:
        run(main())
    finally:
        del os.environ["AUTHD_TEST_DAEMON_SECRET"]
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(r["stdin"]) for r in runs] == [e.to_dict() for e in events]
    env = runs[0]["env"]
    assert {k: v for k, v in env.items() if k.startswith("AUTHD_")} == {
        "AUTHD_EVENT": "auth.succeeded",
        "AUTHD_EVENT_ID": events[0].id,
        "AUTHD_TIME": str(events[0].time),
        "AUTHD_USER": "alice",
        "AUTHD_SERVICE": "imap",
        "AUTHD_RHOST": "192.0.2.7",
        "AUTHD_PID": "77",
        "AUTHD_UID": "1000",
        "AUTHD_GID": "100",
        "AUTHD_SESSION_ID": "sess-9",
        "AUTHD_LATENCY": "0.5",
    }
    assert runs[1]["env"]["AUTHD_REASON"] == "expired"
    assert env["SITE"] == "lab" and "PATH" in env
    assert "AUTHD_TEST_DAEMON_SECRET" not in env  # a clean environment, not the daemon's
    assert CANARY not in out.read_text()


def test_a_command_past_its_timeout_is_killed_with_its_children(ctx: HandlerContext) -> None:
    pids = ctx.base_dir / "pids"
    hang = script(ctx, "hang.py", HANG)

    async def main() -> None:
        bus = EventBus()
        bus.set_handlers(from_toml(exec_toml(sys.executable, hang, pids, extra="timeout = 1"), ctx))
        await bus.start()
        bus.emit(login_event(AUTH_SUCCEEDED, {"user": "alice"}))
        await eventually(lambda: bus.stats()["handlers"]["exec"]["timed_out"] == 1)
        assert await bus.close(10) == 0

    run(main())
    parent, child = map(int, pids.read_text().split())
    deadline = time.monotonic() + 20
    while (alive(parent) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(parent) and not alive(child)


def test_a_failing_command_is_counted_with_its_stderr(ctx: HandlerContext) -> None:
    async def main() -> None:
        bus = EventBus()
        bus.set_handlers(from_toml(exec_toml(sys.executable, "-c", FAIL), ctx))
        await bus.start()
        with capture_logs() as logs:
            bus.emit(login_event(AUTH_SUCCEEDED, {"user": "alice"}))
            assert await bus.close(30) == 0
        assert bus.stats()["handlers"]["exec"]["failed"] == 1
        (failure,) = [r for r in logs if r["event"] == "handler failed"]
        assert failure["error"].endswith("exited with status 3: no route to pager")

    run(main())
