"""One uid's flood of logins against the real daemon: another uid's login is not queued behind it.

The flooder is benchmarks/bench_fairness.py's, running as uid nobody: it keeps more logins in
flight than its uid may queue for PAM, each with an unknown user name (they pass the lockout
budgets) and a wrong password. Every PAM call spends 20 ms in a module (like hashing), so the
queue stays full. The victim's wait is measured in the flood's own PAM completions (from the
daemon's `status`), not in seconds, so a loaded machine cannot make it pass or fail: behind a
single FIFO the victim would wait for every flood call queued ahead of it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any
from pathlib import Path

from benchmarks.bench_fairness import Flooder

from ..daemon import PAM_SERVICE, PASSWORD, SERVICE, Daemon, raw_connect, read_replies, wait_for
from ..pamenv import TEST_MODULES, PamEnv, compile_pam_module
from .helpers import lockout_table, with_limits

QUEUED = 16  # max_queued_per_uid
WORKERS = 2  # the base policy's
NOBODY = 65534


def slow_pam(pam: PamEnv, tmp_path: Path) -> None:
    """Every PAM call of the test service spends 20 ms before pam_matrix decides."""
    slow = compile_pam_module(TEST_MODULES / "slow.c", tmp_path)
    pam.add_service(PAM_SERVICE, [f"auth optional {slow} ms=20", pam.matrix("auth", PAM_SERVICE),
                                  pam.matrix("account", PAM_SERVICE)])


def test_a_flood_from_one_uid_does_not_hold_another_uids_login(make_daemon: Callable[..., Daemon], pam: PamEnv,
                                                                 tmp_path: Path) -> None:
    slow_pam(pam, tmp_path)
    d = make_daemon(base=with_limits(max_queued_per_uid=QUEUED)).start()

    def pam_stats() -> dict[str, int]:
        return d.call("status")["pam"]

    # 2 x 32 sent at once: 2 take the workers, QUEUED wait, the rest are refused `busy` and not
    # sent again; each flood call that completes is replaced by a new one, so the queue stays full.
    with Flooder(d.socket, d.env(), uid=NOBODY, gid=NOBODY, connections=2, depth=32, mode="hold",
                 service=SERVICE) as flooder:
        flooder.wait_started()
        wait_for(lambda: pam_stats()["waiting"] >= QUEUED - 1, what="the flood to fill its uid's queue")
        ahead, flood_done = [], []
        with d.client() as victim:
            for _ in range(10):
                before = pam_stats()
                victim.auth("alice", PASSWORD, SERVICE, open_session=False)  # raises unless ok
                after = pam_stats()
                ahead.append(before["waiting"])
                flood_done.append(after["calls"] - before["calls"] - 1)
        refused = pam_stats()["refused_busy"]
        counts = flooder.stop()

    # FIFO: every flood call queued ahead of a login would complete before it (done >= ahead).
    # Turns: the calls already in the workers, about one more per worker, and what completes while
    # `status` is asked: 3 of the ~15 ahead on an idle machine.
    assert sum(flood_done) * 2 < sum(ahead), (flood_done, ahead)
    assert statistics.median(flood_done) <= QUEUED // 4, (flood_done, ahead)
    assert statistics.median(ahead) >= QUEUED // 2, f"the flood did not keep its queue full: {ahead}"
    assert counts["busy"] == refused > 0, (counts, refused)  # about 2 x 32 - WORKERS - QUEUED
    assert counts.get("auth_failed", 0) > 0 and set(counts) <= {"busy", "auth_failed"}, counts


def test_a_busy_login_counts_neither_as_failure_nor_as_success(make_daemon: Callable[..., Daemon], pam: PamEnv,
                                                                tmp_path: Path) -> None:
    """Refused `busy`, nothing was tried: lockout must not count it (a flood could lock a user
    out) nor take it for a success (which would forget the user's earlier failures)."""
    slow_pam(pam, tmp_path)
    d = make_daemon(lockout_table(user="{ max_failures = 20 }", rhost="{ max_failures = 0 }"),
                    base=with_limits(max_queued_per_uid=1)).start()
    for i in range(2):
        assert d.auth(password=f"wrong-{i}")["error"] == "auth_failed"
    sock = raw_connect(d.socket)
    guess = b'{"id":%d,"op":"auth","user":"alice","password":"guess-%d","service":"login"}\n'
    sock.sendall(b"".join(guess % (i, i) for i in range(10)))  # 2 reach the workers, 1 waits
    errors = [reply["error"] for reply in read_replies(sock, 10)]
    assert set(errors) == {"auth_failed", "busy"}, errors
    assert [r["failures"] for r in d.call("lockouts")["lockouts"] if r["key"] == "alice"] == [
        2 + errors.count("auth_failed")]
    assert d.call("status")["pam"]["refused_busy"] == errors.count("busy")



def victim_under_spin_flood(d: Daemon, busy_counter: Callable[[dict[str, Any]], int], *, depth: int,
                            queue_full_at: int) -> tuple[int, int, list[int], dict[str, Any], dict[str, int]]:
    """Root logs in 10 times while uid nobody keeps 8 connections x `depth` logins going and
    resends every reply at once, `busy` included. Returns the `busy` answers (as counted by
    `busy_counter` in `status`) and the PAM calls in that window, the flood calls completed
    during each login, the last `status` and what the flooder got."""

    def status() -> dict[str, Any]:
        return d.call("status")

    with Flooder(d.socket, d.env(), uid=NOBODY, gid=NOBODY, connections=8, depth=depth, mode="spin",
                 service=SERVICE) as flooder:
        flooder.wait_started()
        wait_for(lambda: status()["pam"]["waiting"] >= queue_full_at, what="the flood to fill the PAM queue")
        before = status()
        flood_done = []
        with d.client() as victim:
            for _ in range(10):
                calls = status()["pam"]["calls"]
                victim.auth("alice", PASSWORD, SERVICE, open_session=False)  # raises unless ok
                flood_done.append(status()["pam"]["calls"] - calls - 1)
        after = status()
        counts = flooder.stop()
    return (busy_counter(after) - busy_counter(before), after["pam"]["calls"] - before["pam"]["calls"], flood_done,
            after, counts)


def test_a_flood_that_resends_every_busy_at_once_waits_unread_instead_of_bouncing(
        make_daemon: Callable[..., Daemon], pam: PamEnv, tmp_path: Path) -> None:
    """Each `busy` answered at once with a new request made the event loop a bounce machine:
    thousands of refusals per PAM call, and everyone's login waited for the loop. Now a uid
    with a full queue is not read from until a call leaves it (`authd.intake`). Counted in
    the daemon's own units (flood refusals per flood PAM call while root logs in), not seconds."""
    slow_pam(pam, tmp_path)
    d = make_daemon(base=with_limits(max_queued_per_uid=QUEUED)).start()
    bounced, calls, flood_done, after, counts = victim_under_spin_flood(
        d, lambda status: status["pam"]["refused_busy"], depth=32, queue_full_at=QUEUED - 1)
    # Before: hundreds of `busy` per PAM call. Now the flood's resent requests wait in its
    # sockets; a rare one still races into a full queue.
    assert bounced * 4 < calls, (bounced, calls)
    assert statistics.median(flood_done) <= QUEUED // 4, flood_done  # and the turns still hold
    assert after["connections"]["paused"] > 0  # the flood's connections, waiting unread
    assert after["counters"]["paused_uid_queue"] > 0
    assert counts.get("auth_failed", 0) > 0 and set(counts) <= {"busy", "auth_failed"}, counts


def test_a_flood_that_resends_every_busy_past_max_inflight_waits_unread_instead_of_bouncing(
        make_daemon: Callable[..., Daemon], pam: PamEnv, tmp_path: Path) -> None:
    """The same bounce off `max_inflight` (a connection's own bound), with a PAM queue bound
    the flood never reaches: the connection is not read while it has `max_inflight` in flight."""
    slow_pam(pam, tmp_path)
    d = make_daemon(base=with_limits(max_inflight=4, max_queued_per_uid=1000)).start()
    bounced, calls, flood_done, after, counts = victim_under_spin_flood(
        d, lambda status: status["counters"].get("refused_busy", 0), depth=16, queue_full_at=8 * 4 - WORKERS - 1)
    assert bounced * 4 < calls, (bounced, calls)  # before: thousands of `busy` per PAM call
    assert after["pam"]["refused_busy"] == 0 and after["counters"]["paused_inflight"] > 0
    assert counts.get("auth_failed", 0) > 0 and set(counts) <= {"busy", "auth_failed"}, counts
