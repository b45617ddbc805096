"""The saslauthd and Dovecot sockets of a real daemon: the same decision, limits and drain."""

from __future__ import annotations

import base64
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..daemon import PASSWORD, Daemon, as_nobody, raw_connect, wait_for
from ..pamenv import PamEnv
from authd.saslauthd.codec import encode_request

from .clients import DovecotClient, auth_client, mail_daemon, mux, plain, read_counted, saslauthd

LOCKOUT = """
[lockout.rhost]
max_failures = 2
interval = 600
lock_time = 600
"""


def test_saslauthd_four_and_five_fields(make_daemon: Callable[..., Daemon]) -> None:
    d = mail_daemon(make_daemon).start()
    assert saslauthd(d, "alice", PASSWORD) == b"OK"
    assert saslauthd(d, "alice", PASSWORD, addr="192.0.2.1;2525") == b"OK"
    assert saslauthd(d, "alice", "wrong") == saslauthd(d, "mallory", "wrong") == b"NO authentication failed"
    assert saslauthd(d, "alice", PASSWORD, service="imap").startswith(b"NO "), "unmapped, unknown service"
    assert saslauthd(d, "alice", PASSWORD, service="login") == b"OK", "a [[service]] name needs no mapping"
    succeeded = [r for r in d.log_lines("auth succeeded") if r["protocol"] == "saslauthd"]
    assert len(succeeded) == 3


def test_group_rules_apply_to_mail_logins(make_daemon: Callable[..., Daemon], pam: PamEnv) -> None:
    pam.add_user("root", PASSWORD, "authd-test")  # root is in group `root` on every system
    denied = mail_daemon(make_daemon, 'deny_groups = ["root"]\n').start()
    assert saslauthd(denied, "root", PASSWORD) == b"NO not authorized for this service"
    assert saslauthd(denied, "alice", PASSWORD) == b"OK"
    denied.stop()
    allowed = mail_daemon(make_daemon, 'allow_groups = ["root"]\n').start()
    assert saslauthd(allowed, "root", PASSWORD) == b"OK"
    assert saslauthd(allowed, "alice", PASSWORD) == b"NO not authorized for this service"


def test_saslauthd_realm_is_appended_like_dash_r(make_daemon: Callable[..., Daemon], pam) -> None:  # type: ignore[no-untyped-def]
    pam.add_user("carol@example.org", PASSWORD, "authd-test")
    d = mail_daemon(make_daemon, mail="""
[saslauthd]
socket = "{sock_dir}/mux"
services = {{ smtp = "login" }}
append_realm = true
""").start()
    assert saslauthd(d, "carol", PASSWORD, realm="example.org") == b"OK"
    assert saslauthd(d, "alice", PASSWORD) == b"OK", "no realm: the login as it is"
    assert saslauthd(d, "alice", PASSWORD, realm="example.org").startswith(b"NO")


def test_testsaslauthd_against_the_mux(make_daemon: Callable[..., Daemon]) -> None:
    d = mail_daemon(make_daemon).start()

    def run(password: str) -> str:
        argv = ["testsaslauthd", "-u", "alice", "-p", password, "-s", "smtp", "-f", str(mux(d))]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()

    assert run(PASSWORD) == '0: OK "Success."'
    assert run("wrong") == '0: NO "authentication failed"'


def test_saslauthd_malformed_requests_are_answered_and_the_daemon_serves_on(make_daemon: Callable[..., Daemon]) -> None:
    d = mail_daemon(make_daemon, "[daemon.limits]\nrequest_timeout = 1.0\n").start()
    with raw_connect(mux(d)) as sock:
        sock.sendall(b"\x01\x01" + b"a" * 257)
        assert read_counted(sock) == b"NO login longer than 256 bytes"
        assert sock.recv(10) == b"", "one request per connection"
    with raw_connect(mux(d)) as sock:
        sock.sendall(b"\x00\x05al")  # and never the rest
        assert sock.recv(10) == b"", "closed after request_timeout"
    with raw_connect(mux(d)) as sock:
        sock.sendall(b"\x00\x00\x00\x02pw\x00\x04smtp\x00\x00")
        assert read_counted(sock) == b"NO NULL login received"
    assert saslauthd(d, "alice", PASSWORD) == b"OK"
    assert d.call("hello")["ok"]
    assert d.call("status")["counters"]["saslauthd:malformed"] == 2


def test_dovecot_handshake_plain_login_and_pipelining(make_daemon: Callable[..., Daemon]) -> None:
    d = mail_daemon(make_daemon).start()
    with DovecotClient(d) as c:
        assert c.handshake[:3] == ["VERSION\t1\t2", "MECH\tPLAIN\tplaintext", "MECH\tLOGIN\tplaintext"]
        assert [line.split("\t")[0] for line in c.handshake[3:]] == ["SPID", "CUID", "COOKIE", "DONE"]
        assert c.plain(1, "alice", PASSWORD) == "OK\t1\tuser=alice"
        assert c.plain(2, "alice", "wrong") == c.plain(3, "mallory", "wrong").replace("3", "2").replace("mallory", "alice")
        c.send("AUTH\t4\tLOGIN\tservice=smtp\trip=192.0.2.10")
        assert c.line() == "CONT\t4\tVXNlcm5hbWU6"
        c.send("CONT\t4\t" + base64.b64encode(b"bob").decode())
        assert c.line() == "CONT\t4\tUGFzc3dvcmQ6"
        c.send("CONT\t4\t" + base64.b64encode(PASSWORD.encode()).decode())
        assert c.line() == "OK\t4\tuser=bob"
        c.send("AUTH\t5\tPLAIN\tservice=smtp")
        assert c.line() == "CONT\t5\t", "the TAB before an empty challenge stays"
        for i in range(10, 20):
            c.send(f"AUTH\t{i}\tPLAIN\tservice=smtp\tresp=" + base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode())
        assert sorted(c.line() for _ in range(10)) == sorted(f"OK\t{i}\tuser=alice" for i in range(10, 20))


