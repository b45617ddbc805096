"""`check` and `permissions` against a real daemon: replies, errors, reloads, authctl's exit codes."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable

import pytest

from .abuse.helpers import ctl
from .daemon import PAM_SERVICE, PASSWORD, Daemon, wait_for
from .pamenv import PamEnv

ROLES = """
[[service]]
name = "mail"
pam_service = "authd-test"

[roles.mail-admin]
users = ["alice"]
groups = ["root"]
services = ["login"]
permissions = ["mail.*", "webmail.admin.read"]
deny = ["mail.purge"]

[roles.everyone]
users = ["*"]
permissions = ["profile.read"]
"""

MakeDaemon = Callable[..., Daemon]


@pytest.fixture
def d(make_daemon: MakeDaemon) -> Daemon:
    return make_daemon(ROLES).start()


def token(d: Daemon, user: str = "alice", service: str = "login") -> str:
    reply = d.auth(user, service=service)
    assert reply["ok"], reply
    return reply["session"]["token"]


def test_check_answers_with_the_deciding_rule(d: Daemon) -> None:
    alice = token(d)
    reply = d.call("check", token=alice, permission="mail.send")
    assert {k: v for k, v in reply.items() if k != "id"} == {
        "ok": True, "allowed": True, "user": "alice", "permission": "mail.send",
        "rule": "roles.mail-admin.permissions[0]", "generation": 1}
    assert d.call("check", token=alice, permission="mail.purge")["rule"] == "roles.mail-admin.deny[0]"
    assert d.call("check", token=alice, permission="mail")["rule"] == "default"
    assert d.call("check", token=alice, permission="profile.read")["rule"] == "roles.everyone.permissions[0]"
    denied = d.call("check", token=alice, permission="mail.purge")
    assert denied["ok"] and denied["allowed"] is False


def test_roles_follow_user_groups_and_service(d: Daemon, pam: PamEnv) -> None:
    pam.add_user("root", PASSWORD, PAM_SERVICE)  # group `root` comes from NSS at login
    assert d.call("check", token=token(d, "root"), permission="mail.send")["allowed"]
    assert d.call("check", token=token(d, "bob"), permission="mail.send")["rule"] == "default"
    other_service = token(d, "alice", service="mail")
    assert d.call("check", token=other_service, permission="mail.send")["rule"] == "default"
    assert d.call("check", token=other_service, permission="profile.read")["allowed"]


def test_permissions_lists_the_effective_patterns(d: Daemon) -> None:
    reply = d.call("permissions", token=token(d))
    assert {k: v for k, v in reply.items() if k != "id"} == {
        "ok": True, "user": "alice", "roles": ["mail-admin", "everyone"],
        "permissions": ["mail.*", "profile.read", "webmail.admin.read"], "deny": ["mail.purge"], "generation": 1}
    assert d.call("permissions", token=token(d, "bob"))["permissions"] == ["profile.read"]


@pytest.mark.parametrize("permission", ["mail.*", "*", "Mail.send", "mail..send", "", "x" * 257, "canary.Secret", "a b"])
def test_invalid_permission_is_a_bad_request_that_quotes_nothing(d: Daemon, permission: str) -> None:
    reply = d.call("check", token=token(d), permission=permission)
    assert reply["error"] == "bad_request" and reply["message"].startswith("invalid permission name")
    assert permission not in reply["message"] or permission in ("", "*")  # `*` appears in the grammar text
    assert "canary" not in reply["message"]


def test_unknown_expired_or_logged_out_session_is_invalid(d: Daemon) -> None:
    assert d.call("check", token="no-such-token", permission="mail.send")["error"] == "invalid_session"
    assert d.call("permissions", token="no-such-token")["error"] == "invalid_session"
    alice = token(d)
    assert d.call("logout", token=alice)["ok"]
    assert d.call("check", token=alice, permission="mail.send")["error"] == "invalid_session"
    reply = d.call("check", token="x" * 5000, permission="mail.send")
    assert reply["error"] == "bad_request" and "x" * 50 not in reply["message"]


def test_check_refreshes_the_idle_expiry(d: Daemon) -> None:
    alice = token(d)

    def last_seen() -> float:
        (session,) = d.call("sessions", user="alice")["sessions"]  # `sessions` itself touches nothing
        return session["last_seen"]

    before = last_seen()
    wait_for(lambda: d.call("check", token=alice, permission="mail.send") and last_seen() > before, what="last_seen to move")
    before = last_seen()
    wait_for(lambda: d.call("permissions", token=alice) and last_seen() > before, what="last_seen to move")


def test_reload_swaps_roles_with_the_generation(d: Daemon) -> None:
    alice = token(d)
    d.write_policy(d.policy.replace('deny = ["mail.purge"]', 'deny = ["mail.send"]'))
    d.kill(signal.SIGHUP)
    wait_for(lambda: d.call("hello")["generation"] == 2, what="reload")
    assert d.call("check", token=alice, permission="mail.send") | {"id": None} == {
        "id": None, "ok": True, "allowed": False, "user": "alice", "permission": "mail.send",
        "rule": "roles.mail-admin.deny[0]", "generation": 2}
    assert d.call("check", token=alice, permission="mail.purge")["allowed"]

    d.write_policy(d.policy.replace('permissions = ["profile.read"]', 'permissions = ["profile.read", "bad*"]'))
    reply = d.call("reload")
    line = d.config.read_text().splitlines().index('permissions = ["profile.read", "bad*"]') + 1
    assert reply["error"] == "reload_failed" and f":{line}: roles.everyone.permissions[1]: invalid pattern" in reply["message"]
    assert d.call("check", token=alice, permission="mail.send")["generation"] == 2, "old roles keep serving"


def test_pipelined_checks_on_one_connection(d: Daemon) -> None:
    alice = token(d)
    perms = [f"mail.p{i}" if i % 3 else "mail.purge" for i in range(300)]

    async def run() -> list[dict[str, object]]:
        async with d.aclient() as client:
            return await asyncio.gather(*(client.check(alice, p) for p in perms))

    replies = asyncio.run(run())
    assert [r["permission"] for r in replies] == perms
    assert [r["allowed"] for r in replies] == [p != "mail.purge" for p in perms]
    counters = d.call("status")["counters"]
    assert counters["authz:allowed"] == 200 and counters["authz:denied"] == 100


def test_authctl_check_exit_codes(d: Daemon) -> None:
    alice = token(d)
    allowed = ctl(d, "check", alice, "mail.send")
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["rule"] == "roles.mail-admin.permissions[0]"
    denied = ctl(d, "check", alice, "mail.purge")
    assert denied.returncode == 1 and json.loads(denied.stdout)["allowed"] is False
    assert ctl(d, "check", "no-such-token", "mail.send").returncode == 3
    bad = ctl(d, "check", alice, "mail.*")
    assert bad.returncode == 3 and json.loads(bad.stderr)["error"] == "bad_request"
    listed = ctl(d, "permissions", alice)
    assert listed.returncode == 0 and json.loads(listed.stdout)["roles"] == ["mail-admin", "everyone"]
    assert ctl(d, "permissions", "nope").returncode == 1
    d.stop()
    assert ctl(d, "check", alice, "mail.send").returncode == 2


def test_typed_client_gets_reply_structs(d: Daemon) -> None:
    from authd.authz import CheckReply, PermissionsReply
    from authd.client import Client

    with Client(d.socket, typed=True) as client:
        alice = client.auth("alice", PASSWORD, "login").session.token
        reply = client.check(alice, "mail.send")
        assert isinstance(reply, CheckReply) and reply.allowed and reply.rule == "roles.mail-admin.permissions[0]"
        listed = client.permissions(alice)
        assert isinstance(listed, PermissionsReply) and listed.deny == ("mail.purge",)
