"""The credential cache in a real daemon: the account-only PAM worker op, and the admin
ops that flush it (`authctl cache flush`, revoke, unlock)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from .daemon import Daemon

CACHE = """
[cache]
enabled = true
watch = []
"""


def hits(d: Daemon) -> int:
    return d.call("status")["counters"].get("cache:hit", 0)


def test_hits_run_only_the_account_phase_and_each_flush_empties(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(CACHE).start()
    assert d.auth("alice", open_session=False)["ok"]
    assert d.auth("alice", open_session=False)["ok"] and hits(d) == 1
    assert d.call("cache_flush", user="alice")["flushed"] == 1
    assert d.auth("alice", open_session=False)["ok"] and hits(d) == 1, "a miss after the flush"
    ctl = [sys.executable, "-m", "authd.ctl", "-s", str(d.socket), "cache", "flush"]
    out = subprocess.run(ctl, capture_output=True, text=True, timeout=30, env=d.env())
    assert out.returncode == 0 and '"flushed": 1' in out.stdout
    assert d.auth("alice", open_session=False)["ok"]
    assert d.call("revoke", user="alice")["ok"]
    assert d.auth("alice", open_session=False)["ok"] and hits(d) == 1, "revoke flushed the user"
    d.call("unlock", key="alice")
    assert d.auth("alice", open_session=False)["ok"] and hits(d) == 1, "unlock flushed the user"
    assert d.auth("alice", open_session=False)["ok"] and hits(d) == 2
    events = [r for r in d.log_lines("auth succeeded") if r.get("cached")]
    assert len(events) == 2
