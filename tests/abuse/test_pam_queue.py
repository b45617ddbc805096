"""One uid's flood of logins against the real daemon: another uid's login is not queued behind it.

The flooder is benchmarks/bench_fairness.py's, running as uid nobody: it keeps more logins in
flight than its uid may queue for PAM, each with an unknown user name (they pass the lockout
budgets) and a wrong password. Every PAM call spends 20 ms in a module (like hashing), so the
queue stays full. The victim's wait is measured in the flood's own PAM completions (from the
daemon's `status`), not in seconds, so a loaded machine cannot make it pass or fail: behind a
single FIFO the victim would wait for every flood call queued ahead of it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from benchmarks.bench_fairness import Flooder

from ..daemon import PAM_SERVICE, PASSWORD, SERVICE, Daemon, wait_for
from ..pamenv import TEST_MODULES, PamEnv, compile_pam_module
from .helpers import with_limits

QUEUED = 16  # max_queued_per_uid
WORKERS = 2  # the base policy's
NOBODY = 65534


def test_a_flood_from_one_uid_does_not_hold_another_uids_login(make_daemon: Callable[..., Daemon], pam: PamEnv,
                                                                 tmp_path: Path) -> None:
    slow = compile_pam_module(TEST_MODULES / "slow.c", tmp_path)
    pam.add_service(PAM_SERVICE, [f"auth optional {slow} ms=20", pam.matrix("auth", PAM_SERVICE),
                                  pam.matrix("account", PAM_SERVICE)])
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

    # FIFO: the flood's calls queued ahead of each login would all complete before it.
    assert all(done < queued for done, queued in zip(flood_done, ahead, strict=True)), (flood_done, ahead)
    # Turns: the calls already in the workers, about one more per worker, and what completes while
    # `status` is asked (3 on an idle machine).
    assert max(flood_done) <= QUEUED // 2, (flood_done, ahead)
    assert min(ahead) >= QUEUED // 2, f"the flood did not keep its queue full: {ahead}"
    assert counts["busy"] == refused >= 2 * 32 - WORKERS - QUEUED, (counts, refused)
    assert counts.get("auth_failed", 0) > 0 and set(counts) <= {"busy", "auth_failed"}, counts
