"""Each lockout rule, against a real SQLite file; time is a manual clock the tests move."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from authd.lockout import Attempt, Locked, LockInfo, Lockout

from ..clock import ManualClock
from .helpers import config, fail_distinct, login, run

NO_RHOST = {"rhost": {"max_failures": 0}}


@run
async def test_user_locked_after_max_distinct_failures(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 3}, **NO_RHOST), db_path)
    results = await fail_distinct(lockout, "alice", 3)
    assert results[:2] == [(), ()]
    (lock,) = results[2]
    assert (lock.scope, lock.key, lock.lock_count) == ("user", "alice", 1)
    assert lock.until == pytest.approx(lock.locked_at + 600)
    assert 590 <= lock.retry_after <= 600

    refused = await lockout.begin("alice", "203.0.113.9", "the-right-password")
    assert isinstance(refused, Locked) and refused.scope == "user"
    assert isinstance(await lockout.begin("bob", None, "x"), Attempt)
    lockout.close()


@run
async def test_user_names_share_a_budget_regardless_of_case(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 3}, **NO_RHOST), db_path)
    await login(lockout, "Alice", "a")
    await login(lockout, "ALICE", "b")
    (lock,) = await login(lockout, "alice", "c")
    assert lock.key == "alice"
    assert isinstance(await lockout.begin("AlIcE", None, "d"), Locked)
    lockout.close()


@run
async def test_rhost_locked_across_users(db_path: Path) -> None:
    lockout = Lockout(config(rhost={"max_failures": 3}), db_path)
    assert await login(lockout, "alice", "x", "203.0.113.9") == ()
    assert await login(lockout, "bob", "x", "203.0.113.9") == ()
    (lock,) = await login(lockout, "carol", "x", "203.0.113.9")
    assert (lock.scope, lock.key) == ("rhost", "203.0.113.9")

    refused = await lockout.begin("dave", "::ffff:203.0.113.9", "x")
    assert isinstance(refused, Locked) and refused.scope == "rhost"
    assert await login(lockout, "dave", "x", "203.0.113.10") == ()
    assert await login(lockout, "dave", "y") == ()
    lockout.close()


@run
async def test_identical_wrong_password_counts_once(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 3}, rhost={"max_failures": 3}), db_path)
    for _ in range(10):
        assert await login(lockout, "alice", "same-typo", "203.0.113.9") == ()
    assert [(row.scope, row.failures) for row in lockout.lockouts()] == [("user", 1), ("rhost", 1)]
    assert await login(lockout, "alice", "other-typo", "203.0.113.9") == ()
    locks = await login(lockout, "alice", "third-typo", "203.0.113.9")
    assert {lock.scope for lock in locks} == {"user", "rhost"}
    lockout.close()


@run
async def test_lock_expires_after_lock_time_with_a_fresh_budget(db_path: Path) -> None:
    clock = ManualClock()
    lockout = Lockout(config(user={"max_failures": 2, "lock_time": 0.5}, **NO_RHOST), db_path, clock=clock)
    (lock,) = (await fail_distinct(lockout, "alice", 2))[1]
    assert lock.retry_after == 1
    clock.now = lock.until - 0.001
    assert isinstance(await lockout.begin("alice", None, "x"), Locked)
    clock.now = lock.until
    assert await login(lockout, "alice", "after-1") == ()
    assert len(await login(lockout, "alice", "after-2")) == 1
    lockout.close()


@run
async def test_interval_is_a_sliding_window(db_path: Path) -> None:
    clock = ManualClock()
    lockout = Lockout(config(user={"max_failures": 3, "interval": 1.0}, **NO_RHOST), db_path, clock=clock)
    await fail_distinct(lockout, "alice", 1, tag="oldest")
    clock.now += 0.5
    await fail_distinct(lockout, "alice", 1, tag="old")
    clock.now += 0.6  # the first failure is out of the window, the second still in it
    assert await fail_distinct(lockout, "alice", 1, tag="middle") == [()]
    assert lockout.lockouts()[0].failures == 2
    clock.now += 0.5  # now the second is out too
    assert await fail_distinct(lockout, "alice", 1, tag="new") == [()]
    assert lockout.lockouts()[0].failures == 2
    assert len(await login(lockout, "alice", "newest")) == 1
    lockout.close()


@run
async def test_success_resets_the_user_but_not_the_rhost(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 3}, rhost={"max_failures": 4}), db_path)
    await fail_distinct(lockout, "alice", 2, "203.0.113.9")
    assert await login(lockout, "alice", "right", "203.0.113.9", ok=True) == ()
    assert [(row.scope, row.failures) for row in lockout.lockouts()] == [("rhost", 2)]
    assert await fail_distinct(lockout, "alice", 1, "203.0.113.9", tag="again") == [()]
    (lock,) = await login(lockout, "alice", "again-2", "203.0.113.9")
    assert lock.scope == "rhost"
    lockout.close()


async def _lock_once(lockout: Lockout, user: str, tag: str) -> Locked:
    (lock,) = await login(lockout, user, tag)
    return lock


def _wait_out(clock: ManualClock, lock: Locked) -> None:
    assert lock.until is not None
    clock.now = lock.until


@run
async def test_progressive_lock_times_double_up_to_the_cap(db_path: Path) -> None:
    table = {"user": {"max_failures": 1, "lock_time": 0.2}, "progressive": True, "max_lock_time": 0.7}
    clock = ManualClock()
    lockout = Lockout(config(**table, **NO_RHOST), db_path, clock=clock)
    lengths = []
    for i in range(4):
        lock = await _lock_once(lockout, "alice", f"p{i}")
        lengths.append((lock.lock_count, lock.until - lock.locked_at))
        _wait_out(clock, lock)
    assert lengths == [
        (1, pytest.approx(0.2)), (2, pytest.approx(0.4)), (3, pytest.approx(0.7)), (4, pytest.approx(0.7)),
    ]
    assert await login(lockout, "alice", "right", ok=True) == ()
    lock = await _lock_once(lockout, "alice", "after-success")
    assert (lock.lock_count, lock.until - lock.locked_at) == (1, pytest.approx(0.2))
    lockout.close()


@run
async def test_without_progressive_every_lock_has_the_same_length(db_path: Path) -> None:
    clock = ManualClock()
    lockout = Lockout(config(user={"max_failures": 1, "lock_time": 0.2}, **NO_RHOST), db_path, clock=clock)
    for i in range(3):
        lock = await _lock_once(lockout, "alice", f"p{i}")
        assert (lock.lock_count, lock.until - lock.locked_at) == (i + 1, pytest.approx(0.2))
        _wait_out(clock, lock)
    lockout.close()


@run
async def test_exempt_users_and_rhosts(db_path: Path) -> None:
    table = {
        "user": {"max_failures": 2},
        "rhost": {"max_failures": 2},
        "exempt_users": ["Nagios"],
        "exempt_rhosts": ["10.0.0.0/8", "2001:db8::/32", "mail.example.org"],
    }
    lockout = Lockout(config(**table), db_path)
    assert await fail_distinct(lockout, "nagios", 5) == [()] * 5
    results = await fail_distinct(lockout, "nagios", 3, "198.51.100.1", tag="from-host")
    assert [lock.scope for lock in results[1]] == ["rhost"]
    assert isinstance(results[2], Locked) and results[2].scope == "rhost"

    for rhost in ("10.1.2.3", "::ffff:10.9.9.9", "2001:db8::5", "MAIL.example.org"):
        results = await fail_distinct(lockout, f"user-{rhost}", 2, rhost)
        assert [lock.scope for lock in results[1]] == ["user"], rhost
    assert {row.key for row in lockout.lockouts() if row.scope == "rhost"} == {"198.51.100.1"}
    lockout.close()


@run
async def test_root_is_exempt_only_when_configured(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 2}, **NO_RHOST), db_path)
    await fail_distinct(lockout, "root", 2)
    assert isinstance(await lockout.begin("root", None, "x"), Locked)

    lockout.configure(config(user={"max_failures": 2}, exempt_root=True, **NO_RHOST))
    assert await fail_distinct(lockout, "root", 5, tag="later") == [()] * 5
    assert lockout.lockouts() == []
    lockout.close()


@run
async def test_permanent_lock_stays_until_unlocked(db_path: Path) -> None:
    table = {"user": {"max_failures": 2, "lock_time": 0, "permanent": True}, **NO_RHOST}
    clock = ManualClock()
    lockout = Lockout(config(**table), db_path, clock=clock)
    (lock,) = (await fail_distinct(lockout, "alice", 2))[1]
    assert (lock.until, lock.retry_after) == (None, None)
    clock.now += 10 * 365 * 86400.0
    refused = await lockout.begin("alice", None, "x")
    assert isinstance(refused, Locked) and refused.until is None
    assert lockout.unlock("alice")
    assert isinstance(await lockout.begin("alice", None, "x"), Attempt)
    lockout.close()


@run
async def test_unlock_user_or_rhost(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 2}, rhost={"max_failures": 2}), db_path)
    await fail_distinct(lockout, "alice", 2, "203.0.113.9")
    assert {row.scope for row in lockout.lockouts() if row.locked} == {"user", "rhost"}

    assert lockout.unlock("203.0.113.9")
    assert [row.key for row in lockout.lockouts()] == ["alice"]
    assert lockout.unlock("ALICE", "user")
    assert not lockout.unlock("alice")
    assert not lockout.unlock("nobody")
    assert lockout.lockouts() == []
    assert isinstance(await lockout.begin("alice", "203.0.113.9", "x"), Attempt)
    lockout.close()


@run
async def test_lockouts_lists_counters_and_locks(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 2}, rhost={"max_failures": 5}), db_path)
    await login(lockout, "alice", "a", "203.0.113.9")
    before = time.time()
    await fail_distinct(lockout, "bob", 2, "203.0.113.9")
    rows = lockout.lockouts()
    assert [(r.scope, r.key, r.failures, r.locked, r.lock_count) for r in rows] == [
        ("user", "alice", 1, False, 0),
        ("user", "bob", 0, True, 1),
        ("rhost", "203.0.113.9", 3, False, 0),
    ]
    assert rows[0] == LockInfo(
        scope="user", key="alice", failures=1, locked=False, locked_at=None, until=None,
        retry_after=None, lock_count=0,
    )
    assert rows[1].locked_at is not None and rows[1].locked_at >= before
    assert rows[1].retry_after == 600
    lockout.close()


@run
async def test_state_survives_restart(db_path: Path) -> None:
    table = {"user": {"max_failures": 3}, "rhost": {"max_failures": 10}}
    first = Lockout(config(**table), db_path)
    await fail_distinct(first, "alice", 2, "203.0.113.9")
    await fail_distinct(first, "bob", 3, "203.0.113.9")
    first.close()

    second = Lockout(config(**table), db_path)
    assert [(r.key, r.failures, r.locked) for r in second.lockouts()] == [
        ("alice", 2, False), ("bob", 0, True), ("203.0.113.9", 5, False),
    ]
    refused = await second.begin("bob", None, "x")
    assert isinstance(refused, Locked) and refused.key == "bob"
    # The identical-password key lived in the old process: a repeat counts once more.
    (lock,) = await login(second, "alice", "wrong-0")
    assert lock.key == "alice"
    second.close()


@run
async def test_lock_count_survives_restart_for_progressive_locks(db_path: Path) -> None:
    table = {"user": {"max_failures": 1, "lock_time": 0.2}, "progressive": True, "max_lock_time": 5, **NO_RHOST}
    clock = ManualClock()
    first = Lockout(config(**table), db_path, clock=clock)
    _wait_out(clock, await _lock_once(first, "alice", "a"))
    first.close()
    second = Lockout(config(**table), db_path, clock=clock)
    lock = await _lock_once(second, "alice", "b")
    assert (lock.lock_count, lock.until - lock.locked_at) == (2, pytest.approx(0.4))
    second.close()


@run
async def test_configure_keeps_state_and_applies_new_limits(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 5}, **NO_RHOST), db_path)
    await fail_distinct(lockout, "alice", 2)
    await fail_distinct(lockout, "bob", 4)
    await fail_distinct(lockout, "carol", 5)

    lockout.configure(config(user={"max_failures": 3}, **NO_RHOST))
    assert [(r.key, r.failures, r.locked) for r in lockout.lockouts()] == [
        ("alice", 2, False), ("bob", 4, False), ("carol", 0, True),
    ]
    (lock,) = await login(lockout, "alice", "one-more")
    assert lock.key == "alice"
    refused = await lockout.begin("bob", None, "x")
    assert isinstance(refused, Locked) and refused.key == "bob"
    assert isinstance(await lockout.begin("carol", None, "x"), Locked)
    lockout.close()


@run
async def test_disabled_scope_neither_counts_nor_refuses(db_path: Path) -> None:
    lockout = Lockout(config(user={"max_failures": 2}, rhost={"max_failures": 2}), db_path)
    await fail_distinct(lockout, "alice", 2, "203.0.113.9")
    lockout.configure(config(user={"max_failures": 0}, rhost={"max_failures": 0}))
    assert lockout.lockouts() == []
    assert await fail_distinct(lockout, "alice", 5, "203.0.113.9", tag="later") == [()] * 5

    lockout.configure(config(user={"max_failures": 2}, rhost={"max_failures": 2}))
    assert isinstance(await lockout.begin("alice", "203.0.113.9", "x"), Locked)
    lockout.close()


@run
async def test_untouched_means_no_failure_lock_or_guess_in_flight_for_the_user_or_the_rhost(db_path: Path) -> None:
    """What lets a success already known (a cache hit) skip the reservation: any trace of a
    budget in use, on either scope, says no."""
    lockout = Lockout(config(user={"max_failures": 3}, rhost={"max_failures": 5}, exempt_users=["svc"]), db_path)
    assert lockout.untouched("alice", "192.0.2.1")
    attempt = await lockout.begin("alice", "192.0.2.1", "a guess")
    assert isinstance(attempt, Attempt)
    assert not lockout.untouched("ALICE", None) and not lockout.untouched("bob", "192.0.2.1")  # in flight
    lockout.finish(attempt, False)
    assert not lockout.untouched("alice", None) and not lockout.untouched("bob", "192.0.2.1")  # failures kept
    assert lockout.untouched("bob", "192.0.2.2") and lockout.untouched("svc", None)  # others; an exempt user
    await fail_distinct(lockout, "carol", 3)
    assert not lockout.untouched("carol", None)  # locked
    await login(lockout, "alice", "right", "192.0.2.1", ok=True)
    assert lockout.untouched("alice", None), "a success clears the user's failures"
    assert not lockout.untouched("alice", "192.0.2.1"), "but not the address's"
    lockout.close()
