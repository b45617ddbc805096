"""The tracked keys of one scope: their counting state, a cap, and what to forget first.

Every failed user name becomes a key that is kept for the scope's `interval`, so a flood of
made-up names would hold memory without bound. A table holds at most `cap` keys. A new key
beyond that takes the place of the least valuable one that can be forgotten without harm:

- a key that is locked, or has an attempt in PAM or waiting for one, is never forgotten:
  forgetting a lock would lift it, and an attempt in flight would count into nothing;
- among the others, the one with the fewest past locks (its lock count drives progressive
  locks), then the fewest failures, then the least recently used goes first. A flood of
  one-failure names therefore only displaces other one-failure names; to push out a key that
  is one failure from a lock, the flood must give every key in the table as many failures.

When nothing can be forgotten (every key is locked or busy) the new key is not admitted and
its attempt is refused like a locked one (see `Lockout.begin`): failing closed for names
nobody is tracking is the price of never lifting a lock under a flood. A key becomes
forgettable again the moment its lock ends (a heap of lock ends is checked before refusing).

Per key the table keeps little (measured in benchmarks/bench_lockout_memory.py): the
failures are a list (a deque costs 600 bytes even when empty), and the in-flight and waiter
maps exist only while something is in flight or waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Literal

Scope = Literal["user", "rhost"]


class Key:
    """Counting state of one user or one rhost."""

    __slots__ = ("scope", "key", "failures", "strikes", "since", "until", "in_flight", "waiters", "rank")

    def __init__(self, scope: Scope, key: str) -> None:
        self.scope = scope
        self.key = key
        self.failures: list[tuple[float, bytes | None]] = []
        self.strikes = 0
        self.since = 0.0
        self.until: float | None = None
        self.in_flight: dict[bytes, int] | None = None
        self.waiters: dict[asyncio.Future[None], None] | None = None
        self.rank: int | None = None  # the eviction bucket it is filed in, if it may be forgotten

    def locked(self, now: float) -> bool:
        return self.strikes > 0 and (self.until is None or self.until > now)

    def prune(self, cutoff: float) -> None:
        stale = 0
        for at, _ in self.failures:
            if at >= cutoff:
                break
            stale += 1
        if stale:
            del self.failures[:stale]

    def counted(self, fingerprint: bytes) -> bool:
        return any(seen == fingerprint for _, seen in self.failures)

    def holds(self, fingerprint: bytes) -> bool:
        return self.in_flight is not None and fingerprint in self.in_flight

    def slots(self) -> int:
        """Distinct guesses in PAM: each may still add one failure."""
        return len(self.in_flight) if self.in_flight else 0

    def reserve(self, fingerprint: bytes) -> None:
        if self.in_flight is None:
            self.in_flight = {}
        self.in_flight[fingerprint] = self.in_flight.get(fingerprint, 0) + 1

    def release(self, fingerprint: bytes) -> None:
        assert self.in_flight is not None
        left = self.in_flight.pop(fingerprint) - 1
        if left:
            self.in_flight[fingerprint] = left
        elif not self.in_flight:
            self.in_flight = None

    def forget_lock(self) -> None:
        self.strikes, self.since, self.until = 0, 0.0, None

    def busy(self) -> bool:
        return bool(self.in_flight or self.waiters)

    def idle(self) -> bool:
        return not (self.failures or self.strikes or self.busy())

    async def changed(self) -> None:
        future = asyncio.get_running_loop().create_future()
        if self.waiters is None:
            self.waiters = {}
        self.waiters[future] = None
        try:
            await future
        finally:
            if self.waiters is not None:
                self.waiters.pop(future, None)
                if not self.waiters:
                    self.waiters = None

    def wake(self) -> None:
        for future in self.waiters or ():
            if not future.done():
                future.set_result(None)


class Table:
    """At most `cap` keys of one scope; `forget(key)` is told of each key evicted to make room."""

    def __init__(self, scope: Scope, cap: int, forget: Callable[[Key], None]) -> None:
        self.scope = scope
        self.cap = cap
        self.evicted = 0
        self._forget = forget
        self._keys: dict[str, Key] = {}
        self._order: dict[int, dict[Key, None]] = {}  # rank -> keys that may be evicted, least recently used first
        self._lock_ends: list[tuple[float, int, Key]] = []  # heap of timed locks, to file each key when it ends
        self._queued: set[Key] = set()
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._keys.values()))

    def get(self, name: str) -> Key | None:
        return self._keys.get(name)

    def setdefault(self, name: str) -> Key:
        """The key, created past the cap if need be (persisted state being loaded; see trim)."""
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = Key(self.scope, name)
        return key

    def has_room(self, now: float) -> bool:
        """Whether admit() can add a key: below the cap, or with one that may be evicted."""
        self._file_ended_locks(now)
        return len(self._keys) < self.cap or bool(self._order)

    def admit(self, name: str) -> Key:
        """A new key, after evicting one if the table is full (check has_room() first)."""
        if len(self._keys) >= self.cap:
            self._evict()
        key = self._keys[name] = Key(self.scope, name)
        return key

    def settle(self, key: Key, now: float) -> None:
        """File a key that changed: drop it if idle, else (un)list it as one that may be evicted."""
        self._unfile(key)
        if self._keys.get(key.key) is not key:
            return
        if key.idle():
            del self._keys[key.key]
        elif key.locked(now):
            if key.until is not None and key not in self._queued:
                heapq.heappush(self._lock_ends, (key.until, next(self._seq), key))
                self._queued.add(key)
        elif not key.busy():
            key.rank = (key.strikes << 32) + len(key.failures)
            self._order.setdefault(key.rank, {})[key] = None

    def trim(self, now: float) -> None:
        """Evict down to the cap (after it was lowered, or persisted state was loaded)."""
        self._file_ended_locks(now)
        while len(self._keys) > self.cap and self._evict():
            pass

    def _file_ended_locks(self, now: float) -> None:
        while self._lock_ends and self._lock_ends[0][0] <= now:
            key = heapq.heappop(self._lock_ends)[2]
            self._queued.discard(key)
            self.settle(key, now)  # queued again if it was locked anew meanwhile

    def _evict(self) -> bool:
        """Forget the least valuable key that may be forgotten; False if there is none."""
        if not self._order:
            return False
        bucket = self._order[min(self._order)]
        key = next(iter(bucket))
        self._unfile(key)
        del self._keys[key.key]
        self.evicted += 1
        self._forget(key)
        return True

    def _unfile(self, key: Key) -> None:
        if key.rank is None:
            return
        bucket = self._order[key.rank]
        del bucket[key]
        if not bucket:
            del self._order[key.rank]
        key.rank = None
