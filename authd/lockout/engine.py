"""Race-free lockout: per-user and per-rhost failure budgets, reserved before PAM runs.

A check-then-count lockout (read the counter, call PAM, bump the counter) lets every
concurrent guess through while the first ones are still in PAM. Here an attempt must reserve
one of the key's remaining failure slots before it may reach PAM; attempts beyond the budget
wait until an in-flight one resolves. A failure spends its slot (and locks the key when the
budget is gone), a success gives the user a fresh budget, a cancel just returns the slot.

A wrong password that was already counted for a key does not count again. Attempts are
identified by an HMAC of (user, password) under a random key that lives only in this
process, so neither passwords nor anything that could be brute-forced offline is stored;
after a restart a repeated password counts once more.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import msgspec
import structlog

from .config import Exemptions, Limit, LockoutConfig, rhost_key, user_key
from .store import FailureRow, LockoutStore, LockRow, Rows

Scope = Literal["user", "rhost"]
SCOPES: tuple[Scope, ...] = ("user", "rhost")
_SWEEP_INTERVAL = 60.0
_MAX_DOUBLINGS = 40

log = structlog.get_logger("authd.lockout")


class Locked(msgspec.Struct, frozen=True, kw_only=True):
    """A refusal: `key` is locked in `scope`. `until` and `retry_after` are None if permanent."""

    scope: Scope
    key: str
    locked_at: float
    until: float | None
    retry_after: int | None
    lock_count: int


class LockInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One row of `authctl lockouts`: a key's counted failures and its lock, if it has one."""

    scope: Scope
    key: str
    failures: int
    locked: bool
    locked_at: float | None
    until: float | None
    retry_after: int | None
    lock_count: int