def test_dovecot_failures_are_plain_and_unavailability_is_temp_fail(
        make_daemon: Callable[..., Daemon], pam: PamEnv, crash_modules: dict[str, Path]) -> None:
    pam.add_module_service("crashing", crash_modules["segv"])
    d = mail_daemon(make_daemon, '[[service]]\nname = "crash"\npam_service = "crashing"\n').start()
    with DovecotClient(d) as c:
        assert c.plain(1, "alice", "wrong") == "FAIL\t1\tuser=alice\treason=authentication failed"
        assert c.plain(2, "alice", PASSWORD, service="crash") == "FAIL\t2\tuser=alice\tcode=temp_fail\treason=authentication is unavailable"


def test_dovecot_rip_reaches_lockout_logs_and_events(make_daemon: Callable[..., Daemon]) -> None:
    d = mail_daemon(make_daemon, LOCKOUT).start()
    with DovecotClient(d) as c:
        assert c.plain(1, "alice", "one", rip="203.0.113.66").startswith("FAIL\t1")
        assert c.plain(2, "alice", "two", rip="203.0.113.66").startswith("FAIL\t2")
        assert c.plain(3, "alice", PASSWORD, rip="203.0.113.66").startswith("FAIL\t3"), "the address is locked"
        assert c.plain(4, "alice", PASSWORD, rip="198.51.100.1") == "OK\t4\tuser=alice"
    rows = {(r["scope"], r["key"]): r for r in d.call("lockouts")["lockouts"]}
    assert rows[("rhost", "203.0.113.66")]["locked"]
    failed = [r for r in d.log_lines("auth failed") if r.get("protocol") == "dovecot"]
    assert {r["rhost"] for r in failed} == {"203.0.113.66"} and failed[-1]["error"] == "locked_out"
    assert saslauthd(d, "bob", PASSWORD, addr="203.0.113.66;4000").startswith(b"NO"), "one lockout for every front end"


def test_dovecot_malformed_input_is_answered_or_closed(make_daemon: Callable[..., Daemon]) -> None:
    d = mail_daemon(make_daemon, "[daemon.limits]\nrequest_timeout = 1.0\n").start()
    with DovecotClient(d) as c:
        c.send("AUTH\t1\tPLAIN\tservice=smtp\tresp=***")
        assert c.line() == "FAIL\t1\treason=Invalid base64 data"
        c.send("AUTH\t2\tDIGEST-MD5\tservice=smtp")
        assert c.line() == "FAIL\t2\treason=Unsupported authentication mechanism"
        c.send("CONT\t99\tYQ==")
        assert c.line() == "", "a CONT for nothing closes the connection"
    with DovecotClient(d) as c:
        c.sock.sendall(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=AGFsaWNl")  # no newline, ever
        assert c.line() == "", "closed after request_timeout"
    with DovecotClient(d) as c:
        c.sock.sendall(b"x" * 20000 + b"\n")
        assert c.line() == ""
    with DovecotClient(d) as c:
        assert c.plain(1, "alice", PASSWORD) == "OK\t1\tuser=alice"


def test_dovecot_require_secured(make_daemon: Callable[..., Daemon]) -> None:
    d = mail_daemon(make_daemon, mail="""
[dovecot]
socket = "{sock_dir}/auth-client"
services = {{ smtp = "login" }}
require_secured = true
""").start()
    with DovecotClient(d) as c:
        assert c.plain(1, "alice", PASSWORD).startswith("FAIL\t1\treason=Plaintext")
        c.send("AUTH\t2\tPLAIN\tservice=smtp\tsecured\tresp=" + base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode())
        assert c.line() == "OK\t2\tuser=alice"


def test_forbidden_peer_is_refused_on_every_socket(make_daemon: Callable[..., Daemon]) -> None:
    d = mail_daemon(make_daemon)
    d.write_policy(d.policy.replace('users = ["*"]', 'users = ["root"]'))
    d.start()
    request = encode_request("alice", PASSWORD, "smtp", "")
    assert as_nobody(mux(d), request) == b"\x00\x21NO this uid/gid may not use authd"
    dovecot = b"VERSION\t1\t0\nAUTH\t1\tPLAIN\tservice=smtp\tresp=" + plain("alice", PASSWORD).encode() + b"\n"
    reply = as_nobody(auth_client(d), dovecot)
    assert reply == b"", "refused at accept: Dovecot's protocol has nothing to say before a request"
    assert saslauthd(d, "alice", PASSWORD) == b"OK", "root may"
    counters = d.call("status")["counters"]
    assert counters["connections_refused_forbidden"] == 2 and "client_forbidden" not in counters, "refused at accept"


def test_drain_answers_an_inflight_dovecot_request(make_daemon: Callable[..., Daemon]) -> None:
    d = mail_daemon(make_daemon, "failure_delay = 3.0\n").start()
    with DovecotClient(d) as c:
        c.send("AUTH\t1\tPLAIN\tservice=smtp\tresp=" + base64.b64encode(b"\0alice\0wrong").decode())
        wait_for(lambda: d.log_lines("auth failed"), what="the failure to be decided")
        d.kill(signal.SIGTERM)
        assert c.line().startswith("FAIL\t1\t"), "the drain cuts the delay short and answers"
        assert c.line() == ""
    assert d.proc is not None and d.proc.wait(30) == 0
    assert not mux(d).exists() and not auth_client(d).exists()
