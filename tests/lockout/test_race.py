"""Concurrency: the failure budget is reserved before PAM, so it cannot be overshot."""

from __future__ import annotations

import asyncio
from pathlib import Path

from authd.lockout import Attempt, Locked, Lockout

from .helpers import config, run

PAM_TIME = 0.01


class SimulatedPam:
    """Stands in for the PAM call (as the issue asks: a short sleep, then the verdict).

    Counts the attempts that got through and the most that were inside at once.
    """

    def __init__(self) -> None:
        self.reached = 0
        self.inside = 0
        self.most_inside = 0

    async def attempt(
        self, lockout: Lockout, user: str, rhost: str | None, password: str, ok: bool = False
    ) -> Locked | Attempt:
        outcome = await lockout.begin(user, rhost, password)
        if isinstance(outcome, Locked):
            return outcome
        self.reached += 1
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        await asyncio.sleep(PAM_TIME)
        self.inside -= 1
        lockout.finish(outcome, ok)
        return outcome


@run
async def test_hundred_concurrent_guesses_for_one_user_at_most_five_reach_pam(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 5}, rhost={"max_failures": 1000}), db_path)
    pam = SimulatedPam()
    results = await asyncio.gather(
        *(pam.attempt(lockout, "alice", "203.0.113.9", f"guess-{i}") for i in range(100))
    )
    assert pam.reached == 5 and pam.most_inside <= 5
    refusals = [r for r in results if isinstance(r, Locked)]
    assert len(refusals) == 95 and {r.scope for r in refusals} == {"user"}
    assert [(row.key, row.locked) for row in lockout.lockouts() if row.scope == "user"] == [("alice", True)]
    lockout.close()


@run
async def test_hundred_concurrent_guesses_from_one_rhost_at_most_five_reach_pam(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 5}, rhost={"max_failures": 5}), db_path)
    pam = SimulatedPam()
    results = await asyncio.gather(
        *(pam.attempt(lockout, f"user{i}", "2001:db8::1", "123456") for i in range(100))
    )
    assert pam.reached == 5
    assert sum(isinstance(r, Locked) and r.scope == "rhost" for r in results) == 95
    lockout.close()


@run
async def test_identical_concurrent_guesses_count_once(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 2}, rhost={"max_failures": 0}), db_path)
    pam = SimulatedPam()
    results = await asyncio.gather(*(pam.attempt(lockout, "alice", None, "same") for _ in range(50)))
    assert all(isinstance(r, Attempt) for r in results)
    assert [(row.failures, row.locked) for row in lockout.lockouts()] == [(1, False)]
    lockout.close()


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@run
async def test_success_in_flight_lets_waiters_proceed(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 2}, rhost={"max_failures": 0}), db_path)
    first = await lockout.begin("alice", None, "right")
    second = await lockout.begin("alice", None, "typo")
    assert isinstance(first, Attempt) and isinstance(second, Attempt)
    waiter = asyncio.create_task(lockout.begin("alice", None, "another"))
    await _settle()
    assert not waiter.done()

    assert lockout.finish(second, False) == ()
    await _settle()
    assert not waiter.done()
    assert lockout.finish(first, True) == ()
    third = await waiter
    assert isinstance(third, Attempt)
    assert lockout.lockouts() == []
    lockout.close()


@run
async def test_failures_in_flight_turn_waiters_into_refusals(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 2}, rhost={"max_failures": 0}), db_path)
    held = [await lockout.begin("alice", None, p) for p in ("a", "b")]
    waiters = [asyncio.create_task(lockout.begin("alice", None, f"w{i}")) for i in range(10)]
    await _settle()
    assert not any(w.done() for w in waiters)
    assert lockout.finish(held[0], False) == ()
    (lock,) = lockout.finish(held[1], False)
    results = await asyncio.gather(*waiters)
    assert all(isinstance(r, Locked) and r.until == lock.until for r in results)
    lockout.close()


@run
async def test_cancel_returns_the_slot_without_counting(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 1}, rhost={"max_failures": 0}), db_path)
    first = await lockout.begin("alice", None, "a")
    assert isinstance(first, Attempt)
    waiter = asyncio.create_task(lockout.begin("alice", None, "b"))
    await _settle()
    assert not waiter.done()
    lockout.cancel(first)
    second = await waiter
    assert isinstance(second, Attempt)
    assert lockout.lockouts() == []
    lockout.cancel(first)
    assert lockout.finish(first, False) == ()
    assert len(lockout.finish(second, False)) == 1
    lockout.cancel(second)
    lockout.close()


@run
async def test_cancelled_waiter_leaves_nothing_behind(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 1}, rhost={"max_failures": 0}), db_path)
    first = await lockout.begin("alice", None, "a")
    assert isinstance(first, Attempt)
    waiters = [asyncio.create_task(lockout.begin("alice", None, f"w{i}")) for i in range(5)]
    await _settle()
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    lockout.finish(first, True)
    assert isinstance(await lockout.begin("alice", None, "next"), Attempt)
    lockout.close()


@run
async def test_raising_the_limit_on_reload_releases_waiters(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 1}, rhost={"max_failures": 0}), db_path)
    first = await lockout.begin("alice", None, "a")
    waiter = asyncio.create_task(lockout.begin("alice", None, "b"))
    await _settle()
    assert not waiter.done()
    lockout.configure(config(user={"max_failures": 3}, rhost={"max_failures": 0}))
    assert isinstance(await waiter, Attempt)
    assert isinstance(first, Attempt)
    lockout.close()


@run
async def test_concurrent_logins_with_the_same_password_run_together(db_path: Path) -> None:
    """A service account logging in from many connections at once is not serialised: the same
    guess shares one slot, since it can only ever count as one failure."""
    lockout = Lockout(config(user={"max_failures": 2}), db_path)
    pam = SimulatedPam()
    results = await asyncio.gather(*(pam.attempt(lockout, "svc", None, "same-secret", ok=True) for _ in range(20)))
    assert all(isinstance(r, Attempt) for r in results) and pam.most_inside == 20
    wrong = await asyncio.gather(*(pam.attempt(lockout, "svc", None, "same-wrong") for _ in range(20)))
    assert all(isinstance(r, Attempt) for r in wrong)
    assert [(row.failures, row.locked) for row in lockout.lockouts() if row.scope == "user"] == [(1, False)]
    lockout.close()
