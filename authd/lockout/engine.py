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

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec
import structlog

from . import scopes
from .config import Exemptions, Limit, LockoutConfig, user_key
from .scopes import SCOPES
from .store import FailureRow, LockoutStore, LockRow, Rows
from .table import Key, Scope, Table

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


class Attempt:
    """Leave to ask PAM once. Resolve it with finish() or cancel(); later calls are no-ops."""

    __slots__ = ("user", "_fingerprint", "_held", "_done")

    def __init__(self, user: str, fingerprint: bytes, held: list[Key]) -> None:
        self.user = user
        self._fingerprint = fingerprint
        self._held = held
        self._done = False

    def __repr__(self) -> str:
        return f"<Attempt user={self.user!r} slots={[k.scope for k in self._held]}>"


class Lockout:
    """Counts failed logins per user and per rhost, and refuses locked keys before PAM.

    Use from the event loop thread only. State is mirrored to SQLite at `db_path` and
    survives restarts; configure() swaps limits on reload and keeps all state. Each scope
    tracks at most `max_keys` keys (see `table`).
    """

    def __init__(
        self, config: LockoutConfig, db_path: Path, *, clock: Callable[[], float] = time.time,
        retry_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._secret = os.urandom(32)
        self._tables = {scope: Table(scope, config.max_keys, self._evicted) for scope in SCOPES}
        self._next_sweep = 0.0
        self._refused_full = 0
        self._full_logged: dict[Scope, float] = {}
        self.locks_imposed: Counter[Scope] = Counter()  # for metrics
        self._store = LockoutStore(db_path, snapshot=self._rows, merge=self._merge, retry_clock=retry_clock)
        self.configure(config)
        self._store.open()

    @property
    def config(self) -> LockoutConfig:
        return self._config

    @property
    def storage_error(self) -> str | None:
        """Why state is currently not being persisted (for `status`), or None."""
        return self._store.error

    def stats(self) -> dict[str, int]:
        """Keys held in memory, keys evicted to stay under `max_keys`, attempts refused for want of room."""
        return {
            "keys": sum(len(table) for table in self._tables.values()),
            "evicted": sum(table.evicted for table in self._tables.values()),
            "refused_full": self._refused_full,
        }

    def configure(self, config: LockoutConfig) -> None:
        """Apply new limits and exemptions; counters and locks are kept (down to a lowered cap)."""
        self._config = config
        self._exempt = Exemptions(config)
        now = self._clock()
        for table in self._tables.values():
            table.cap = config.max_keys
            table.trim(now)
            for key in table:
                key.wake()

    async def begin(self, user: str, rhost: str | None, password: str) -> Attempt | Locked:
        """Reserve the right to try `password` with PAM, or say which lock refuses it.

        Waits while the remaining budget is held by attempts still in PAM. Cancelling the
        caller while it waits is safe: nothing is reserved until this returns an Attempt.
        A key the table has no room for is refused as if locked, with `lock_count` 0.
        """
        ukey = user_key(user)
        fingerprint = self._fingerprint(ukey, password)
        del password
        while True:
            now = self._clock()
            if now >= self._next_sweep:
                self._sweep(now)
            scopes = self._enforced(ukey, rhost)
            found = [(table, table.get(name), name, limit) for table, name, limit in scopes]
            refusal = _longest(_refusal(key, now) for _, key, _, _ in found if key is not None and key.locked(now))
            if refusal is not None:
                return refusal
            reserve: list[tuple[Table, Key | None, str]] = []
            blocked = None
            for table, key, name, limit in found:
                if key is not None:
                    key.prune(now - limit.interval)
                    if key.counted(fingerprint):
                        continue
                    # the same guess already in PAM shares its slot: it can count only once
                    if not key.holds(fingerprint) and len(key.failures) + key.slots() >= limit.max_failures:
                        blocked = key, limit
                        break
                reserve.append((table, key, name))
            if blocked is None:
                return self._reserve(ukey, fingerprint, reserve, now)
            key, limit = blocked
            if key.in_flight:
                await key.changed()
                self._settle(key, self._clock())
            else:
                self._lock(key, limit, now)

    def untouched(self, user: str, rhost: str | None) -> bool:
        """Nothing recorded or in flight for any budget an attempt by `user` from `rhost` counts
        against (no failure, no lock, no guess in PAM), and room to track each of them (a full
        table refuses what it does not track, as `begin` would). A success already known (a
        credential cache hit) then has nothing to reserve, to wait for or to reset."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        ukey = user_key(user)
        return all(table.get(name) is None and table.has_room(now) for table, name, _ in self._enforced(ukey, rhost))

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
            user = self._tables["user"].get(attempt.user)
            if user is not None and (user.failures or user.strikes):
                self._reset(user, now)
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
            self._settle(key, now)
        return tuple(locks)

    def cancel(self, attempt: Attempt) -> None:
        """Give the slot back without counting (PAM unavailable, client gone)."""
        if attempt._done:
            return
        attempt._done = True
        now = self._clock()
        for key in attempt._held:
            key.release(attempt._fingerprint)
            key.wake()
            self._settle(key, now)

    def lockouts(self) -> list[LockInfo]:
        """Current locks and failure counters of every enforced key, sorted by scope and key."""
        now = self._clock()
        rows = []
        for scope in SCOPES:
            limit = self._limit(scope)
            for key in sorted(self._tables[scope], key=lambda key: key.key):
                if not self._is_enforced(scope, key.key):
                    continue
                key.prune(now - limit.interval)
                locked = key.locked(now)
                if not (key.failures or locked):
                    continue
                lock = _refusal(key, now) if locked else None
                rows.append(LockInfo(
                    scope=scope, key=key.key, failures=len(key.failures), locked=locked,
                    locked_at=lock.locked_at if lock else None, until=lock.until if lock else None,
                    retry_after=lock.retry_after if lock else None, lock_count=key.strikes,
                ))
        return rows

    def census(self) -> dict[Scope, tuple[int, int]]:
        """Keys held in memory and keys locked now, per scope: one pass without sorting or
        pruning, cheap enough for every metrics scrape (`lockouts()` is for people)."""
        now = self._clock()
        return {scope: (len(table), sum(key.locked(now) for key in table)) for scope, table in self._tables.items()}

    def unlock(self, name: str, scope: Scope | None = None) -> bool:
        """Clear failures, lock and lock count of a user or rhost. False if there was nothing.

        An rhost is found by any address in its key (`2001:db8::5` clears `2001:db8::/64`) or
        by the key as `lockouts` lists it.
        """
        cleared = False
        now = self._clock()
        for each in (scope,) if scope else SCOPES:
            key = self._tables[each].get(user_key(name) if each == "user" else self._listed_rhost(name))
            if key is not None and (key.failures or key.strikes):
                self._reset(key, now)
                log.info("lockout cleared", scope=each, key=key.key)
                cleared = True
        return cleared

    async def durable(self) -> None:
        """Wait until the changes made so far are on disk (or given up to a storage fault)."""
        await self._store.durable()

    def close(self) -> None:
        self._store.close()

    def _fingerprint(self, ukey: str, password: str) -> bytes:
        return scopes.fingerprint(self._secret, ukey, password)

    def _limit(self, scope: Scope) -> Limit:
        return scopes.limit(self._config, scope)

    def _is_enforced(self, scope: Scope, name: str) -> bool:
        return scopes.is_enforced(self._config, self._exempt, scope, name)

    def _listed_rhost(self, name: str) -> str:
        return scopes.listed_rhost(name, self._config.ipv6_prefix)

    def _enforced(self, ukey: str, rhost: str | None) -> list[tuple[Table, str, Limit]]:
        return [(self._tables[scope], name, limit) for scope, name, limit in scopes.enforced(self._config, self._exempt, ukey, rhost)]

    def _reserve(
        self, ukey: str, fingerprint: bytes, reserve: list[tuple[Table, Key | None, str]], now: float
    ) -> Attempt | Locked:
        """Admit the keys not tracked yet, then take a slot in each; refuse if one has no room."""
        for table, key, name in reserve:
            if key is None and not table.has_room(now):
                return self._full(table, name, now)  # before any admission evicts: a refusal changes nothing
        held = [key or table.admit(name) for table, key, name in reserve]
        for key in held:
            key.reserve(fingerprint)
            self._settle(key, now)
        return Attempt(ukey, fingerprint, held)

    def _full(self, table: Table, name: str, now: float) -> Locked:
        """Refuse a key the table has no room for, as if it were locked for the scope's lock_time."""
        self._refused_full += 1
        if now >= self._full_logged.get(table.scope, 0.0):
            self._full_logged[table.scope] = now + _SWEEP_INTERVAL
            log.warning("lockout table full of locked keys; refusing untracked ones", scope=table.scope,
                        max_keys=table.cap, refused=self._refused_full)
        limit = self._limit(table.scope)
        until = None if limit.permanent else now + limit.lock_time
        retry = None if until is None else max(1, math.ceil(until - now))
        return Locked(scope=table.scope, key=name, locked_at=now, until=until, retry_after=retry, lock_count=0)

    def _settle(self, key: Key, now: float) -> None:
        self._tables[key.scope].settle(key, now)

    def _evicted(self, key: Key) -> None:
        self._store.clear(key.scope, key.key)

    def _lock(self, key: Key, limit: Limit, now: float) -> Locked:
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
        self._settle(key, now)
        return _refusal(key, now)

    def _reset(self, key: Key, now: float) -> None:
        key.failures.clear()
        key.forget_lock()
        self._store.clear(key.scope, key.key)
        key.wake()
        self._settle(key, now)

    def _sweep(self, now: float) -> None:
        """Forget what no longer matters, in memory and on disk, about once a minute."""
        self._next_sweep = now + _SWEEP_INTERVAL
        forget_before = now - self._config.max_lock_time
        for scope, table in self._tables.items():
            cutoff = now - self._limit(scope).interval
            for key in table:
                key.prune(cutoff)
                if key.strikes and key.until is not None and key.until < forget_before:
                    key.forget_lock()
                table.settle(key, now)
            table.trim(now)  # persisted state is loaded past the cap: evicting then would write mid-load
        cutoffs: dict[str, float] = {scope: now - self._limit(scope).interval for scope in SCOPES}
        self._store.purge(cutoffs, forget_before)

    def _rows(self) -> Rows:
        failures: list[FailureRow] = []
        locks: list[LockRow] = []
        for table in self._tables.values():
            for key in table:
                failures.extend((key.scope, key.key, at) for at, _ in key.failures)
                if key.strikes:
                    locks.append((key.scope, key.key, key.since, key.until, key.strikes))
        return failures, locks

    def _merge(self, rows: Rows) -> None:
        """Fold persisted state into memory (at start, or when storage comes back)."""
        failures, locks = rows
        touched: set[Key] = set()
        for scope, name, at in failures:
            if scope in SCOPES:
                key = self._tables[scope].setdefault(name)
                key.failures.append((at, None))
                touched.add(key)
        for key in touched:
            key.failures.sort(key=lambda failure: failure[0])
        for scope, name, since, until, strikes in locks:
            if scope in SCOPES:
                key = self._tables[scope].setdefault(name)
                if (strikes, _end(until)) > (key.strikes, _end(key.until)):
                    key.strikes, key.since, key.until = strikes, since, until
                touched.add(key)
        now = self._clock()
        for key in touched:
            self._settle(key, now)


def _refusal(key: Key, now: float) -> Locked:
    retry = None if key.until is None else max(1, math.ceil(key.until - now))
    return Locked(
        scope=key.scope, key=key.key, locked_at=key.since, until=key.until,
        retry_after=retry, lock_count=key.strikes,
    )


def _end(until: float | None) -> float:
    return math.inf if until is None else until


def _longest(refusals: Iterable[Locked]) -> Locked | None:
    return max(refusals, key=lambda refusal: _end(refusal.until), default=None)
