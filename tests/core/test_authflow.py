"""The auth decision on its own, in memory: every outcome, its events, and its delay."""

from __future__ import annotations

from pathlib import Path

from authd.outcome import Denied, Granted

from .harness import PASSWORD, PEER, Harness, policy, run

LOCKOUT = """
[lockout.user]
max_failures = 2
interval = 600
lock_time = 60
"""


@run
async def test_success_without_session(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    out = await h.auth(rhost="203.0.113.5", protocol="dovecot")
    assert out == Granted(user="alice", groups=())  # nothing reads them: not looked up
    [event] = h.events
    assert (event.name, event.user, event.rhost, event.protocol, event.pid) == ("auth.succeeded", "alice", "203.0.113.5", "dovecot", PEER.pid)
    assert h.delays == [] and h.counters["auth:ok"] == 1


@run
async def test_groups_are_looked_up_only_when_something_reads_them(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.auth(protocol="saslauthd")
    await h.auth(protocol="native")  # the native reply lists them
    await h.auth(protocol="dovecot", open_session=True)  # a session keeps them
    assert h.pam.group_lookups == [False, True, True]
    ruled = Harness(tmp_path / "ruled", '[[service]]\nname = "login"\ndeny_groups = ["staff"]\n')
    assert await ruled.auth(protocol="saslauthd") == Denied(code="not_authorized")
    assert ruled.pam.group_lookups == [True]


def test_groups_not_looked_up_fail_closed_where_a_rule_reads_them() -> None:
    ruled = policy('[[service]]\nname = "login"\nallow_groups = ["staff"]\n')
    plain = policy('[[service]]\nname = "login"\n')
    assert not ruled.permits(ruled.services["login"], "alice", None)
    assert ruled.permits(ruled.services["login"], "alice", ["staff"])
    assert plain.permits(plain.services["login"], "alice", None)


@run
async def test_success_opens_a_session(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    out = await h.auth(open_session=True)
    assert isinstance(out, Granted) and out.session is not None
    assert h.sessions.lookup(out.session.token) is not None
    assert h.names() == ["auth.succeeded", "session.opened"]
    assert out.session.token not in repr(out)


@run
async def test_wrong_password_and_unknown_user_are_one_outcome_with_the_longer_delay(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    wrong = await h.auth(password="nope", protocol="saslauthd")
    unknown = await h.auth(user="mallory")
    assert wrong == unknown == Denied(code="auth_failed")
    assert h.delays == [2.0, 2.0], "the service's delay beats PAM's 0.5 s"
    assert [(e.name, e.reason, e.protocol) for e in h.events] == [
        ("auth.failed", "auth_failed", "saslauthd"), ("auth.failed", "auth_failed", "native")]


@run
async def test_unknown_service_is_not_authorized_without_pam(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert await h.auth(service="nope") == Denied(code="not_authorized")
    assert h.pam.calls == []


@run
async def test_policy_is_only_revealed_after_the_password(tmp_path: Path) -> None:
    h = Harness(tmp_path, '[[service]]\nname = "login"\ndeny_users = ["bob"]\n')
    assert await h.auth("bob", "wrong") == Denied(code="auth_failed")
    assert await h.auth("bob") == Denied(code="not_authorized")


@run
async def test_account_failure_has_its_own_code(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.pam.account_result = "account_expired"
    assert await h.auth() == Denied(code="account_expired")


@run
async def test_unavailable_pam_does_not_count_toward_lockout(tmp_path: Path) -> None:
    h = Harness(tmp_path, '[[service]]\nname = "login"\n' + LOCKOUT)
    h.pam.unavailable = True
    for _ in range(3):
        assert await h.auth(password="wrong") == Denied(code="unavailable")
    h.pam.unavailable = False
    assert await h.auth() == Granted(user="alice", groups=("staff",))


@run
async def test_a_full_pam_queue_is_busy_and_neither_a_failure_nor_a_success(tmp_path: Path) -> None:
    """Nothing was tried: lockout counts no failure (a flood must not lock a user out) and no
    success (which would forget the user's earlier failures); no delay, no event."""
    h = Harness(tmp_path, '[[service]]\nname = "login"\n[daemon.limits]\nmax_queued_per_uid = 7\n' + LOCKOUT)
    assert await h.auth(password="one") == Denied(code="auth_failed")
    h.pam.busy = True
    for password in ("two", PASSWORD):
        assert await h.auth(password=password) == Denied(code="busy")
    assert h.counters["auth:busy"] == 2 and h.delays == [2.0] and h.names() == ["auth.failed"]
    assert h.pam.queues == [(PEER.uid, 7)] * 3, "the call waits in the peer uid's queue, bounded by the policy"
    h.pam.busy = False
    assert await h.auth(password="three") == Denied(code="auth_failed")
    assert "auth.locked_out" in h.names(), "the busy attempts neither counted nor reset: 2 failures lock"


@run
async def test_lockout_refuses_before_pam_and_lifts_with_the_clock(tmp_path: Path) -> None:
    h = Harness(tmp_path, '[[service]]\nname = "login"\nfailure_delay = 1.0\n' + LOCKOUT)
    await h.auth(password="one", rhost="198.51.100.1", protocol="dovecot")
    await h.auth(password="two", rhost="198.51.100.1", protocol="dovecot")
    assert "auth.locked_out" in h.names()
    locked_event = next(e for e in h.events if e.name == "auth.locked_out")
    assert locked_event.protocol == "dovecot" and locked_event.rhost == "198.51.100.1"
    calls = len(h.pam.calls)
    out = await h.auth()
    assert isinstance(out, Denied) and out.code == "locked_out" and out.retry_after is not None and out.retry_after <= 60
    assert len(h.pam.calls) == calls, "a locked user never reaches PAM"
    assert h.delays[-1] == 1.0
    h.clock.advance(61)
    assert isinstance(await h.auth(), Granted)


@run
async def test_session_limit_refuse_is_said_only_after_the_password(tmp_path: Path) -> None:
    h = Harness(tmp_path, '[[service]]\nname = "login"\nmax_sessions_per_user = 2\nsession_limit = "refuse"\n')
    for _ in range(2):
        assert isinstance(await h.auth(open_session=True), Granted)
    assert await h.auth(password="wrong", open_session=True) == Denied(code="auth_failed")
    assert await h.auth(open_session=True) == Denied(code="session_limit")
    assert isinstance(await h.auth(), Granted), "a login without a session is not limited"
    assert len(h.sessions.list("alice")) == 2 and h.counters["auth:session_limit"] == 1


@run
async def test_session_limit_evict_oldest_reports_the_evicted_session(tmp_path: Path) -> None:
    h = Harness(tmp_path, '[[service]]\nname = "login"\nmax_sessions_per_user = 1\n')
    first = await h.auth(open_session=True, rhost="192.0.2.1")
    h.events.clear()
    second = await h.auth(open_session=True, rhost="192.0.2.2")
    assert isinstance(first, Granted) and isinstance(second, Granted) and first.session and second.session
    assert h.names() == ["session.closed", "auth.succeeded", "session.opened"]
    closed = h.events[0]
    assert (closed.session_id, closed.reason, closed.rhost, closed.pid) == (first.session.id, "evicted", "192.0.2.1", PEER.pid)
    assert h.sessions.lookup(first.session.token) is None and h.sessions.lookup(second.session.token) is not None


def test_request_repr_hides_the_password() -> None:
    from authd.outcome import AuthRequest

    assert PASSWORD not in repr(AuthRequest(user="alice", password=PASSWORD, service="login"))
