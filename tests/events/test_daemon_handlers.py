"""Every built-in handler end to end against a real authd subprocess (docs/handlers.md).

Real PAM (pam_wrapper + pam_matrix), the daemon's real socket and signals, and real servers on
127.0.0.1 (an HTTP receiver, aiosmtpd). Python handlers that misbehave live in
``tests/events/probes.py`` and are imported by the daemon itself. Tests that log in with the
canary password check that it reached no output; the last one does so with every handler at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from authd.client import Client, ReplyError
from authd.events import EVENT_NAMES

from ..daemon import BASE_POLICY, CANARY, PASSWORD, Daemon, scan_for, wait_for
from .conftest import PLUGIN_DIR, HttpReceiver, SmtpServer
from .probes import gate, read_records, release

REPO = Path(__file__).resolve().parents[2]
PROBES = "tests.events.probes"
LOCK_AFTER_2 = "\n[lockout.user]\nmax_failures = 2\n"
SHORT_SERVICE = '\n[[service]]\nname = "short"\npam_service = "authd-test"\nsession_ttl = 1.0\n'

MakeDaemon = Callable[..., Daemon]


def handlers(d: Daemon) -> dict[str, dict[str, int]]:
    return d.call("status")["events"]["handlers"]


def counter(d: Daemon, name: str, key: str = "delivered") -> int:
    return handlers(d).get(name, {}).get(key, 0)


def wait_counter(d: Daemon, name: str, count: int, key: str = "delivered") -> None:
    wait_for(lambda: counter(d, name, key) >= count, what=f"{name}.{key} >= {count}")


def recorder(name: str, path: str, events: str = '["*"]', delay: float = 0.0, gate: str = "", **extra: Any) -> str:
    """A `python` handler table for the probe Recorder."""
    more = "".join(f"{key} = {value}\n" for key, value in extra.items())
    return (
        f'\n[[handler]]\ntype = "python"\nname = "{name}"\ncallable = "{PROBES}:Recorder"\n'
        f'factory = true\noptions = {{ path = "{path}", delay = {delay}, gate = "{gate}" }}\nevents = {events}\n{more}'
    )


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["name"] for e in events]


def handlers_failed_in_log(d: Daemon) -> list[dict[str, Any]]:
    return [r for r in d.log_lines() if r.get("event") in ("handler failed", "handler raised", "handler timed out")]


def assert_no_canary(d: Daemon, *texts: str | bytes) -> None:
    assert CANARY not in d.output()
    assert scan_for(CANARY, d.root) == []
    for text in texts:
        assert (CANARY.encode() if isinstance(text, bytes) else CANARY) not in text


# --- audit ---------------------------------------------------------------------------------


def test_audit_records_the_whole_story(make_daemon: MakeDaemon) -> None:
    roles = '\n[roles.reader]\nusers = ["alice"]\npermissions = ["doc.read"]\n'
    d = make_daemon(SHORT_SERVICE + LOCK_AFTER_2 + roles + '\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n').start()
    audit = d.root / "audit.jsonl"
    ok = d.auth("alice", rhost="192.0.2.7")
    assert d.call("check", token=ok["session"]["token"], permission="doc.read")["allowed"]
    assert not d.call("check", token=ok["session"]["token"], permission="doc.write")["allowed"]
    assert d.auth("alice", CANARY, rhost="192.0.2.7")["error"] == "auth_failed"
    assert d.call("logout", token=ok["session"]["token"])["ok"]
    revoked = d.auth("bob")["session"]
    assert d.call("revoke", user="bob")["revoked"] == [revoked["id"]]
    assert [d.auth("mallory", pw)["error"] for pw in ("guess-1", "guess-2", "guess-3")] == \
        ["auth_failed", "auth_failed", "locked_out"]
    short = d.auth("bob", service="short")["session"]
    wait_for(lambda: any(e.get("reason") == "expired" for e in audit_lines(audit)), what="the sweeper's session.closed")

    d.kill(signal.SIGHUP)
    wait_for(lambda: "policy.reloaded" in names(audit_lines(audit)), what="policy.reloaded")
    d.write_policy(d.policy + "bogus = 1\n")
    d.kill(signal.SIGHUP)
    wait_for(lambda: "policy.reload_failed" in names(audit_lines(audit)), what="policy.reload_failed")
    assert d.stop() == 0

    lines = audit_lines(audit)
    seen = names(lines)
    assert seen[0] == "daemon.started" and seen[-2:] == ["daemon.draining", "daemon.stopped"]
    by_name = {e["name"]: e for e in lines if e.get("user") == "alice" or "user" not in e}
    me = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    succeeded = by_name["auth.succeeded"]
    assert succeeded.items() >= {"user": "alice", "service": "login", "rhost": "192.0.2.7",
                                 "session_id": ok["session"]["id"], "generation": 1, **me}.items()
    assert succeeded["latency"] >= 0 and len(succeeded["id"]) == 32
    assert by_name["auth.failed"].items() >= {"user": "alice", "reason": "auth_failed", "rhost": "192.0.2.7", **me}.items()
    assert by_name["session.opened"]["session_id"] == ok["session"]["id"]
    assert [e for e in lines if e["name"] == "authz.denied"] == [by_name["authz.denied"]], "only refusals are events"
    assert by_name["authz.denied"].items() >= {"user": "alice", "service": "login", "rhost": "192.0.2.7", "permission": "doc.write",
                                               "reason": "default", "session_id": ok["session"]["id"], "generation": 1, **me}.items()
    closed = [e for e in lines if e["name"] == "session.closed"]
    assert {(e["session_id"], e["reason"]) for e in closed} == {
        (ok["session"]["id"], "logout"), (revoked["id"], "revoked"), (short["id"], "expired")}
    mallory = [(e["name"], e["reason"]) for e in lines if e.get("user") == "mallory"]
    assert mallory == [("auth.failed", "auth_failed"), ("auth.locked_out", "user locked"),
                       ("auth.failed", "auth_failed"), ("auth.failed", "locked_out")]
    assert by_name["policy.reloaded"]["generation"] == 2
    assert "handler[0].bogus" in by_name["policy.reload_failed"]["reason"]
    assert len({e["id"] for e in lines}) == len(lines), "event ids are unique"
    assert audit.stat().st_mode & 0o777 == 0o600
    assert set(seen) == set(EVENT_NAMES)
    for secret in (ok["session"]["token"], revoked["token"], short["token"]):
        assert secret not in audit.read_text()
    assert_no_canary(d)


# --- lastlog -------------------------------------------------------------------------------


def test_lastlog_shown_by_authctl(make_daemon: MakeDaemon) -> None:
    d = make_daemon(LOCK_AFTER_2 + '\n[[handler]]\ntype = "lastlog"\nevents = ["auth.*"]\n').start()
    before = time.time()
    assert d.auth("alice", rhost="198.51.100.1")["ok"]
    assert d.auth("alice", rhost="192.0.2.7", open_session=False)["ok"]
    assert d.auth("alice", CANARY, rhost="198.51.100.9")["error"] == "auth_failed"
    assert d.auth("alice", "wrong", rhost="198.51.100.9")["error"] == "auth_failed"  # locks alice
    assert d.auth("alice", rhost="203.0.113.5")["error"] == "locked_out"
    assert d.auth("mallory", CANARY)["error"] == "auth_failed"
    wait_counter(d, "lastlog", 7)  # with the auth.locked_out, which is not one more failure

    def authctl(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [*d.command()[:-1], "authd.ctl", "-s", str(d.socket), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=d.env(), timeout=60)

    shown = authctl("lastlog", "alice")
    assert shown.returncode == 0, shown.stderr
    row = json.loads(shown.stdout)["lastlog"]
    assert row.items() >= {"user": "alice", "success_count": 2, "last_service": "login", "last_rhost": "192.0.2.7",
                           "failure_count": 3, "last_failure_rhost": "203.0.113.5"}.items()
    assert before <= row["last_success"] <= row["last_failure"] <= time.time()
    unknown = authctl("lastlog", "mallory")
    assert unknown.returncode == 1 and json.loads(unknown.stderr)["error"] == "not_found", "no row for guessed names"
    assert d.stop() == 0
    assert_no_canary(d)


# --- webhook -------------------------------------------------------------------------------


def test_webhook_delivered_retried_and_signed(make_daemon: MakeDaemon, http_receiver: HttpReceiver) -> None:
    key = b"hook-secret-42"
    d = make_daemon(
        f'\n[[handler]]\ntype = "webhook"\nevents = ["auth.*", "session.opened"]\nurl = "{http_receiver.url}"\n'
        'secret_file = "hook.key"\nbackoff = 0.1\nretries = 3\nheaders = { "X-Team" = "mail" }\n'
    )
    (d.root / "hook.key").write_bytes(key + b"\n")
    http_receiver.statuses = [500]
    d.start()
    ok = d.auth("alice", rhost="192.0.2.7")
    assert d.auth("alice", CANARY)["error"] == "auth_failed"
    wait_counter(d, "webhook", 3)

    requests = http_receiver.requests
    assert len(requests) == 4, "three events, the first one retried once after the 500"
    first, retry = requests[0], requests[1]
    assert first.headers["X-Authd-Delivery"] == retry.headers["X-Authd-Delivery"] and first.body == retry.body
    bodies = [r.json() for r in requests[1:]]
    assert sorted(names(bodies)) == ["auth.failed", "auth.succeeded", "session.opened"]
    for request in requests:
        body = request.json()
        expected = "sha256=" + hmac.new(key, request.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request.headers["X-Authd-Signature"], expected)
        assert request.headers["X-Authd-Event"] == body["name"]
        assert request.headers["X-Authd-Delivery"] == body["id"]
        assert request.headers["X-Team"] == "mail" and request.headers["Content-Type"] == "application/json"
        assert "password" not in body and "token" not in body
    assert next(b for b in bodies if b["name"] == "auth.succeeded")["session_id"] == ok["session"]["id"]
    assert ok["session"]["token"].encode() not in b"".join(r.body for r in requests)
    assert handlers(d)["webhook"] == {"delivered": 3, "failed": 0, "dropped": 0, "timed_out": 0, "retried": 0, "dead": 0, "blocked_loop": 0, "queued": 0, "lag": 0}
    assert d.stop() == 0
    assert_no_canary(d, b"".join(r.body + repr(r.headers).encode() for r in requests))


# --- mail ----------------------------------------------------------------------------------

WELCOME = """
[[handler]]
type = "mail"
name = "welcome"
mode = "welcome"
events = ["auth.succeeded"]
host = "127.0.0.1"
port = {port}
from = "IT <it@example.org>"
to = "{{user}}@example.org"
subject = "Welcome to {{service}}, {{user}}"
body = \"\"\"
Hello {{user}},

