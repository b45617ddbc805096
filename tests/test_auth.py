"""The auth path end to end: a real authd, real libpam via pam_wrapper, a real socket."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from authd.client import AsyncClient

from .daemon import CANARY, PAM_SERVICE, PASSWORD, Daemon, as_nobody, raw_connect, read_replies, scan_for, wait_for
from .pamenv import PamEnv


def test_hello(daemon: Daemon) -> None:
    reply = daemon.call("hello")
    assert reply["ok"] and reply["server"] == "authd" and reply["protocol"] == 1 and reply["generation"] == 1


def test_success_opens_a_session(daemon: Daemon) -> None:
    reply = daemon.auth("alice", rhost="198.51.100.7")
    assert reply["ok"] and reply["user"] == "alice"
    session = reply["session"]
    assert len(session["token"]) >= 43 and session["expires_at"] > time.time()
    info = daemon.call("session", token=session["token"])
    assert info["ok"] and info["session"]["user"] == "alice" and info["session"]["id"] == session["id"]
    assert info["session"]["service"] == "login" and info["session"]["rhost"] == "198.51.100.7"
    assert "token" not in info["session"]


def test_check_only_opens_no_session(daemon: Daemon) -> None:
    reply = daemon.auth("alice", open_session=False)
    assert reply["ok"] and "session" not in reply
    assert daemon.call("sessions")["sessions"] == []


def test_wrong_password_and_unknown_user_are_indistinguishable(daemon: Daemon) -> None:
    wrong = daemon.auth("alice", "not the password")
    unknown = daemon.auth("mallory", "whatever")
    assert wrong["error"] == "auth_failed"
    assert {k: v for k, v in wrong.items() if k != "id"} == {k: v for k, v in unknown.items() if k != "id"}


def test_account_check_failure_has_its_own_code(pam: PamEnv, make_daemon: Callable[..., Daemon]) -> None:
    pam.add_user("carol", PASSWORD, "some-other-service")  # pam_matrix: password ok, account is for another service
    d = make_daemon().start()
    reply = d.auth("carol")
    assert reply["error"] not in ("auth_failed", None)
    assert reply["error"] in ("not_authorized", "account_expired")


def test_policy_denies_user(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon('deny_users = ["bob"]\n').start()
    assert d.auth("bob")["error"] == "not_authorized"
    assert d.auth("bob", "wrong")["error"] == "auth_failed", "policy is only revealed after the password"
    assert d.auth("alice")["ok"]


def test_policy_allow_list(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon('allow_users = ["alice"]\n').start()
    assert d.auth("alice")["ok"]
    assert d.auth("bob")["error"] == "not_authorized"


def test_policy_groups(make_daemon: Callable[..., Daemon], pam: PamEnv) -> None:
    pam.add_user("root", PASSWORD, PAM_SERVICE)  # root is in group `root` on every system
    d = make_daemon('allow_groups = ["root"]\n').start()
    reply = d.auth("root")
    assert reply["ok"] and "root" in reply["groups"]
    assert d.auth("alice")["error"] == "not_authorized"


def test_unknown_service_is_denied(daemon: Daemon) -> None:
    assert daemon.auth("alice", service="nope")["error"] == "not_authorized"


def test_client_forbidden_for_other_uid(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(base=_only_root_clients()).start()
    assert d.auth("alice")["ok"], "root may"
    reply = _as_nobody(d.socket, b'{"id":1,"op":"auth","user":"alice","password":"x","service":"login"}\n')
    assert reply["id"] is None and reply["error"] == "client_forbidden", "refused at accept, before any request"
    reply = _as_nobody(d.socket, b'{"id":2,"op":"status"}\n')
    assert reply["error"] == "client_forbidden"
    assert d.call("status")["counters"]["connections_refused_forbidden"] == 2


def test_admin_ops_need_admin(make_daemon: Callable[..., Daemon]) -> None:
    from .daemon import BASE_POLICY

    d = make_daemon(base=BASE_POLICY.replace('admin_users = ["root"]', "admin_users = []")).start()
    reply = _as_nobody(d.socket, b'{"id":1,"op":"sessions"}\n')
    assert reply["error"] == "forbidden"
    reply = _as_nobody(d.socket, b'{"id":2,"op":"hello"}\n')
    assert reply["ok"]


def _only_root_clients() -> str:
    from .daemon import BASE_POLICY

    return BASE_POLICY.replace('users = ["*"]', 'users = ["root"]')


def _as_nobody(path: Path, request: bytes) -> dict:
    """Connect from a child process that dropped to uid/gid nobody, return its one reply."""
    import json

    return json.loads(as_nobody(path, request).split(b"\n")[0])


def test_logout_and_revoke(daemon: Daemon) -> None:
    a1 = daemon.auth("alice")["session"]
    a2 = daemon.auth("alice")["session"]
    b = daemon.auth("bob")["session"]
    assert daemon.call("logout", token=a1["token"])["ok"]
    assert daemon.call("session", token=a1["token"])["error"] == "invalid_session"
    assert daemon.call("logout", token=a1["token"])["error"] == "invalid_session"
    assert [s["id"] for s in daemon.call("sessions", user="alice")["sessions"]] == [a2["id"]]
    assert daemon.call("revoke", user="alice")["revoked"] == [a2["id"]]
    assert daemon.call("revoke", session_id=b["id"])["revoked"] == [b["id"]]
    assert daemon.call("sessions")["sessions"] == []
    assert daemon.call("revoke")["error"] == "bad_request"


def test_status(daemon: Daemon) -> None:
    daemon.auth("alice")
    daemon.auth("alice", "bad")
    status = daemon.call("status")
    assert status["state"] == "ready" and status["generation"] == 1
    assert status["counters"]["auth:ok"] == 1 and status["counters"]["auth:auth_failed"] == 1
    assert status["pam"]["size"] == 2 and status["sessions"] == 1


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"{oops\n", "bad_request"),
        (b'{"id":5,"op":"nope"}\n', "bad_request"),
        (b'{"id":6,"op":"auth","user":"al\\u0000ice","password":"p","service":"login"}\n', "bad_request"),
        (b'{"id":7,"op":"auth","user":"alice","password":"p\\u0000","service":"login"}\n', "bad_request"),
        (b'{"id":8,"op":"hello","pad":"' + b"x" * 70_000 + b'"}\n', "too_large"),
    ],
)
def test_bad_input_is_answered_and_connection_keeps_serving(daemon: Daemon, line: bytes, error: str) -> None:
    sock = raw_connect(daemon.socket)
    sock.sendall(line + b'{"id":"next","op":"hello"}\n')
    first, second = read_replies(sock, 2)
    assert first["ok"] is False and first["error"] == error
    assert second == {**second, "id": "next", "ok": True}
    sock.close()
    assert daemon.call("hello")["ok"], "daemon serves other connections"


def test_too_large_streamed_line_is_answered_without_buffering(daemon: Daemon) -> None:
    sock = raw_connect(daemon.socket)
    sock.sendall(b'{"id":1,"op":"hello","pad":"')
    for _ in range(40):
        sock.sendall(b"y" * 65536)
    (reply,) = read_replies(sock, 1)
    assert reply["error"] == "too_large"
    sock.sendall(b'"}\n{"id":2,"op":"hello"}\n')
    (reply,) = read_replies(sock, 1)
    assert reply["id"] == 2 and reply["ok"]


def test_inflight_limit_gives_busy(make_daemon: Callable[..., Daemon]) -> None:
    from .daemon import BASE_POLICY

    d = make_daemon(base=BASE_POLICY.replace("[clients]", "[daemon.limits]\nmax_inflight = 2\n\n[clients]"),
                    extra="failure_delay = 1.0\n").start()
    sock = raw_connect(d.socket)
    bad = b'{"id":%d,"op":"auth","user":"alice","password":"wrong","service":"login"}\n'
    sock.sendall(b"".join(bad % i for i in range(4)))
    replies = read_replies(sock, 4)
    assert sorted(r["error"] for r in replies) == ["auth_failed", "auth_failed", "busy", "busy"]


def test_a_client_that_keeps_max_inflight_requests_outstanding_never_hears_busy(
        make_daemon: Callable[..., Daemon]) -> None:
    """A reply frees its slot as it is sent: a client that sends its next request as each
    reply arrives, `max_inflight` outstanding all the time (authd's AsyncClient), is never
    answered `busy`, though the server may read that request before it is done with the task
    that replied."""
    from .daemon import BASE_POLICY

    window = 4
    d = make_daemon(base=BASE_POLICY.replace("[clients]", f"[daemon.limits]\nmax_inflight = {window}\n\n[clients]")).start()
    token = d.auth("alice", open_session=True)["session"]["token"]

    async def run() -> list[str]:
        async with AsyncClient(d.socket, max_inflight=window) as client:
            replies = await asyncio.gather(*(client.session(token) for _ in range(500)), return_exceptions=True)
        return [repr(r) for r in replies if isinstance(r, BaseException)]

    assert asyncio.run(run()) == []


def test_pipelined_replies_come_back_out_of_order(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("failure_delay = 1.5\n").start()
    sock = raw_connect(d.socket)
    sock.sendall(
        b'{"id":"slow","op":"auth","user":"alice","password":"wrong","service":"login"}\n'
        b'{"id":"fast","op":"auth","user":"bob","password":"correct horse","service":"login"}\n'
        b'{"id":"hello","op":"hello"}\n'
    )
    replies = read_replies(sock, 3)
    assert replies[-1]["id"] == "slow" and replies[-1]["error"] == "auth_failed"
    assert {r["id"] for r in replies[:2]} == {"fast", "hello"}


def test_failed_login_delay_does_not_delay_others(make_daemon: Callable[..., Daemon]) -> None:
    """Eleven clients waiting out 1.5 s failure delays; good logins on the same connection are not held."""
    d = make_daemon("failure_delay = 1.5\n").start()

    async def scenario() -> tuple[float, list[float], int]:
        shared = await d.aclient().connect()
        bad_clients = [await d.aclient().connect() for _ in range(10)]
        started = time.monotonic()
        bad = [asyncio.create_task(_failed(c)) for c in bad_clients]
        bad.append(asyncio.create_task(_failed(shared)))
        await _until_failed(d, 11)
        good = []
        for _ in range(5):
            t0 = time.monotonic()
            await shared.auth("bob", PASSWORD, "login")
            good.append(time.monotonic() - t0)
        answered_meanwhile = sum(t.done() for t in bad)
        await asyncio.gather(*bad)
        bad_done = time.monotonic() - started
        for c in [shared, *bad_clients]:
            await c.close()
        return bad_done, good, answered_meanwhile

    bad_done, good, answered_meanwhile = asyncio.run(scenario())
    assert bad_done >= 1.5, "the failing clients did wait"
    assert answered_meanwhile == 0, f"the good logins were answered while every failure was still held back: {good}"


async def _until_failed(d: Daemon, count: int) -> None:
    """Until `count` logins have been refused: each is then waiting out its failure delay."""
    async with d.aclient() as admin:
        while (await admin.call("status"))["counters"].get("auth:auth_failed", 0) < count:
            await asyncio.sleep(0.01)


async def _failed(client: object) -> None:
    from authd.client import ReplyError

    with pytest.raises(ReplyError) as info:
        await client.auth("alice", "wrong", "login")  # type: ignore[attr-defined]
    assert info.value.code == "auth_failed"


def test_pam_fail_delay_is_applied_without_holding_a_worker(pam: PamEnv, make_daemon: Callable[..., Daemon]) -> None:
    """pam_faildelay asks for 2 s: the failing client waits that long, while the single worker keeps serving."""
    pam.add_faildelay_service("with-delay", 2.0)
    pam.add_user("alice", PASSWORD, "with-delay")
    pam.add_user("bob", PASSWORD, "with-delay")
    from .daemon import BASE_POLICY

    d = make_daemon(base=BASE_POLICY.replace("workers = 2", "workers = 1").replace('"authd-test"', '"with-delay"')).start()

    async def scenario() -> tuple[float, float]:
        async with d.aclient() as bad, d.aclient() as good:
            t0 = time.monotonic()
            failing = asyncio.create_task(_failed(bad))
            await _until_failed(d, 1)
            await good.auth("bob", PASSWORD, "login")
            good_at = time.monotonic() - t0
            await failing
            return good_at, time.monotonic() - t0

    good_at, bad_at = asyncio.run(scenario())
    assert bad_at >= 0.9, "libpam's delay (2 s, randomised to 0.5-1.5x) was applied to the failing client"
    assert good_at < bad_at


def test_crashing_hanging_and_exiting_modules(pam: PamEnv, make_daemon: Callable[..., Daemon], crash_modules: dict[str, Path]) -> None:
    extra = []
    for name, module in crash_modules.items():
        pam.add_module_service(f"crash-{name}", module)
        pam.add_user("alice", PASSWORD, f"crash-{name}")
        extra.append(f'[[service]]\nname = "{name}"\npam_service = "crash-{name}"\n')
    from .daemon import BASE_POLICY

    d = make_daemon(base=BASE_POLICY.replace("pam_timeout = 5.0", "pam_timeout = 2.0"), extra="\n" + "\n".join(extra)).start()
    for name in crash_modules:
        reply = d.auth("alice", service=name)
        assert reply["error"] == "unavailable", (name, reply)
        assert d.auth("alice")["ok"], f"next login works after {name}"
    stats = d.call("status")["pam"]
    assert stats["crashed"] >= 2 and stats["timed_out"] >= 1
    assert d.proc is not None and d.proc.poll() is None


def test_workers_are_recycled(make_daemon: Callable[..., Daemon]) -> None:
    from .daemon import BASE_POLICY

    d = make_daemon(base=BASE_POLICY.replace("workers = 2", "workers = 1\nworker_max_calls = 3")).start()
    for _ in range(7):
        assert d.auth("alice", open_session=False)["ok"]
    assert d.call("status")["pam"]["recycled"] >= 2


def test_sessions_survive_restart_and_kill_9(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    d.start()
    first = d.auth("alice")["session"]
    assert d.stop() == 0
    d.start()
    assert d.call("session", token=first["token"])["ok"], "kept across a clean restart"
    second = d.auth("bob")["session"]
    d.stop(signal.SIGKILL)
    d.start()
    assert d.call("session", token=first["token"])["ok"]
    assert d.call("session", token=second["token"])["session"]["user"] == "bob", "kept across kill -9"


def test_each_services_ttl_and_idle_timeout_reach_its_sessions(make_daemon: Callable[..., Daemon]) -> None:
    """The expiry rules themselves run on a manual clock in `test_session_expiry.py`; the
    sweeper's `session.closed` is in `events/test_daemon_handlers.py`."""
    d = make_daemon('session_ttl = 600.0\nidle_timeout = 60.0\n'
                    '\n[[service]]\nname = "batch"\npam_service = "authd-test"\nsession_ttl = 90.0\nidle_timeout = 0\n').start()
    issued = d.auth("alice")["session"]
    idle = d.call("session", token=issued["token"])["session"]
    assert idle["expires_at"] == pytest.approx(idle["last_seen"] + 60.0, abs=1.0) and idle["expires_at"] >= issued["expires_at"]
    hard = d.call("session", token=d.auth("bob", service="batch")["session"]["token"])["session"]
    assert hard["expires_at"] == pytest.approx(hard["created"] + 90.0, abs=1.0), "no idle timeout: the ttl alone"


def test_state_is_private(daemon: Daemon) -> None:
    daemon.auth("alice")
    assert daemon.state.stat().st_mode & 0o777 == 0o700
    assert (daemon.state / "sessions.db").stat().st_mode & 0o777 == 0o600


def test_tokens_are_stored_only_hashed(daemon: Daemon) -> None:
    token = daemon.auth("alice")["session"]["token"]
    assert scan_for(token, daemon.state) == []


def test_canary_password_appears_nowhere(daemon: Daemon) -> None:
    replies = [daemon.auth("alice", CANARY), daemon.auth("nosuchuser", CANARY),
               daemon.auth("alice", CANARY, service="nope"), daemon.auth("alice", CANARY + "\0")]
    sock = raw_connect(daemon.socket)
    sock.sendall(b'{"id":1,"op":"auth","user":"alice","password":"' + CANARY.encode() + b'","service":5}\n')
    replies += read_replies(sock, 1)
    replies.append(daemon.call("status"))
    daemon.kill(signal.SIGUSR1)
    wait_for(lambda: daemon.log_lines("sessions dumped"), what="the dump")
    assert daemon.stop() == 0
    assert all(CANARY not in str(r) for r in replies)
    assert CANARY not in daemon.output()
    assert scan_for(CANARY, daemon.state, daemon.root) == []
