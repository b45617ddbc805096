"""Log forging against the real daemon: user names built to get an innocent address banned by
fail2ban, or to drive the terminal of whoever reads the log, in both log formats.

The filter is contrib/fail2ban's, run by the real `fail2ban-regex` over the daemon's own log.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable

import pytest

from ..daemon import BASE_POLICY, Daemon
from ..lockout.test_fail2ban import FORGED, match_file

ATTACKER = "198.51.100.24"  # the forger's own address: banning it is right
GUESSER = "203.0.113.9"

pytestmark = pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban not installed")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_fail2ban_bans_the_real_rhost_never_a_forged_one(make_daemon: Callable[..., Daemon], fmt: str) -> None:
    # stderr is a file here, as under most init systems: no terminal, so no colours either.
    d = make_daemon(base=BASE_POLICY.replace("[daemon]\n", f'[daemon]\nlog_format = "{fmt}"\n')).start()
    for i in range(3):
        assert d.auth("alice", f"wrong-{i}", rhost=GUESSER)["error"] == "auth_failed"
    for user in FORGED:
        assert d.auth(user, "guess", rhost=ATTACKER)["error"] == "auth_failed"
        assert d.auth(user, "guess")["error"] == "auth_failed"  # no rhost at all
    assert d.stop() == 0

    matched = Counter(ip for ip, _, _ in match_file(d.log))
    assert matched == Counter({GUESSER: 3, ATTACKER: len(FORGED)}), d.output()
    raw = d.log.read_bytes()
    for control in (b"\x1b", b"\r", "\u2028".encode(), "\x85".encode(), b"\x0b"):
        assert control not in raw, f"{control!r} reached the log as is"
    if fmt == "console":
        assert raw.count(b"\n") == len(raw.splitlines()), "one line per record"
        assert r"user='x\x1b[2K\r[warning  ] auth failed" in raw.decode()
