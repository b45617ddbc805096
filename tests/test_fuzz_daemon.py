"""The running daemon's socket under mutated input (benchmarks/fuzz_daemon.py, bounded here).

3000 seeded inputs: every complete line must get one well-formed reply or a clean close, and
the daemon must stay healthy (hello answered, process alive, no internal errors, no traceback,
no password in its log). `python -m benchmarks.fuzz_daemon --seconds 600` runs it for longer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable

import pytest

from benchmarks.fuzz_daemon import (
    LIMITS,
    POLICY_EXTRA,
    Fuzzer,
    Input,
    Mutator,
    check_replies,
    corpus,
    describe,
    expected_replies,
)

from .daemon import (
    BASE_POLICY,
    CANARY,
    PASSWORD,
    Daemon,
    raw_connect,
    read_replies,
    wait_for,
)

SEED = int(os.environ.get("AUTHD_FUZZ_SEED", "20261126"))
INPUTS = 3000


def fuzz_daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon(POLICY_EXTRA, base=BASE_POLICY.replace("[clients]", LIMITS + "[clients]")).start()


def test_mutated_requests_get_replies_and_the_daemon_stays_healthy(make_daemon: Callable[..., Daemon]) -> None:
    d = fuzz_daemon(make_daemon)
    fuzzer = Fuzzer(d.socket, Mutator(SEED, corpus(PASSWORD, CANARY)),
                    alive=lambda: d.proc is not None and d.proc.poll() is None)
    report = asyncio.run(fuzzer.run(inputs=INPUTS))
    assert report.tried == INPUTS and report.health_checks >= INPUTS // 250
    assert report.findings == [], "\n".join(describe(f) for f in report.findings[:10])
    status = d.call("status")
    assert status["state"] == "ready" and "internal_errors" not in status["counters"]
    assert d.stop() == 0
    assert "Traceback" not in d.output() and not [r for r in d.log_lines() if "exception" in r]
    assert CANARY not in d.output()


def test_undecodable_lines_are_answered_and_the_connection_keeps_serving(daemon: Daemon) -> None:
    sock = raw_connect(daemon.socket)
    lines = [b'{"id":"\xff\xfe","op":"hello"}', b'{"id":1,"op":"auth","user":"\xc0\xaf","password":"p","service":"s"}',
             b"[" * 30_000, b'{"a":' * 10_000]
    sock.sendall(b"".join(line + b'\n{"id":"next","op":"hello"}\n' for line in lines))
    replies = read_replies(sock, 2 * len(lines))
    assert sorted(str(r.get("error")) for r in replies) == ["None"] * len(lines) + ["bad_request"] * len(lines)
    assert "internal_errors" not in daemon.call("status")["counters"]


def test_a_codec_failure_costs_one_connection_not_the_daemon(daemon: Daemon) -> None:
    """Whatever the codec does with a line, the server answers, counts and closes; others go on."""
    sock = raw_connect(daemon.socket)
    sock.sendall(b'{"id":"\xff","op":"hello"}\n' + b"[" * 30_000 + b'\n{"id":2,"op":"hello"}\n')
    replies = read_replies(sock, 3)
    assert replies and all(r["ok"] is False and r["error"] == "bad_request" for r in replies[:-1])
    assert daemon.call("hello")["ok"]
    assert daemon.proc is not None and daemon.proc.poll() is None


@pytest.mark.parametrize("line", [
    "session_ttl = 1" + "0" * 5000,
    "allow_users = " + "[" * 5000 + "]" * 5000,
    "x = " + "{a = " * 3000 + "1" + "}" * 3000,
], ids=["huge-integer", "deep-array", "deep-inline-table"])
def test_pathological_policy_on_reload_keeps_the_daemon(daemon: Daemon, line: str) -> None:
    """A reload must never take the daemon down, whatever the file holds: the old policy stays."""
    daemon.write_policy(daemon.policy + line + "\n")
    daemon.kill(signal.SIGHUP)
    wait_for(lambda: daemon.proc is not None and daemon.proc.poll() is not None or daemon.call("status")["last_reload_error"],
             what="the reload to fail")
    assert daemon.proc is not None and daemon.proc.poll() is None, "SIGHUP killed the daemon"
    status = daemon.call("status")
    assert status["generation"] == 1 and str(daemon.config) in status["last_reload_error"]
    assert daemon.auth("alice")["ok"]


def test_the_oracle_is_not_vacuous() -> None:
    assert expected_replies(b'{"id":1}\n\n  \n{"id":2}', 64) == 1
    assert expected_replies(b"x" * 65 + b"\n" + b"y" * 65, 64) == 2
    ok = b'{"id":1,"ok":true}\n'
    assert check_replies(b"a\n", ok, 64) is None
    assert check_replies(b"a\nb\n", ok, 64) == "1 replies for 2 complete lines"
    assert check_replies(b"a\n", b'{"id":1,"ok":true}', 64) == "reply not newline-terminated"
    assert check_replies(b"a\n", b'{"id":1,"ok":false,"error":"oops","message":"m"}\n', 64)
    assert check_replies(b"a\n", b'{"id":true,"ok":true}\n', 64)
    assert check_replies(b"a\n", b"[1]\n", 64)
    one, two = Mutator(7, corpus("p", "c")), Mutator(7, corpus("p", "c"))
    first = [one.next() for _ in range(200)]
    assert first == [two.next() for _ in range(200)], "a seed replays"
    assert any(i.hang_up is not None for i in first) and any(i.data.count(b"\n") > 5 for i in first)
    assert json.loads(Mutator(1, corpus("p", "c")).encode({"id": 1})) == {"id": 1}
    assert isinstance(first[0], Input)
