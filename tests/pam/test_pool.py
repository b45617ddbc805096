"""authd.pam.pool: real worker processes running real libpam under pam_wrapper."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from authd.errors import AuthdError
from authd.pam.pool import PamPool
from authd.runtime import default_workers

from ..pamenv import PamEnv
from ..procs import ignored_signals

CANARY = "canary-Pw-51d0e2"
DAEMON_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
SERVICE = "pool-test"


@pytest.fixture
def pam(tmp_path: Path, modules: dict[str, Path]) -> PamEnv:
    env = PamEnv.create(tmp_path / "pam")
    env.add_service(SERVICE)
    env.add_user("alice", CANARY, SERVICE)
    env.add_service("elsewhere")
    env.add_faildelay_service("slow", 10.0)
    for name in ("segv", "hang", "exit"):
        env.add_module_service(f"crash-{name}", modules[name])
    return env


def with_pool(
    pam: PamEnv, body: Callable[[PamPool], Awaitable[Any]], **options: Any
) -> tuple[Any, list[int]]:
    """Run ``body(pool)`` on a started pool; returns its value and every worker pid seen."""

    async def main() -> tuple[Any, list[int]]:
        pool = PamPool(**{"size": 2, "timeout": 10.0, "env": pam.env(), **options})
        await pool.start()
        pids = pool.pids()
        try:
            return await body(pool), pids
        finally:
            pids = sorted(set(pids) | set(pool.pids()))
            await pool.close(5.0)
            assert pool.stats()["idle"] == pool.stats()["busy"] == 0
            for pid in pids:
                assert not Path(f"/proc/{pid}").exists(), f"worker {pid} not reaped"

    return asyncio.run(main())


async def settle(pool: PamPool, *, size: int, timeout: float = 30.0) -> None:
    """Wait until ``size`` workers are idle again (replacements start in the background)."""
    deadline = time.monotonic() + timeout
    while pool.stats()["idle"] < size:
        assert time.monotonic() < deadline, pool.stats()
        await asyncio.sleep(0.02)


def test_outcomes(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        ok = await pool.authenticate(SERVICE, "alice", CANARY, rhost="192.0.2.1", ruser="relay")
        wrong = await pool.authenticate(SERVICE, "alice", "nope")
        unknown = await pool.authenticate(SERVICE, "mallory", CANARY)
        mismatch = await pool.authenticate("elsewhere", "alice", CANARY)
        assert ok.ok and ok.stage == "acct_mgmt"
        assert wrong == unknown and wrong.outcome == "auth_failed"
        assert mismatch.outcome == "not_authorized"
        assert pool.stats()["calls"] == 4

    with_pool(pam, body)


def test_fail_delay_reported_and_not_slept(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        started = time.monotonic()
        result = await pool.authenticate("slow", "alice", "nope")
        assert time.monotonic() - started < 5.0  # libpam would have slept at least 5 s
        assert result.outcome == "auth_failed"
        assert 5.0 <= result.fail_delay < 15.0

    with_pool(pam, body)


def test_nul_byte_raises_before_any_worker(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        with pytest.raises(ValueError, match="password") as info:
            await pool.authenticate(SERVICE, "alice", CANARY + "\0")
        assert CANARY not in str(info.value)
        with pytest.raises(ValueError, match="rhost"):
            await pool.authenticate(SERVICE, "alice", CANARY, rhost="a\0b")
        assert pool.stats()["calls"] == 0

    with_pool(pam, body, size=1)


@pytest.mark.parametrize("module", ["segv", "exit", "hang"])
def test_broken_module_costs_one_call(pam: PamEnv, module: str) -> None:
    async def body(pool: PamPool) -> None:
        [before] = pool.pids()
        result = await pool.authenticate(f"crash-{module}", "alice", CANARY)
        assert (result.outcome, result.stage) == ("unavailable", "worker")
        assert (await pool.authenticate(SERVICE, "alice", CANARY)).ok
        assert pool.pids() != [before]
        stats = pool.stats()
        assert stats["timed_out" if module == "hang" else "crashed"] == 1
        assert stats["spawned"] == 2

    with_pool(pam, body, size=1, timeout=1.0)


def test_recycled_after_max_calls(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> set[int]:
        seen = set()
        for _ in range(7):
            assert (await pool.authenticate(SERVICE, "alice", CANARY)).ok
            await settle(pool, size=1)
            seen.update(pool.pids())
        assert pool.stats()["recycled"] == 2
        return seen

    seen, _ = with_pool(pam, body, size=1, max_calls=3)
    assert len(seen) == 3


def test_callers_beyond_size_wait_in_fifo_order(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        finished: list[int] = []

        async def one(i: int) -> None:
            assert (await pool.authenticate(SERVICE, "alice", CANARY)).ok
            finished.append(i)

        tasks = [asyncio.create_task(one(i)) for i in range(12)]
        await asyncio.sleep(0)
        assert pool.stats()["waiting"] == 11
        await asyncio.gather(*tasks)
        assert finished == list(range(12))
        assert pool.stats()["waiting"] == 0

    with_pool(pam, body, size=1)


def test_waiting_uids_take_turns(pam: PamEnv) -> None:
    """Ten calls of uid 1000 queued before one of uid 1001: that one is served second, not eleventh."""

    async def body(pool: PamPool) -> None:
        finished: list[str] = []

        async def one(name: str, uid: int) -> None:
            assert (await pool.authenticate(SERVICE, "alice", CANARY, uid=uid)).ok
            finished.append(name)

        tasks = [asyncio.create_task(one(f"a{i}", 1000)) for i in range(10)]
        tasks.append(asyncio.create_task(one("b0", 1001)))
        await asyncio.sleep(0)
        assert (pool.stats()["waiting"], pool.stats()["waiting_uids"]) == (10, 2)
        await asyncio.gather(*tasks)
        assert finished == ["a0", "a1", "b0", *(f"a{i}" for i in range(2, 10))]

    with_pool(pam, body, size=1)


def test_uid_past_its_queue_bound_is_busy_at_once(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        left: list[int | None] = []
        pool.room = left.append
        calls = [pool.authenticate(SERVICE, "alice", CANARY, uid=1000, max_queued=3) for _ in range(8)]
        calls.append(pool.authenticate(SERVICE, "alice", CANARY, uid=1001, max_queued=3))
        tasks = [asyncio.create_task(call) for call in calls]
        await asyncio.sleep(0)
        assert (pool.queued(1000), pool.queued(1001)) == (3, 1)
        results = await asyncio.gather(*tasks)
        assert left == [1000, 1001, 1000, 1000], "each call that left a queue was reported with its uid"
        # one takes the idle worker, three wait, four are refused without waiting; uid 1001 is served
        assert [r.outcome for r in results] == ["ok"] * 4 + ["busy"] * 4 + ["ok"]
        assert {(r.stage, r.pam_code) for r in results if r.outcome == "busy"} == {("worker", -1)}
        stats = pool.stats()
        assert (stats["refused_busy"], stats["calls"]) == (4, 5)

    with_pool(pam, body, size=1)


def test_cancelled_waiter_leaves_its_uids_queue(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        stuck = asyncio.create_task(pool.authenticate("crash-hang", "alice", CANARY, uid=7))
        while pool.stats()["busy"] == 0:
            await asyncio.sleep(0.01)
        left: list[int | None] = []
        pool.room = left.append
        queued = [asyncio.create_task(pool.authenticate(SERVICE, "alice", CANARY, uid=1000, max_queued=2))
                  for _ in range(2)]
        await asyncio.sleep(0)
        assert (pool.stats()["waiting"], pool.stats()["waiting_uids"]) == (2, 1)
        queued[0].cancel()
        await asyncio.sleep(0)
        assert (pool.stats()["waiting"], pool.stats()["waiting_uids"]) == (1, 1)
        assert left == [1000], "a call that gives up makes room too"
        again = asyncio.create_task(pool.authenticate(SERVICE, "alice", CANARY, uid=1000, max_queued=2))
        await asyncio.sleep(0)
        assert pool.stats()["waiting"] == 2, "the cancelled call's place was given back"
        stuck.cancel()
        assert (await queued[1]).ok and (await again).ok
        assert queued[0].cancelled()
        assert (pool.stats()["waiting"], pool.stats()["waiting_uids"], pool.stats()["refused_busy"]) == (0, 0, 0)

    with_pool(pam, body, size=1)


def test_many_concurrent_callers_all_served(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        passwords = [CANARY if i % 3 else "nope" for i in range(40)]
        results = await asyncio.gather(
            *(pool.authenticate(SERVICE, "alice", pw) for pw in passwords)
        )
        assert [r.ok for r in results] == [pw == CANARY for pw in passwords]
        assert pool.stats()["calls"] == 40

    with_pool(pam, body, size=3, max_calls=7)


def test_cancelled_caller_does_not_leak_a_worker(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        [stuck] = pool.pids()
        task = asyncio.create_task(pool.authenticate("crash-hang", "alice", CANARY))
        while pool.stats()["busy"] == 0:
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(pool.authenticate(SERVICE, "alice", CANARY))
        while pool.stats()["waiting"] == 0:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await waiting).ok
        assert stuck not in pool.pids()
        await settle(pool, size=1)

    with_pool(pam, body, size=1)


def test_idle_worker_killed_from_outside_is_replaced(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        victim, other = pool.pids()
        os.kill(victim, signal.SIGKILL)
        while victim in pool.pids() or pool.stats()["idle"] < 2:
            await asyncio.sleep(0.02)
        results = await asyncio.gather(
            *(pool.authenticate(SERVICE, "alice", CANARY) for _ in range(4))
        )
        assert all(r.ok for r in results)
        assert other in pool.pids()

    with_pool(pam, body)


def test_workers_ignore_the_daemons_signals(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        pids = pool.pids()
        assert all(set(DAEMON_SIGNALS) <= ignored_signals(pid) for pid in pids), "discarded as they are sent"
        for pid in pids:
            for sig in DAEMON_SIGNALS:
                os.kill(pid, sig)
        assert (await pool.authenticate(SERVICE, "alice", CANARY)).ok
        assert pool.pids() == pids and pool.stats()["crashed"] == 0

    with_pool(pam, body)


def test_close_lets_calls_in_flight_finish(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        calls = [asyncio.create_task(pool.authenticate(SERVICE, "alice", CANARY)) for _ in range(6)]
        await asyncio.sleep(0)
        await pool.close(10.0)
        assert all(c.result().ok for c in calls)
        after = await pool.authenticate(SERVICE, "alice", CANARY)
        assert after.outcome == "unavailable"

    with_pool(pam, body)


def test_close_kills_a_call_stuck_past_the_deadline(pam: PamEnv) -> None:
    async def body(pool: PamPool) -> None:
        stuck = asyncio.create_task(pool.authenticate("crash-hang", "alice", CANARY))
        while pool.stats()["busy"] == 0:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await pool.close(0.3)
        assert time.monotonic() - started < 5.0
        assert (await stuck).outcome == "unavailable"

    with_pool(pam, body, size=1, timeout=30.0)


def test_start_fails_loudly_when_workers_cannot_run(pam: PamEnv) -> None:
    async def main() -> None:
        pool = PamPool(size=2, env={**pam.env(), "PYTHONHOME": "/nonexistent"})
        with pytest.raises(AuthdError, match="PAM worker failed to start"):
            await pool.start()
        assert pool.pids() == []

    asyncio.run(main())


def test_canary_password_never_leaves_the_worker(
    pam: PamEnv, capfd: pytest.CaptureFixture[str]
) -> None:
    services = [SERVICE, "elsewhere", "slow", "crash-segv", "crash-exit", "crash-hang", "nosuch"]

    async def body(pool: PamPool) -> str:
        results = [await pool.authenticate(s, "alice", CANARY, rhost="192.0.2.9") for s in services]
        return repr(results) + repr(pool.stats())

    text, _ = with_pool(pam, body, size=1, timeout=1.0)
    captured = capfd.readouterr()  # worker stderr is inherited, so this includes theirs
    assert CANARY not in text
    assert CANARY not in captured.out + captured.err


ORPHAN = """
import asyncio, json, sys
from authd.pam.pool import PamPool

