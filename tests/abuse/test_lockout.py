"""Lockout through the real socket: replies, the concurrency race, persistence, authctl, events, fail2ban.

The rules themselves are unit-tested in tests/lockout; here they are driven end to end.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from authd.client import ReplyError

from ..daemon import PASSWORD, Daemon, wait_for
from .helpers import ctl, ctl_as_nobody, lockout_table, pam_calls

FAIL2BAN_FILTER = Path(__file__).resolve().parents[2] / "contrib" / "fail2ban" / "filter.d" / "authd.conf"
AUDIT = '\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n'
USER_ONLY = lockout_table(user="{ max_failures = 3, lock_time = 60.0 }", rhost="{ max_failures = 0 }")


def audit(d: Daemon) -> list[dict]:
    path = d.root / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def lock_alice(d: Daemon, failures: int = 3, **fields: str) -> None:
    for i in range(failures):
        assert d.auth("alice", f"wrong-{i}", **fields)["error"] == "auth_failed"


def test_locked_out_reply_after_failure_delay_never_reaches_pam(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("failure_delay = 0.5\n" + USER_ONLY + AUDIT).start()
    lock_alice(d)
    calls = pam_calls(d)
    started = time.monotonic()
    reply = d.auth("alice", PASSWORD)
    waited = time.monotonic() - started
    assert reply["error"] == "locked_out" and isinstance(reply["retry_after"], int) and 0 < reply["retry_after"] <= 60
    assert waited >= 0.5, "a locked attempt waits out the failure delay like any failure"
    assert pam_calls(d) == calls, "a locked attempt never reaches PAM"
    assert d.auth("bob")["ok"], "other users are not affected"

    logged = wait_for(lambda: (r := audit(d)) and any(e["name"] == "auth.locked_out" for e in r)
                      and any(e["name"] == "auth.failed" and e["reason"] == "locked_out" for e in r) and r,
                      10, what="auth.locked_out and the refused attempt's auth.failed")
    events = [e for e in logged if e["name"] == "auth.locked_out"]
    assert [(e["user"], e["reason"], e["service"]) for e in events] == [("alice", "user locked", "login")]
    refused = [e for e in logged if e["name"] == "auth.failed" and e["reason"] == "locked_out"]
    assert len(refused) == 1 and refused[0]["user"] == "alice"
    (line,) = d.log_lines("lockout")
    assert line["scope"] == "user" and line["user"] == "alice" and line["retry_after"] == 60


def test_rhost_lock_covers_every_user_from_that_host(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(lockout_table(user="{ max_failures = 100 }", rhost="{ max_failures = 3, lock_time = 60.0 }")).start()
    for user in ("u1", "u2", "u3"):
        assert d.auth(user, "guess", rhost="203.0.113.9")["error"] == "auth_failed"
    assert d.auth("alice", rhost="203.0.113.9")["error"] == "locked_out"
    assert d.auth("alice", rhost="::ffff:203.0.113.9")["error"] == "locked_out", "IPv4-mapped form is the same host"
    assert d.auth("alice", rhost="203.0.113.10")["ok"]
    assert d.auth("alice")["ok"], "local logins carry no rhost"
    rows = d.call("lockouts")["lockouts"]
    assert [(r["scope"], r["key"], r["locked"]) for r in rows if r["locked"]] == [("rhost", "203.0.113.9", True)]


def test_identical_wrong_password_counts_once(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(USER_ONLY).start()
    for _ in range(10):
        assert d.auth("alice", "the-same-typo")["error"] == "auth_failed"
    (row,) = d.call("lockouts")["lockouts"]
    assert row["failures"] == 1 and not row["locked"]
    assert d.auth("alice")["ok"]


def test_lock_expires_and_progressive_locks_double(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(lockout_table(user="{ max_failures = 2, lock_time = 1.0 }", rhost="{ max_failures = 0 }",
                                  progressive="true", max_lock_time="60.0")).start()
    lock_alice(d, 2)
    assert d.auth("alice")["retry_after"] == 1
    wait_for(lambda: d.auth("alice", "probe").get("error") == "auth_failed", 10, what="the lock to expire")
    assert d.auth("alice", "another")["error"] == "auth_failed"
    assert d.auth("alice")["retry_after"] == 2, "the second lock lasts twice as long"
    (row,) = d.call("lockouts")["lockouts"]
    assert row["lock_count"] == 2


def test_exemptions_only_when_configured(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(lockout_table(user="{ max_failures = 2 }", exempt_users='["bob"]', exempt_rhosts='["192.0.2.0/24"]')).start()
    for i in range(5):
        d.auth("bob", f"wrong-{i}")
        d.auth("alice", f"wrong-{i}", rhost="192.0.2.7")
    assert d.auth("bob")["ok"]
    assert d.auth("alice", rhost="192.0.2.7")["error"] == "locked_out", "an exempt rhost does not exempt the user"


def test_hundred_concurrent_wrong_passwords_at_most_five_reach_pam(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("failure_delay = 0.2\n" + lockout_table(user="{ max_failures = 5 }", rhost="{ max_failures = 0 }")).start()
    before = pam_calls(d)

    async def guess(i: int) -> str:
        async with d.aclient() as client:
            try:
                await client.auth("alice", f"guess-{i:03d}", "login")
            except ReplyError as exc:
                assert exc.code != "locked_out" or exc.reply["retry_after"] > 0
                return exc.code
            return "ok"

    async def race() -> list[str]:
        return await asyncio.gather(*(guess(i) for i in range(100)))

    outcomes = Counter(asyncio.run(race()))
    reached = pam_calls(d) - before
    assert reached <= 5 and outcomes["auth_failed"] == reached, (reached, outcomes)
    assert outcomes["locked_out"] == 100 - reached
    assert d.auth("alice")["error"] == "locked_out"


def test_lock_survives_reload_restart_and_kill_9(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(USER_ONLY).start()
    lock_alice(d)
    assert d.auth("alice")["error"] == "locked_out"

    d.write_policy(d.policy.replace("[lockout]", 'deny_users = ["bob"]\n\n[lockout]'))
    d.kill(signal.SIGHUP)
    wait_for(lambda: d.call("status")["generation"] == 2, what="reload")
    assert d.auth("alice")["error"] == "locked_out", "kept across SIGHUP"
    assert d.call("reload")["ok"] and d.auth("alice")["error"] == "locked_out", "kept across authctl reload"

    assert d.stop() == 0
    d.start()
    assert d.auth("alice")["error"] == "locked_out", "kept across a clean restart"
    d.stop(signal.SIGKILL)
    d.start()
    assert d.auth("alice")["error"] == "locked_out", "kept across kill -9"
    assert d.auth("bob")["error"] == "not_authorized", "the reloaded policy is the one on disk"


def test_authctl_lists_and_unlocks(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(lockout_table(user="{ max_failures = 3 }", rhost="{ max_failures = 3 }")).start()
    lock_alice(d, rhost="198.51.100.4")
    listed = ctl(d, "lockouts")
    assert listed.returncode == 0, listed.stderr
    rows = {(r["scope"], r["key"]): r for r in json.loads(listed.stdout)["lockouts"]}
    assert set(rows) == {("user", "alice"), ("rhost", "198.51.100.4")}
    assert all(r["locked"] and r["retry_after"] > 0 for r in rows.values())

    code, output = ctl_as_nobody(d, "unlock", "alice")
    assert code == 1 and '"forbidden"' in output, "unlock is an admin op"

    done = ctl(d, "unlock", "alice")
    assert done.returncode == 0 and json.loads(done.stdout)["unlocked"] == "alice", done.stderr
    assert d.auth("alice", rhost="198.51.100.4")["error"] == "locked_out", "the rhost lock is separate"
    assert ctl(d, "unlock", "198.51.100.4", "--scope", "rhost").returncode == 0
    assert d.auth("alice", rhost="198.51.100.4")["ok"]
    again = ctl(d, "unlock", "alice")
    assert again.returncode == 1 and '"not_found"' in again.stderr
    assert json.loads(ctl(d, "lockouts").stdout)["lockouts"] == []
    assert [r["key"] for r in d.log_lines("lockout cleared")] == ["alice", "198.51.100.4"]


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban not installed")
def test_fail2ban_filter_matches_real_daemon_output(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(lockout_table(user="{ max_failures = 3 }", rhost="{ max_failures = 20 }")).start()
    for i in range(4):  # three failures, then one locked_out: all four count
        d.auth("alice", f"wrong-{i}", rhost="203.0.113.9")
    d.auth("bob", "wrong", rhost="2001:db8::7")
    d.auth("nosuchuser", "guess", rhost="198.51.100.23")
    d.auth('x", "rhost": "192.0.2.66', "guess", rhost="198.51.100.24")
    for rhost in ("192.0.2.1", "192.0.2.2"):
        assert d.auth("bob", rhost=rhost)["ok"]
    d.auth("bob", "wrong")  # no rhost: nothing to ban
    d.auth("bob", "wrong", service="nope", rhost="192.0.2.3")  # a policy refusal, not a guess
    assert d.stop() == 0

    done = subprocess.run(["fail2ban-regex", "--raw", "--out", "<ip>\t<F-USER>", str(d.log), str(FAIL2BAN_FILTER)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    matched = Counter(tuple(line.split("\t")) for line in done.stdout.splitlines() if line.strip())
    assert matched == Counter({
        ("203.0.113.9", "alice"): 4,
        ("2001:db8::7", "bob"): 1,
        ("198.51.100.23", "nosuchuser"): 1,
        ("198.51.100.24", 'x\\", \\"rhost\\": \\"192.0.2.66'): 1,
    }), done.stdout
