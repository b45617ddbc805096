"""Secrets at rest: a private state dir, private files whatever the umask, and no password anywhere.

The canary scan over every file of the whole test run is the session fixture in tests/conftest.py;
this module drives one daemon through every path a password can take and scans its outputs.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from ..daemon import CANARY, PAM_SERVICE, Daemon, raw_connect, read_replies, scan_for, wait_for
from ..pamenv import PamEnv
from .helpers import lockout_table

HANDLERS = '\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n\n[[handler]]\ntype = "lastlog"\n'


@pytest.mark.parametrize("mode", [0o770, 0o720, 0o702, 0o777])
def test_refuses_a_state_dir_others_may_write(make_daemon: Callable[..., Daemon], mode: int) -> None:
    d = make_daemon()
    d.state.mkdir()
    d.state.chmod(mode)
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(30) == 1
    assert "writable by group or others" in d.output() and str(d.state) in d.output()
    assert list(d.state.iterdir()) == [], "nothing was written into it"


def test_state_and_files_are_private_even_with_umask_0(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(lockout_table(user="{ max_failures = 2 }") + HANDLERS,
                    base=_with_daemon_key('log_file = "authd-own.log"'))
    old = os.umask(0)
    try:
        d.start()
    finally:
        os.umask(old)
    d.auth("alice")
    d.auth("bob", "wrong-1")
    d.auth("bob", "wrong-2")
    d.kill(signal.SIGUSR1)
    wait_for(lambda: list(d.state.glob("sessions-*.json")), what="a dump")
    assert d.stop() == 0
    assert stat.S_IMODE(d.state.stat().st_mode) == 0o700
    found = {}
    for path in [*d.state.rglob("*"), d.root / "audit.jsonl", d.root / "authd-own.log"]:
        found[path.name] = stat.S_IMODE(path.stat().st_mode)
    assert {"sessions.db", "lockout.db", "lastlog.sqlite3", "authd-own.log", "audit.jsonl"} <= set(found), found
    assert {name: mode for name, mode in found.items() if mode & 0o077} == {}


def test_canary_password_reaches_no_output(pam: PamEnv, make_daemon: Callable[..., Daemon],
                                           crash_modules: dict[str, Path]) -> None:
    """The canary as a right password, a wrong one, a locked-out one, one PAM crashes on, one
    in malformed and over-long requests; then reload, dumps, status, drain. No reply, log line,
    event, state file or dump may contain it."""
    pam.add_user("carol", CANARY, PAM_SERVICE)  # PAM's own input (excluded from the session scan)
    pam.add_module_service("crash", crash_modules["segv"])
    crash = '\n[[service]]\nname = "crash"\npam_service = "crash"\n'
    d = make_daemon(lockout_table(user="{ max_failures = 2 }") + HANDLERS + crash).start()
    replies = [
        d.auth("carol", CANARY),
        d.auth("carol", CANARY, open_session=False),
        d.auth("alice", CANARY),
        d.auth("alice", CANARY + "-2"),
        d.auth("alice", CANARY + "-3"),  # locked out
        d.auth("nobody-here", CANARY, rhost="203.0.113.9"),
        d.auth("bob", CANARY, service="crash"),
        d.auth("alice", CANARY, service="no-such-service"),
    ]
    assert [r.get("error") for r in replies] == [None, None, "auth_failed", "auth_failed", "locked_out",
                                                  "auth_failed", "unavailable", "not_authorized"]
    secret = CANARY.encode()
    sock = raw_connect(d.socket)
    sock.sendall(b'{"id":1,"op":"auth","user":"u","password":"' + secret + b'\\u0000","service":"login"}\n'
                 b'{"id":2,"op":"auth","user":"u","password":"' + secret + b'","service":"login","x":1}\n'
                 b'{"id":3,"op":"auth","user":5,"password":"' + secret + b'","service":"login"}\n'
                 b'{"id":4,"op":"auth","user":"u","password":"' + secret * 4000 + b'","service":"login"}\n'
                 b'{"id":5,"op":"auth","user":"u","password":"' + secret + b'"\n')
    replies += read_replies(sock, 5)
    sock.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(d.socket))
    sock.sendall(b'{"id":6,"op":"auth","user":"u","password":"' + secret)  # then hang up mid-line
    sock.close()
    d.kill(signal.SIGUSR1)
    d.kill(signal.SIGUSR2)
    replies.append(d.call("reload"))
    replies.append(d.call("status"))
    replies.append(d.call("sessions"))
    replies.append(d.call("lockouts"))
    wait_for(lambda: d.log_lines("sessions dumped") and d.log_lines("status"), what="the dump and the status line")
    assert d.stop() == 0

    assert [r for r in replies if CANARY in str(r)] == []
    assert CANARY not in d.output()
    assert scan_for(CANARY, d.root, d.state) == []
    assert d.log_lines("auth failed") and d.log_lines("auth succeeded"), "the paths were really logged"


def _with_daemon_key(line: str) -> str:
    from ..daemon import BASE_POLICY

    return BASE_POLICY.replace("[daemon]\n", f"[daemon]\n{line}\n")
