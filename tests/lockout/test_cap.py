"""The cap on tracked keys (`max_keys`): what is evicted, what never is, and what a full table does.

Manual clock, real SQLite file. The property test at the end drives a flood of names against
a small cap and checks the safety rules on every step.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from authd.lockout import Attempt, Locked, Lockout

from ..clock import ManualClock
from .helpers import config, fail_distinct, login, run

USER_ONLY = {"rhost": {"max_failures": 0}}


def tracked(lockout: Lockout) -> dict[str, int]:
    return {row.key: row.failures for row in lockout.lockouts() if not row.locked}


def locked(lockout: Lockout) -> set[str]:
    return {row.key for row in lockout.lockouts() if row.locked}


async def flood(lockout: Lockout, count: int, tag: str = "flood") -> None:
    for i in range(count):
        await login(lockout, f"{tag}-{i}", "guess")


@run
async def test_a_flood_of_names_stays_within_the_cap(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 5}, max_keys=50, **USER_ONLY), db_path, clock=ManualClock())
    await flood(lockout, 500)
    assert lockout.stats() == {"keys": 50, "evicted": 450, "refused_full": 0}
    assert sorted(tracked(lockout)) == sorted(f"flood-{i}" for i in range(450, 500)), "the least recent went"
    lockout.close()
    restarted = Lockout(config(user={"max_failures": 5}, max_keys=50, **USER_ONLY), db_path, clock=ManualClock())
    assert len(restarted.lockouts()) == 50, "evicted keys are gone from the file too"
    restarted.close()


@run
async def test_the_fewest_failures_go_first_and_past_locks_last(db_path: Path) -> None:
    clock = ManualClock()
    table = {"user": {"max_failures": 3, "lock_time": 10.0}, "max_keys": 3, **USER_ONLY}
    lockout = Lockout(config(**table), db_path, clock=clock)
    await fail_distinct(lockout, "veteran", 3)  # locked once ...
    clock.now += 11  # ... and the lock is over, but its lock count is remembered
    await login(lockout, "veteran", "again")
    await fail_distinct(lockout, "near", 2)
    await login(lockout, "one", "x")
    assert tracked(lockout) == {"veteran": 1, "near": 2, "one": 1}

    await login(lockout, "new-1", "x")
    assert tracked(lockout) == {"veteran": 1, "near": 2, "new-1": 1}, "one failure, least recent"
    await login(lockout, "new-2", "x")
    assert tracked(lockout) == {"veteran": 1, "near": 2, "new-2": 1}
    await fail_distinct(lockout, "new-2", 1, tag="more")
    await login(lockout, "new-3", "x")
    assert tracked(lockout) == {"veteran": 1, "new-2": 2, "new-3": 1}, "then the fewer of two-failure keys"
    await fail_distinct(lockout, "new-3", 1, tag="more")
    await login(lockout, "new-4", "x")
    assert tracked(lockout) == {"veteran": 1, "new-3": 2, "new-4": 1}, "a key once locked goes last"
    lockout.close()


@run
async def test_a_lock_is_never_evicted(db_path: Path) -> None:
    clock = ManualClock()
    lockout = Lockout(config(user={"max_failures": 3, "lock_time": 600.0}, max_keys=10, **USER_ONLY), db_path, clock=clock)
    (lock,) = (await fail_distinct(lockout, "alice", 3))[2]
    await flood(lockout, 1000)
    refused = await lockout.begin("alice", None, "the-right-password")
    assert isinstance(refused, Locked) and (refused.until, refused.lock_count) == (lock.until, 1)
    assert lockout.stats()["evicted"] == 991
    lockout.close()


@run
async def test_a_key_with_an_attempt_in_pam_is_never_evicted(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 3}, max_keys=5, **USER_ONLY), db_path, clock=ManualClock())
    await fail_distinct(lockout, "alice", 1)
    in_pam = await lockout.begin("alice", None, "second-guess")
    assert isinstance(in_pam, Attempt)
    await flood(lockout, 100)
    assert lockout.finish(in_pam, False) == ()
    assert tracked(lockout)["alice"] == 2, "the failure counted into the tracked key"
    lockout.close()


@run
async def test_a_table_full_of_locks_refuses_new_names_until_locks_end(db_path: Path) -> None:
    clock = ManualClock()
    table = {"user": {"max_failures": 1, "lock_time": 300.0}, "max_keys": 4, **USER_ONLY}
    lockout = Lockout(config(**table), db_path, clock=clock)
    await flood(lockout, 4, tag="locked")
    assert len(locked(lockout)) == 4

    refused = await lockout.begin("newcomer", None, "right")
    assert isinstance(refused, Locked)
    assert (refused.scope, refused.key, refused.lock_count, refused.retry_after) == ("user", "newcomer", 0, 300)
    assert len(locked(lockout)) == 4 and lockout.stats()["refused_full"] == 1, "no lock was lifted"

    clock.now += 299
    assert isinstance(await lockout.begin("newcomer", None, "right"), Locked)
    clock.now += 1  # the first lock ends: its key may be evicted at once
    attempt = await lockout.begin("newcomer", None, "right")
    assert isinstance(attempt, Attempt)
    lockout.finish(attempt, True)
    lockout.close()


@run
async def test_a_user_refused_for_room_does_not_leave_a_key_in_the_other_scope(db_path: Path) -> None:
    table = {"user": {"max_failures": 5}, "rhost": {"max_failures": 1, "lock_time": 300.0}, "max_keys": 2}
    lockout = Lockout(config(**table), db_path, clock=ManualClock())
    await login(lockout, "a", "x", "192.0.2.1")
    await login(lockout, "b", "x", "192.0.2.2")  # two rhost locks fill that scope; users a, b have one failure
    assert isinstance(await lockout.begin("c", "192.0.2.3", "x"), Locked)
    assert {row.key for row in lockout.lockouts() if row.scope == "user"} == {"a", "b"}
    lockout.close()


@run
async def test_lowering_the_cap_evicts_down_to_it_but_keeps_locks(db_path: Path) -> None:
    table = {"user": {"max_failures": 2}, **USER_ONLY}
    lockout = Lockout(config(**table, max_keys=100), db_path, clock=ManualClock())
    await fail_distinct(lockout, "alice", 2)
    await fail_distinct(lockout, "bob", 2)
    await flood(lockout, 20)
    lockout.configure(config(**table, max_keys=5))
    assert lockout.stats()["keys"] == 5 and locked(lockout) == {"alice", "bob"}
    lockout.configure(config(**table, max_keys=1))
    assert lockout.stats()["keys"] == 2 and locked(lockout) == {"alice", "bob"}, "locks stay past the cap"
    lockout.close()


@run
async def test_a_restart_with_a_smaller_cap_keeps_every_lock(db_path: Path) -> None:
    clock = ManualClock()
    table = {"user": {"max_failures": 2}, **USER_ONLY}
    lockout = Lockout(config(**table, max_keys=100), db_path, clock=clock)
    await fail_distinct(lockout, "alice", 2)
    await flood(lockout, 30)
    lockout.close()
    restarted = Lockout(config(**table, max_keys=3), db_path, clock=clock)
    assert isinstance(await restarted.begin("alice", None, "x"), Locked)
    assert restarted.stats()["keys"] == 3 and locked(restarted) == {"alice"}
    restarted.close()


name_op = st.tuples(st.just("login"), st.integers(0, 11), st.integers(0, 3), st.sampled_from([False] * 5 + [True]))
steps = st.lists(
    st.one_of(name_op, name_op, name_op, st.tuples(st.just("wait"), st.sampled_from([1.0, 20.0, 70.0]))),
    min_size=20, max_size=80,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cap=st.integers(1, 6), max_failures=st.integers(1, 3), progressive=st.booleans(), steps=steps)
def test_under_any_flood_the_cap_holds_and_no_lock_is_lifted_early(
    cap: int, max_failures: int, progressive: bool, steps: list[tuple[Any, ...]]
) -> None:
    """Twelve names against a cap of at most six: the table never holds more than the cap; a
    lock, once imposed, refuses its user until it ends; a name is refused for want of room
    only when every tracked key is locked."""
    clock = ManualClock()
    table = {"user": {"max_failures": max_failures, "interval": 60.0, "lock_time": 30.0},
             "progressive": progressive, "max_lock_time": 120.0, "max_keys": cap, **USER_ONLY}
    locks: dict[str, float] = {}

    async def scenario(db_path: Path) -> None:
        lockout = Lockout(config(**table), db_path, clock=clock)
        for step in steps:
            if step[0] == "wait":
                clock.now += step[1]
                continue
            _, n, guess, ok = step
            user = f"user-{n}"
            outcome = await lockout.begin(user, None, f"guess-{guess}")
            if locks.get(user, 0.0) > clock.now:
                assert isinstance(outcome, Locked) and outcome.lock_count > 0 and outcome.until >= locks[user]
            if isinstance(outcome, Locked):
                if outcome.lock_count == 0:
                    event("refused for want of room")
                    assert len(locked(lockout)) == cap, "refused for room only when all keys are locked"
                else:
                    assert outcome.until is not None
                    locks[user] = max(locks.get(user, 0.0), outcome.until)
            else:
                for lock in lockout.finish(outcome, ok):
                    assert lock.until is not None
                    locks[user] = lock.until
            assert lockout.stats()["keys"] <= cap
            if lockout.stats()["evicted"]:
                event("evicted")
        lockout.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp) / "lockout.db"))
