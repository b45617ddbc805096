"""A real Postfix smtpd authenticates SMTP clients through authd, on both SASL types."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..daemon import PASSWORD, Daemon, wait_for
from ..mail.clients import auth_client, mail_daemon, mux
from .postfix import Postfix

LOCKOUT = """
[lockout.rhost]
max_failures = 3
interval = 600
lock_time = 600
"""


@pytest.fixture
def postfix() -> Iterator[Callable[[str, Path], Postfix]]:
    """Postfix's unprivileged processes must reach its directories: not under pytest's 0700 tmp."""
    started: list[Postfix] = []

    def start(sasl_type: str, socket_path: Path) -> Postfix:
        root = Path(tempfile.mkdtemp(prefix="authd-postfix-", dir="/tmp"))
        root.chmod(0o755)
        instance = Postfix(root, sasl_type, socket_path)
        started.append(instance)
        return instance.start()

    yield start
    for instance in started:
        instance.stop()
        shutil.rmtree(instance.root, ignore_errors=True)


@pytest.mark.parametrize("sasl_type", ["dovecot", "cyrus"])
def test_postfix_auth_plain_and_login(sasl_type: str, make_daemon: Callable[..., Daemon],
                                      postfix: Callable[[str, Path], Postfix]) -> None:
    d = mail_daemon(make_daemon).start()
    pf = postfix(sasl_type, auth_client(d) if sasl_type == "dovecot" else mux(d))
    for mechanism in ("PLAIN", "LOGIN"):
        assert pf.login("alice", PASSWORD, mechanism)[0] == 235, pf.output()
        assert pf.login("alice", "wrong", mechanism)[0] == 535
        assert pf.login("mallory", "wrong", mechanism)[0] == 535
    protocol = "dovecot" if sasl_type == "dovecot" else "saslauthd"
    succeeded = [r for r in d.log_lines("auth succeeded") if r.get("protocol") == protocol]
    assert len(succeeded) == 2 and {r["user"] for r in succeeded} == {"alice"}
    assert "sasl_username=alice" in pf.output()


def test_postfix_client_ip_reaches_lockout_through_dovecot(make_daemon: Callable[..., Daemon],
                                                            postfix: Callable[[str, Path], Postfix]) -> None:
    d = mail_daemon(make_daemon, LOCKOUT).start()
    pf = postfix("dovecot", auth_client(d))
    for i in range(3):
        assert pf.login("alice", f"wrong-{i}", "PLAIN")[0] == 535
    assert pf.login("bob", PASSWORD, "PLAIN")[0] == 535, "127.0.0.1 is locked for everyone"
    rows = {(r["scope"], r["key"]): r for r in d.call("lockouts")["lockouts"]}
    assert rows[("rhost", "127.0.0.1")]["locked"]
    failed = [r for r in d.log_lines("auth failed") if r.get("protocol") == "dovecot"]
    assert {r["rhost"] for r in failed} == {"127.0.0.1"} and failed[-1]["error"] == "locked_out"


def test_swaks_against_postfix_with_dovecot(make_daemon: Callable[..., Daemon], postfix: Callable[[str, Path], Postfix]) -> None:
    d = mail_daemon(make_daemon).start()
    pf = postfix("dovecot", auth_client(d))

    def swaks(password: str) -> str:
        argv = ["swaks", "--server", f"127.0.0.1:{pf.port}", "--auth", "LOGIN", "--auth-user", "bob",
                "--auth-password", password, "--quit-after", "AUTH"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout

    assert "235 2.7.0" in swaks(PASSWORD)
    assert "535 5.7.8" in swaks("wrong")
    wait_for(lambda: d.log_lines("auth failed"), what="the failure in authd's log")
