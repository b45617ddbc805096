"""Property tests: the engine against a plain reference model, and the race invariant.

The sequential test drives time with a manual clock (a real dependency of Lockout, passed
in) so that hypothesis can explore intervals, expiries and progressive locks without
sleeping; everything else is the real engine on a real SQLite file, restarts included.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authd.lockout import Attempt, Locked, Lockout, LockoutConfig

from ..clock import ManualClock
from .helpers import config

USERS = ["alice", "bob"]
PASSWORDS = ["p0", "p1", "p2", "p3", "p4"]


@dataclass
class Model:
    """pam_faillock-like counting, written the obvious way."""

    max_failures: int
    interval: float
    lock_time: float
    progressive: bool
    max_lock_time: float
    generation: int = 0
    failures: dict[str, list[tuple[float, tuple[int, str]]]] = field(default_factory=dict)
    locks: dict[str, tuple[float, float, int]] = field(default_factory=dict)

    def _locked(self, user: str, now: float) -> tuple[float, float, int] | None:
        lock = self.locks.get(user)
        return lock if lock is not None and lock[1] > now else None

    def _prune(self, user: str, now: float) -> list[tuple[float, tuple[int, str]]]:
        kept = [f for f in self.failures.get(user, []) if f[0] >= now - self.interval]
        self.failures[user] = kept
        return kept

    def _lock(self, user: str, now: float) -> tuple[float, float, int]:
        previous = self.locks.get(user)
        strikes = previous[2] if previous else 0
        if previous and now >= previous[1] + self.max_lock_time:
            strikes = 0
        strikes += 1
        length = self.lock_time
        if self.progressive:
            length = min(self.lock_time * 2 ** (strikes - 1), self.max_lock_time)
        self.locks[user] = (now, now + length, strikes)
        self.failures[user] = []
        return self.locks[user]

    def begin(self, user: str, password: str, now: float) -> tuple[float, float, int] | None:
        if lock := self._locked(user, now):
            return lock
        failures = self._prune(user, now)
        if (self.generation, password) in [ident for _, ident in failures]:
            return None
        if len(failures) >= self.max_failures:
            return self._lock(user, now)
        return None

    def finish(self, user: str, password: str, ok: bool, now: float) -> list[tuple[float, float, int]]:
        if ok:
            self.failures.pop(user, None)
            self.locks.pop(user, None)
            return []
        failures = self._prune(user, now)
        ident = (self.generation, password)
        if ident in [seen for _, seen in failures]:
            return []
        failures.append((now, ident))
        return [self._lock(user, now)] if len(failures) >= self.max_failures else []

    def rows(self, now: float) -> list[tuple[str, int, bool, int | None]]:
        rows = []
        for user in sorted(set(self.failures) | set(self.locks)):
            failures = self._prune(user, now)
            lock = self._locked(user, now)
            if failures or lock:
                rows.append((user, len(failures), lock is not None, lock[2] if lock else None))
        return rows


login_op = st.tuples(
    st.just("login"), st.sampled_from(USERS), st.sampled_from(PASSWORDS),
    st.sampled_from([False, False, False, True]),
)
wait_op = st.tuples(st.just("wait"), st.sampled_from([0.0, 1.0, 4.0, 10.0, 25.0, 70.0, 400.0]))
ops = st.lists(
    st.one_of(
        login_op, login_op, login_op, wait_op, wait_op,
        st.tuples(st.just("restart")),
        st.tuples(st.just("unlock"), st.sampled_from(USERS)),
        st.tuples(st.just("limit"), st.integers(1, 4)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_failures=st.integers(1, 4),
    interval=st.sampled_from([10.0, 30.0]),
    lock_time=st.sampled_from([5.0, 20.0]),
    progressive=st.booleans(),
    steps=ops,
)
def test_engine_matches_reference_model(
    max_failures: int, interval: float, lock_time: float, progressive: bool, steps: list[tuple[Any, ...]]
) -> None:
    model = Model(max_failures, interval, lock_time, progressive, max_lock_time=60.0)
    clock = ManualClock()

    def make_config() -> LockoutConfig:
        return config(
            user={"max_failures": model.max_failures, "interval": interval, "lock_time": lock_time},
            rhost={"max_failures": 0}, progressive=progressive, max_lock_time=60.0,
        )

    async def scenario(db_path: Path) -> None:
        lockout = Lockout(make_config(), db_path, clock=clock)
        for step in steps:
            now = clock.now
            if step[0] == "login":
                _, user, password, ok = step
                expected = model.begin(user, password, now)
                outcome = await lockout.begin(user, None, password)
                if expected is not None:
                    assert isinstance(outcome, Locked), step
                    assert (outcome.locked_at, outcome.until, outcome.lock_count) == expected
                    continue
                assert isinstance(outcome, Attempt), step
                imposed = lockout.finish(outcome, ok)
                assert [(lock.locked_at, lock.until, lock.lock_count) for lock in imposed] == model.finish(
                    user, password, ok, now
                )
            elif step[0] == "wait":
                clock.now += step[1]
            elif step[0] == "restart":
                lockout.close()
                model.generation += 1
                lockout = Lockout(make_config(), db_path, clock=clock)
            elif step[0] == "unlock":
                lockout.unlock(step[1])
                model.failures.pop(step[1], None)
                model.locks.pop(step[1], None)
            elif step[0] == "limit":
                model.max_failures = step[1]
                lockout.configure(make_config())
            rows = [
                (r.key, r.failures, r.locked, r.lock_count if r.locked else None)
                for r in lockout.lockouts()
            ]
            assert rows == model.rows(clock.now)
        lockout.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp) / "lockout.db"))


concurrent_attempt = st.tuples(
    st.sampled_from(USERS),
    st.sampled_from(PASSWORDS),
    st.sampled_from([False] * 6 + [True]),
    st.integers(0, 4),
)


@settings(max_examples=100, deadline=None)
@given(max_failures=st.integers(1, 4), attempts=st.lists(concurrent_attempt, min_size=1, max_size=40))
def test_concurrent_attempts_never_overshoot_the_budget(
    max_failures: int, attempts: list[tuple[str, str, bool, int]]
) -> None:
    """Whatever the interleaving, per user: distinct passwords failed since the last reset,
    plus those in PAM right now, never exceed max_failures; once a failure locks the user,
    nobody gets in any more. A repeat of an already counted password may go to PAM (it might
    have become right) but never counts."""

    failed: dict[str, set[str]] = {user: set() for user in USERS}
    inside: dict[str, list[str]] = {user: [] for user in USERS}
    locked: dict[str, bool] = {user: False for user in USERS}

    async def one(lockout: Lockout, user: str, password: str, ok: bool, yields: int) -> None:
        for _ in range(yields):
            await asyncio.sleep(0)
        outcome = await lockout.begin(user, None, password)
        if isinstance(outcome, Locked):
            return
        assert not locked[user]
        repeat = password in failed[user]
        if not repeat:
            inside[user].append(password)
            assert len(failed[user] | set(inside[user])) <= max_failures
        for _ in range(yields + 1):
            await asyncio.sleep(0)
        if not repeat:
            inside[user].remove(password)
        imposed = lockout.finish(outcome, ok)
        if ok:
            failed[user].clear()
            locked[user] = False
        elif not repeat:
            failed[user].add(password)
            assert bool(imposed) == (len(failed[user]) == max_failures)
            if imposed:
                failed[user].clear()
                locked[user] = True
        else:
            assert not imposed

    async def scenario(db_path: Path) -> None:
        lockout = Lockout(config(user={"max_failures": max_failures}, rhost={"max_failures": 0}), db_path)
        await asyncio.wait_for(asyncio.gather(*(one(lockout, *a) for a in attempts)), 10)
        for row in lockout.lockouts():
            assert row.locked == locked[row.key]
            if not row.locked:
                assert row.failures == len(failed[row.key])
        lockout.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp) / "lockout.db"))