class _Key:
    """Counting state of one user or one rhost."""

    __slots__ = ("scope", "key", "failures", "strikes", "since", "until", "in_flight", "waiters")

    def __init__(self, scope: Scope, key: str) -> None:
        self.scope = scope
        self.key = key
        self.failures: deque[tuple[float, bytes | None]] = deque()
        self.strikes = 0
        self.since = 0.0
        self.until: float | None = None
        self.in_flight: dict[bytes, int] = {}
        self.waiters: dict[asyncio.Future[None], None] = {}

    def locked(self, now: float) -> bool:
        return self.strikes > 0 and (self.until is None or self.until > now)

    def prune(self, cutoff: float) -> None:
        while self.failures and self.failures[0][0] < cutoff:
            self.failures.popleft()

    def counted(self, fingerprint: bytes) -> bool:
        return any(seen == fingerprint for _, seen in self.failures)

    def slots(self) -> int:
        """Distinct guesses in PAM: each may still add one failure."""
        return len(self.in_flight)

    def release(self, fingerprint: bytes) -> None:
        left = self.in_flight.pop(fingerprint) - 1
        if left:
            self.in_flight[fingerprint] = left

    def forget_lock(self) -> None:
        self.strikes, self.since, self.until = 0, 0.0, None

    def idle(self) -> bool:
        return not (self.failures or self.strikes or self.in_flight or self.waiters)

    async def changed(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self.waiters[future] = None
        try:
            await future
        finally:
            self.waiters.pop(future, None)

    def wake(self) -> None:
        for future in self.waiters:
            if not future.done():
                future.set_result(None)

    def refusal(self, now: float) -> Locked:
        retry = None if self.until is None else max(1, math.ceil(self.until - now))
        return Locked(
            scope=self.scope, key=self.key, locked_at=self.since, until=self.until,
            retry_after=retry, lock_count=self.strikes,
        )


class Attempt:
    """Leave to ask PAM once. Resolve it with finish() or cancel(); later calls are no-ops."""

    __slots__ = ("user", "_fingerprint", "_held", "_done")

    def __init__(self, user: str, fingerprint: bytes, held: list[_Key]) -> None:
        self.user = user
        self._fingerprint = fingerprint
        self._held = held
        self._done = False

    def __repr__(self) -> str:
        return f"<Attempt user={self.user!r} slots={[k.scope for k in self._held]}>"


class Lockout:
    """Counts failed logins per user and per rhost, and refuses locked keys before PAM.

    Use from the event loop thread only. State is mirrored to SQLite at `db_path` and
    survives restarts; configure() swaps limits on reload and keeps all state.
    """

    def __init__(
        self, config: LockoutConfig, db_path: Path, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._secret = os.urandom(32)
        self._keys: dict[tuple[Scope, str], _Key] = {}
        self._next_sweep = 0.0
        self.locks_imposed: Counter[Scope] = Counter()  # for metrics
        self.configure(config)
        self._store = LockoutStore(db_path, snapshot=self._rows, merge=self._merge)
        self._store.open()

    @property
    def config(self) -> LockoutConfig:
        return self._config

    @property
    def storage_error(self) -> str | None:
        """Why state is currently not being persisted (for `status`), or None."""
        return self._store.error

    def configure(self, config: LockoutConfig) -> None:
        """Apply new limits and exemptions; counters and locks are kept."""
        self._config = config
        self._exempt = Exemptions(config)
        for key in self._keys.values():
            key.wake()

    async def begin(self, user: str, rhost: str | None, password: str) -> Attempt | Locked:
        """Reserve the right to try `password` with PAM, or say which lock refuses it.

        Waits while the remaining budget is held by attempts still in PAM. Cancelling the
        caller while it waits is safe: nothing is reserved until this returns an Attempt.
        """
        ukey, rkey = user_key(user), rhost_key(rhost)
        fingerprint = self._fingerprint(ukey, password)
        del password
        while True:
            now = self._clock()
            if now >= self._next_sweep:
                self._sweep(now)
            keys = self._enforced(ukey, rkey)
            refusal = _longest(key.refusal(now) for key, _ in keys if key.locked(now))
            if refusal is not None:
                return refusal
            reserve, blocked = [], None
            for key, limit in keys:
                key.prune(now - limit.interval)
                if key.counted(fingerprint):
                    continue
                if fingerprint in key.in_flight:  # the same guess shares its slot: it can count only once
                    reserve.append(key)
                    continue
                if len(key.failures) + key.slots() >= limit.max_failures:
                    blocked = key, limit
                    break
                reserve.append(key)
            if blocked is None:
                for key in reserve:
                    key.in_flight[fingerprint] = key.in_flight.get(fingerprint, 0) + 1
                return Attempt(ukey, fingerprint, reserve)
            key, limit = blocked
            if key.in_flight:
                await key.changed()
            else:
                self._lock(key, limit, now)

    def finish(self, attempt: Attempt, success: bool) -> tuple[Locked, ...]:
        """Record PAM's verdict. Returns the locks this failure imposed (for auth.locked_out)."""
        if attempt._done:
            return ()
        attempt._done = True
        now = self._clock()
        fingerprint = attempt._fingerprint
        for key in attempt._held:
            key.release(fingerprint)
        locks = []
        if success:
            user = self._keys.get(("user", attempt.user))
            if user is not None and (user.failures or user.strikes):
                self._reset(user)
        else:
            for key in attempt._held:
                limit = self._limit(key.scope)
                if not limit.enabled:
                    continue
                key.prune(now - limit.interval)
                if key.counted(fingerprint):
                    continue
                key.failures.append((now, fingerprint))
                self._store.add_failure(key.scope, key.key, now)
                if len(key.failures) >= limit.max_failures:
                    locks.append(self._lock(key, limit, now))
        for key in attempt._held:
            key.wake()
        return tuple(locks)

    def cancel(self, attempt: Attempt) -> None:
        """Give the slot back without counting (PAM unavailable, client gone)."""
        if attempt._done:
            return
        attempt._done = True
        for key in attempt._held:
            key.release(attempt._fingerprint)
            key.wake()

    def lockouts(self) -> list[LockInfo]:
        """Current locks and failure counters of every enforced key, sorted by scope and key."""
        now = self._clock()
        rows = []
        for key in sorted(self._keys.values(), key=lambda key: (SCOPES.index(key.scope), key.key)):
            scope, name, limit = key.scope, key.key, self._limit(key.scope)
            if not self._is_enforced(scope, name):
                continue
            key.prune(now - limit.interval)
            locked = key.locked(now)
            if not (key.failures or locked):
                continue
            lock = key.refusal(now) if locked else None
            rows.append(LockInfo(
                scope=scope, key=name, failures=len(key.failures), locked=locked,
                locked_at=lock.locked_at if lock else None, until=lock.until if lock else None,
                retry_after=lock.retry_after if lock else None, lock_count=key.strikes,
            ))
        return rows

    def census(self) -> dict[Scope, tuple[int, int]]:
        """Keys held in memory and keys locked now, per scope: one pass without sorting or
        pruning, cheap enough for every metrics scrape (`lockouts()` is for people)."""
        now = self._clock()
        held = {scope: 0 for scope in SCOPES}
        locked = dict(held)
        for key in self._keys.values():
            held[key.scope] += 1
            locked[key.scope] += key.locked(now)
        return {scope: (held[scope], locked[scope]) for scope in SCOPES}

    def unlock(self, name: str, scope: Scope | None = None) -> bool:
        """Clear failures, lock and lock count of a user or rhost. False if there was nothing."""
        cleared = False
        for each in (scope,) if scope else SCOPES:
            canonical = user_key(name) if each == "user" else rhost_key(name)
            key = self._keys.get((each, canonical)) if canonical else None
            if key is not None and (key.failures or key.strikes):
                self._reset(key)
                log.info("lockout cleared", scope=each, key=canonical)
                cleared = True
        return cleared

    def close(self) -> None:
        self._store.close()

    def _fingerprint(self, ukey: str, password: str) -> bytes:
        user = ukey.encode("utf-8", "surrogatepass")
        message = len(user).to_bytes(4, "big") + user + password.encode("utf-8", "surrogatepass")
        return hmac.digest(self._secret, message, "sha256")

    def _limit(self, scope: Scope) -> Limit:
        return self._config.user if scope == "user" else self._config.rhost

    def _is_enforced(self, scope: Scope, name: str) -> bool:
        if not self._limit(scope).enabled:
            return False
        return not (self._exempt.user(name) if scope == "user" else self._exempt.rhost(name))

    def _enforced(self, ukey: str, rkey: str | None) -> list[tuple[_Key, Limit]]:
        keys = []
        names: tuple[tuple[Scope, str | None], ...] = (("user", ukey), ("rhost", rkey))
        for scope, name in names:
            if name is not None and self._is_enforced(scope, name):
                key = self._keys.get((scope, name))
                if key is None:
                    key = self._keys[scope, name] = _Key(scope, name)
                keys.append((key, self._limit(scope)))
        return keys

    def _lock(self, key: _Key, limit: Limit, now: float) -> Locked:
        config = self._config
        if key.until is not None and now >= key.until + config.max_lock_time:
            key.strikes = 0
        key.strikes += 1
        key.since = now
        self.locks_imposed[key.scope] += 1
        if limit.permanent:
            key.until = None
        else:
            length = limit.lock_time
            if config.progressive:
                doubled = length * 2 ** min(key.strikes - 1, _MAX_DOUBLINGS)
                length = min(doubled, config.max_lock_time)
            key.until = now + length
        key.failures.clear()
        self._store.set_lock(key.scope, key.key, key.since, key.until, key.strikes)
        key.wake()
        return key.refusal(now)

    def _reset(self, key: _Key) -> None:
        key.failures.clear()
        key.forget_lock()
        self._store.clear(key.scope, key.key)
        key.wake()

    def _sweep(self, now: float) -> None:
        """Forget what no longer matters, in memory and on disk, about once a minute."""
        self._next_sweep = now + _SWEEP_INTERVAL
        forget_before = now - self._config.max_lock_time
        for ident, key in list(self._keys.items()):
            key.prune(now - self._limit(key.scope).interval)
            if key.strikes and key.until is not None and key.until < forget_before:
                key.forget_lock()
            if key.idle():
                del self._keys[ident]
        cutoffs: dict[str, float] = {scope: now - self._limit(scope).interval for scope in SCOPES}
        self._store.purge(cutoffs, forget_before)

    def _rows(self) -> Rows:
        failures: list[FailureRow] = []
        locks: list[LockRow] = []
        for key in self._keys.values():
            failures.extend((key.scope, key.key, at) for at, _ in key.failures)
            if key.strikes:
                locks.append((key.scope, key.key, key.since, key.until, key.strikes))
        return failures, locks

    def _merge(self, rows: Rows) -> None:
        """Fold persisted state into memory (at start, or when storage comes back)."""
        failures, locks = rows
        touched = set()
        for scope, name, at in failures:
            if scope in SCOPES:
                key = self._keys.setdefault((scope, name), _Key(scope, name))
                key.failures.append((at, None))
                touched.add(key)
        for key in touched:
            key.failures = deque(sorted(key.failures, key=lambda failure: failure[0]))
        for scope, name, since, until, strikes in locks:
            if scope in SCOPES:
                key = self._keys.setdefault((scope, name), _Key(scope, name))
                if (strikes, _end(until)) > (key.strikes, _end(key.until)):
                    key.strikes, key.since, key.until = strikes, since, until


def _end(until: float | None) -> float:
    return math.inf if until is None else until


def _longest(refusals: Iterable[Locked]) -> Locked | None:
    return max(refusals, key=lambda refusal: _end(refusal.until), default=None)