async def main():
    pool = PamPool(size=1, timeout=300, env=json.loads(sys.argv[1]))
    await pool.start()
    call = asyncio.create_task(pool.authenticate("crash-hang", "alice", "x"))
    while pool.stats()["busy"] == 0:
        await asyncio.sleep(0.01)
    print(pool.pids()[0], flush=True)
    await call

asyncio.run(main())
"""


def test_worker_stuck_in_pam_dies_with_the_daemon(pam: PamEnv) -> None:
    daemon = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, json.dumps(pam.env())],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert daemon.stdout is not None
        worker = int(daemon.stdout.readline())
        daemon.kill()
        daemon.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(worker):
            assert time.monotonic() < deadline, f"worker {worker} outlived its parent"
            time.sleep(0.05)
    finally:
        daemon.kill()
        daemon.wait()


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for init to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize(("cpus", "workers"), [(None, 4), (1, 4), (3, 6), (8, 16), (64, 16)])
def test_default_workers_two_per_cpu_within_bounds(cpus: int | None, workers: int) -> None:
    assert default_workers(cpus) == workers


def test_workers_keep_modules_loaded_unless_told_not_to(pam: PamEnv) -> None:
    def mapped_after_a_call(keep: bool) -> bool:
        async def body(pool: PamPool) -> bool:
            assert (await pool.authenticate(SERVICE, "alice", CANARY)).ok
            [pid] = pool.pids()
            return "pam_matrix" in Path(f"/proc/{pid}/maps").read_text()
        return with_pool(pam, body, size=1, keep_modules=keep)[0]

    assert mapped_after_a_call(True) and not mapped_after_a_call(False)


def test_groups_come_back_only_when_asked_for(pam: PamEnv) -> None:
    pam.add_user("root", CANARY, SERVICE)  # a user NSS knows, so it has groups

    async def body(pool: PamPool) -> None:
        asked = await pool.authenticate(SERVICE, "root", CANARY, groups=True)
        unasked = await pool.authenticate(SERVICE, "root", CANARY, groups=False)
        account = await pool.account(SERVICE, "root", groups=True)
        assert asked.ok and "root" in asked.groups and "root" in account.groups
        assert unasked.ok and unasked.groups == ()

    with_pool(pam, body, size=1)


def test_worker_refuses_unknown_arguments() -> None:
    for argv in (["3", "--frobnicate"], ["3", "--keep-modules", "extra"], ["x"]):
        proc = subprocess.run([sys.executable, "-m", "authd.pam.worker", *argv], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2 and "usage" in proc.stderr