you have just logged in to {{service}} for the first time (from {{rhost}}, at {{time}}).
\"\"\"
"""


def test_welcome_mail_once_per_user_across_restarts(make_daemon: MakeDaemon, smtp_server: SmtpServer) -> None:
    d = make_daemon(WELCOME.format(port=smtp_server.port)).start()
    for _ in range(3):
        assert d.auth("alice", rhost="192.0.2.7")["ok"]
    assert d.auth("alice", CANARY)["error"] == "auth_failed"
    assert d.auth("bob", open_session=False)["ok"]
    wait_counter(d, "welcome", 4)
    mailbox = smtp_server.mailbox.envelopes
    assert sorted(tuple(e.rcpt_tos) for e in mailbox) == [("alice@example.org",), ("bob@example.org",)]
    alice = next(e for e in mailbox if e.rcpt_tos == ["alice@example.org"]).content.decode()
    assert "Subject: Welcome to login, alice" in alice and "from 192.0.2.7, at " in alice
    assert "From: IT <it@example.org>" in alice and "Auto-Submitted: auto-generated" in alice
    assert d.stop() == 0

    d.start()
    assert d.auth("alice")["ok"] and d.auth("bob")["ok"]
    wait_counter(d, "welcome", 2)
    assert d.stop() == 0
    assert len(mailbox) == 2, "a restart welcomes nobody twice"
    assert handlers_failed_in_log(d) == []
    assert_no_canary(d, b"".join(e.content for e in mailbox))


# --- exec ----------------------------------------------------------------------------------

HOOK = """#!/bin/sh
cat > "$OUT/$AUTHD_EVENT_ID.json"
env > "$OUT/$AUTHD_EVENT_ID.env"
pwd > "$OUT/$AUTHD_EVENT_ID.cwd"
"""


def test_exec_gets_event_on_stdin_and_in_env(make_daemon: MakeDaemon) -> None:
    d = make_daemon(env={"AUTHD_TEST_DAEMON_SECRET": "daemon-only"})
    out = d.root / "exec-out"
    out.mkdir()
    hook = d.root / "hook.sh"
    hook.write_text(HOOK)
    hook.chmod(0o755)
    d.write_policy(
        d.policy + f'\n[[handler]]\ntype = "exec"\nevents = ["auth.*", "session.*"]\ncommand = ["./hook.sh"]\n'
        f'env = {{ OUT = "{out}" }}\ntimeout = 10\n'
    )
    d.start()
    token = d.auth("alice", rhost="192.0.2.7")["session"]["token"]
    assert d.auth("alice", CANARY)["error"] == "auth_failed"
    assert d.call("logout", token=token)["ok"]
    wait_counter(d, "exec", 4)

    runs = sorted(out.glob("*.json"))
    assert len(runs) == 4
    seen = set()
    for stdin in runs:
        event = json.loads(stdin.read_text())
        env = dict(line.split("=", 1) for line in stdin.with_suffix(".env").read_text().splitlines() if "=" in line)
        seen.add(event["name"])
        assert env["AUTHD_EVENT"] == event["name"] and env["AUTHD_EVENT_ID"] == event["id"] == stdin.stem
        assert env["AUTHD_USER"] == "alice" and env["AUTHD_SERVICE"] == "login"
        assert env["AUTHD_PID"] == str(os.getpid()) and env["AUTHD_UID"] == str(os.getuid())
        assert float(env["AUTHD_TIME"]) == event["time"]
        for field in ("session_id", "reason", "rhost"):
            assert env.get(f"AUTHD_{field.upper()}") == (str(event[field]) if field in event else None)
        assert env["OUT"] == str(out) and env["LANG"] == "C.UTF-8" and "PATH" in env
        assert "AUTHD_TEST_DAEMON_SECRET" not in env and "LD_PRELOAD" not in env, "never the daemon's environment"
        assert Path(stdin.with_suffix(".cwd").read_text().strip()) == d.root
    assert seen == {"auth.succeeded", "auth.failed", "session.opened", "session.closed"}
    assert d.stop() == 0
    assert_no_canary(d)


# --- python: a plugin through its entry point ------------------------------------------------

PLUGIN = """
[[handler]]
type = "python"
name = "plugin"
entry_point = "{entry_point}"
factory = true
options = {{ path = "plugin-events.jsonl" }}
"""


def plugin_env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(PLUGIN_DIR)])}


def test_plugin_handler_found_through_its_entry_point(make_daemon: MakeDaemon) -> None:
    d = make_daemon(PLUGIN.format(entry_point="recorder"), env=plugin_env())
    check = subprocess.run(d.command("check-config", "-c", str(d.config)), env=d.env(), capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    d.start()
    ok = d.auth("alice")
    assert d.auth("alice", CANARY)["error"] == "auth_failed"
    assert d.stop() == 0
    records = [json.loads(line) for line in (d.state / "plugin-events.jsonl").read_text().splitlines()]
    assert names(records) == ["daemon.started", "auth.succeeded", "session.opened", "auth.failed",
                              "daemon.draining", "daemon.stopped"]
    assert records[1]["session_id"] == ok["session"]["id"]
    assert_no_canary(d)


def test_unknown_plugin_names_the_installed_ones(make_daemon: MakeDaemon) -> None:
    d = make_daemon(PLUGIN.format(entry_point="nope"), env=plugin_env())
    check = subprocess.run(d.command("check-config", "-c", str(d.config)), env=d.env(), capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert "handler[0].entry_point" in check.stderr and "installed: record, recorder" in check.stderr


# --- isolation: raising, slow and hanging handlers -------------------------------------------


def test_broken_handlers_never_touch_replies_or_each_other(make_daemon: MakeDaemon) -> None:
    base = BASE_POLICY.replace("drain_timeout = 10.0", "drain_timeout = 1.0")  # the hung thread holds the stop this long
    d = make_daemon(
        '\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n'
        f'\n[[handler]]\ntype = "python"\nname = "raises"\ncallable = "{PROBES}:raises"\nevents = ["auth.*"]\n'
        f'\n[[handler]]\ntype = "python"\nname = "hangs"\ncallable = "{PROBES}:hangs"\nevents = ["auth.*"]\ntimeout = 0.2\n'
        f'\n[[handler]]\ntype = "python"\nname = "hangs_async"\ncallable = "{PROBES}:hangs_async"\n'
        'events = ["auth.*"]\ntimeout = 0.2\n'
        + recorder("slow", "slow.jsonl", '["auth.succeeded"]', gate="slow.gate", timeout=30)
        + recorder("fast", "fast.jsonl"),
        base=base,
    ).start()
    held = gate(d.state / "slow.gate")
    replies: list[tuple[dict[str, Any], float]] = []
    with Client(d.socket, timeout=30) as client:
        for password in (PASSWORD, CANARY, PASSWORD, CANARY):
            try:
                reply = client.auth("alice", password, "login", open_session=False)
            except ReplyError as exc:
                reply = exc.reply
            replies.append((reply, time.time()))
    assert [r.get("ok") or r["error"] for r, _ in replies] == [True, "auth_failed", True, "auth_failed"]
    assert read_records(d.state / "slow.jsonl") == [], "every reply came while the slow handler was held"

    release(held, 2)
    slow = wait_for(lambda: len(r := read_records(d.state / "slow.jsonl")) == 2 and r, timeout=30, what="slow handler")
    arrived = [t for r, t in replies if r.get("ok")]
    for record, reply_time in zip(slow, arrived):
        assert reply_time < record["finished"], "the reply did not wait for the slow handler"
    wait_counter(d, "hangs_async", 4, "timed_out")
    for name, count in (("slow", 2), ("fast", 5), ("audit", 5), ("raises", 4)):
        wait_counter(d, name, count, "failed" if name == "raises" else "delivered")
    counters = handlers(d)
    assert counters["raises"] == {"delivered": 0, "failed": 4, "dropped": 0, "timed_out": 0, "retried": 0, "dead": 0, "blocked_loop": 0, "queued": 0, "lag": 0}
    assert counters["hangs_async"] == {"delivered": 0, "failed": 0, "dropped": 0, "timed_out": 4, "retried": 0, "dead": 0, "blocked_loop": 0, "queued": 0, "lag": 0}
    assert counters["hangs"]["timed_out"] == 1 and counters["hangs"]["queued"] == 3, "stuck thread: the rest wait"
    assert counters["slow"]["delivered"] == 2 and counters["slow"]["timed_out"] == 0
    assert counters["fast"]["delivered"] == 5 and counters["audit"]["delivered"] == 5
    assert names([r["event"] for r in read_records(d.state / "fast.jsonl")]) == [
        "daemon.started", "auth.succeeded", "auth.failed", "auth.succeeded", "auth.failed"]
    assert d.auth("bob", CANARY)["error"] == "auth_failed", "still answering, with the hung thread stuck"

    assert d.stop() == 0
    assert len([e for e in d.log_lines("handler raised") if e["handler"] == "raises"]) == 5
    assert {e["handler"] for e in d.log_lines("handler timed out")} == {"hangs_async"}
    assert d.log_lines("handler timed out; its thread is still busy")[0]["handler"] == "hangs"
    assert d.log_lines("events not delivered at close")[-1]["undelivered"] == 5, "hangs: 1 stuck + 4 queued"
    assert names(audit_lines(d.root / "audit.jsonl"))[-2:] == ["daemon.draining", "daemon.stopped"]
    assert_no_canary(d)


def test_a_full_queue_spills_to_the_log_and_is_delivered_after_a_restart(make_daemon: MakeDaemon) -> None:
    base = BASE_POLICY.replace("drain_timeout = 10.0", "drain_timeout = 1.0")
    hangs = f'\n[[handler]]\ntype = "python"\nname = "stuck"\ncallable = "{PROBES}:hangs"\nevents = ["auth.*"]\n'
    d = make_daemon(hangs + "queue_size = 2\ntimeout = 0.2\n" + recorder("fast", "fast.jsonl", '["auth.*"]'), base=base)
    d.start()
    with Client(d.socket, timeout=30) as client:
        client.auth("alice", PASSWORD, "login", open_session=False)
        wait_counter(d, "stuck", 1, "timed_out")  # the first event holds the handler's thread
        for _ in range(9):
            client.auth("alice", PASSWORD, "login", open_session=False)
    wait_counter(d, "fast", 10)
    stuck = handlers(d)["stuck"]
    assert stuck["dropped"] == 0 and stuck["queued"] == 2 and stuck["lag"] >= 9
    behind = d.log_lines("handler behind; reading its events back from the log")
    assert len(behind) == 1 and behind[0]["handler"] == "stuck", "logged once per episode"
    assert d.stop() == 0
    assert d.log_lines("events not delivered at close")[-1]["undelivered"] >= 10

    d.write_policy(d.policy.replace(hangs, recorder("stuck", "stuck.jsonl", '["auth.*"]')))
    d.start()
    wait_counter(d, "stuck", 10)  # the one it hung on, and the nine behind it, from the log
    assert [r["event"]["user"] for r in read_records(d.state / "stuck.jsonl")] == ["alice"] * 10
    assert d.stop() == 0


# --- drain and reload ------------------------------------------------------------------------


def test_drain_delivers_queued_events(make_daemon: MakeDaemon) -> None:
    d = make_daemon(recorder("slowish", "drain.jsonl", gate="drain.gate"))
    d.state.mkdir(mode=0o700)
    held = gate(d.state / "drain.gate")
    d.start()  # its first event, daemon.started, waits at the gate: the logins queue behind it
    with Client(d.socket, timeout=30) as client:
        for _ in range(12):
            client.auth("alice", PASSWORD, "login", open_session=False)
    term = time.time()
    d.kill(signal.SIGTERM)
    release(held, 15)
    assert d.wait() == 0
    records = read_records(d.state / "drain.jsonl")
    assert names([r["event"] for r in records]) == [
        "daemon.started", *["auth.succeeded"] * 12, "daemon.draining", "daemon.stopped"]
    assert any(r["started"] > term for r in records if r["event"]["name"] == "auth.succeeded"), \
        "some logins were still queued at SIGTERM"
    assert d.log_lines("stopped")[-1]["undelivered_events"] == 0
    assert (d.state / "drain.jsonl.closed").exists()


def test_hup_adds_and_removes_handlers(make_daemon: MakeDaemon) -> None:
    audit = '\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n'
    d = make_daemon(audit + recorder("leaving", "leaving.jsonl", '["auth.*"]', gate="leaving.gate")).start()
    held = gate(d.state / "leaving.gate")
    with Client(d.socket, timeout=30) as client:
        for _ in range(6):
            client.auth("alice", PASSWORD, "login", open_session=False)
    d.write_policy(d.policy.split("\n[[handler]]")[0] + audit + recorder("added", "added.jsonl"))
    hup = time.time()
    d.kill(signal.SIGHUP)
    wait_for(lambda: d.call("status")["generation"] == 2, what="generation 2")
    assert d.auth("bob", open_session=False)["ok"]
    release(held, 6)

    wait_for(lambda: (d.state / "leaving.jsonl.closed").exists(), what="the removed handler to finish and close")
    leaving = read_records(d.state / "leaving.jsonl")
    assert [(r["event"]["name"], r["event"]["user"]) for r in leaving] == [("auth.succeeded", "alice")] * 6
    assert any(r["started"] > hup for r in leaving), "it still had events queued at the swap"
    wait_counter(d, "added", 2)
    added = [r["event"] for r in read_records(d.state / "added.jsonl")]
    assert [(e["name"], e.get("user")) for e in added] == [("policy.reloaded", None), ("auth.succeeded", "bob")]
    assert added[0]["generation"] == 2
    wait_for(lambda: set(handlers(d)) == {"audit", "added"}, what="a removed handler to leave status once it is done")
    assert d.stop() == 0
    assert names(audit_lines(d.root / "audit.jsonl")).count("auth.succeeded") == 7, "kept across the swap"


def test_a_removed_handler_has_the_drain_timeout_to_finish(make_daemon: MakeDaemon) -> None:
    base = BASE_POLICY.replace("drain_timeout = 10.0", "drain_timeout = 1.0")
    d = make_daemon(recorder("leaving", "leaving.jsonl", '["auth.*"]', delay=0.5), base=base).start()
    with Client(d.socket, timeout=30) as client:
        for _ in range(10):
            client.auth("alice", PASSWORD, "login", open_session=False)
    d.write_policy(d.policy.split("\n[[handler]]")[0])
    d.kill(signal.SIGHUP)
    wait_for(lambda: (d.state / "leaving.jsonl.closed").exists(), what="the removed handler to close")
    delivered = len(read_records(d.state / "leaving.jsonl"))
    (dropped,) = d.log_lines("removed handler missed its deadline; queued events dropped")
    assert dropped["handler"] == "leaving" and delivered + dropped["dropped"] == 10 and delivered < 10
    assert d.call("status")["events"]["totals"]["dropped"] == dropped["dropped"]
    assert d.stop() == 0


def test_hup_reopens_audit_and_refuses_a_broken_handler(make_daemon: MakeDaemon) -> None:
    d = make_daemon('\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n').start()
    audit = d.root / "audit.jsonl"
    good = d.policy
    assert d.auth("alice", open_session=False)["ok"]
    wait_for(lambda: len(audit_lines(audit)) == 2, what="two audit lines")

    audit.rename(d.root / "audit.jsonl.1")  # logrotate's `create`, then a reload that fails
    d.write_policy(good + f'\n[[handler]]\ntype = "python"\ncallable = "{PROBES}:no_such_function"\n')
    d.kill(signal.SIGHUP)
    error = wait_for(lambda: d.call("status")["last_reload_error"], what="the refused reload")
    assert "handler[1].callable: cannot load" in error and str(d.config) in error
    d.write_policy(good + '\n[[handler]]\ntype = "python"\ncallable = "tests.events.exits_on_import:handle"\n')
    d.kill(signal.SIGHUP)
    wait_for(lambda: "SystemExit" in (d.call("status")["last_reload_error"] or ""), what="a plugin's sys.exit() refused")
    assert d.auth("bob", open_session=False)["ok"]
    wait_for(lambda: len(audit_lines(audit)) == 3, what="the reopened file")
    assert [(e["name"], e.get("user")) for e in audit_lines(audit)] == [
        ("policy.reload_failed", None), ("policy.reload_failed", None), ("auth.succeeded", "bob")]
    assert set(handlers(d)) == {"audit"} and d.call("status")["generation"] == 1, "the old handlers stay"

    audit.rename(d.root / "audit.jsonl.2")  # and a reload that succeeds
    d.write_policy(good)
    d.kill(signal.SIGHUP)
    wait_for(lambda: d.call("status")["generation"] == 2, what="generation 2")
    assert d.auth("alice", open_session=False)["ok"]
    assert d.stop() == 0
    assert names(audit_lines(d.root / "audit.jsonl.1")) == ["daemon.started", "auth.succeeded"]
    assert names(audit_lines(d.root / "audit.jsonl.2")) == ["policy.reload_failed", "policy.reload_failed", "auth.succeeded"]
    assert names(audit_lines(audit)) == ["policy.reloaded", "auth.succeeded", "daemon.draining", "daemon.stopped"]


def test_hup_applies_a_new_handler_timeout(make_daemon: MakeDaemon) -> None:
    hang = f'\n[[handler]]\ntype = "python"\nname = "hangs"\ncallable = "{PROBES}:hangs_async"\nevents = ["auth.*"]\n'
    base = BASE_POLICY.replace("sweep_interval", "handler_timeout = 30.0\nsweep_interval")
    d = make_daemon(hang, base=base).start()
    d.write_policy(d.policy.replace("handler_timeout = 30.0", "handler_timeout = 0.5"))
    assert d.call("reload")["restart_required"] == []
    assert d.auth("alice", open_session=False)["ok"]
    wait_counter(d, "hangs", 1, "timed_out")
    assert d.log_lines("handler timed out")[-1]["timeout"] == 0.5


def test_a_new_state_dir_waits_for_a_restart_for_handlers_too(make_daemon: MakeDaemon) -> None:
    """A reload that changes state_dir used to move the handlers' files but not the stores'."""
    d = make_daemon('\n[[handler]]\ntype = "lastlog"\nevents = ["auth.*"]\n').start()
    assert d.auth("alice", open_session=False)["ok"]
    wait_counter(d, "lastlog", 1)
    moved = d.root / "moved"
    d.write_policy(d.policy.replace('state_dir = "{state}"', f'state_dir = "{moved}"'))
    assert d.call("reload")["restart_required"] == ["daemon.state_dir"]
    assert d.auth("alice", open_session=False)["ok"]
    wait_counter(d, "lastlog", 2)
    assert d.call("lastlog", user="alice")["lastlog"]["success_count"] == 2
    assert not moved.exists()


# --- the canary, with every handler at once ----------------------------------------------------


def test_canary_in_no_handler_output(make_daemon: MakeDaemon, http_receiver: HttpReceiver, smtp_server: SmtpServer) -> None:
    d = make_daemon(
        '\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n'
        '\n[[handler]]\ntype = "lastlog"\n'
        f'\n[[handler]]\ntype = "webhook"\nurl = "{http_receiver.url}"\nsecret = "k"\nbackoff = 0.05\n'
        + WELCOME.format(port=smtp_server.port).replace("auth.succeeded", "auth.*", 1).replace('"welcome"', '"every"')
        + '\n[[handler]]\ntype = "exec"\ncommand = ["./hook.sh"]\nenv = { OUT = "exec-out" }\n'
        + PLUGIN.format(entry_point="recorder"),
        env=plugin_env(),
    )
    (d.root / "exec-out").mkdir()
    (d.root / "hook.sh").write_text(HOOK)
    (d.root / "hook.sh").chmod(0o755)
    http_receiver.statuses = [500, 500]
    d.start()
    token = d.auth("alice", rhost="192.0.2.7")["session"]["token"]
    for user in ("alice", "bob", "nobody"):
        assert d.auth(user, CANARY, rhost="192.0.2.7")["error"] == "auth_failed"
    assert d.call("logout", token=token)["ok"]
    assert d.stop() == 0
    events = 1 + 2 + 3 + 1 + 2  # started, succeeded + opened, 3 failures, closed, draining + stopped
    assert len(audit_lines(d.root / "audit.jsonl")) == events
    assert len(list((d.root / "exec-out").glob("*.json"))) == events
    assert len({r.headers["X-Authd-Delivery"] for r in http_receiver.requests}) == events
    assert len(smtp_server.mailbox.envelopes) == 4, "every auth.* event"
    assert {r.get("handler") for r in handlers_failed_in_log(d)} <= {"webhook"}, "only the two 500s"
    assert_no_canary(
        d,
        b"".join(r.body + repr(r.headers).encode() for r in http_receiver.requests),
        b"".join(e.content + repr(e.rcpt_tos).encode() for e in smtp_server.mailbox.envelopes),
    )
