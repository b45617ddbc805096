"""Who gets the next free PAM worker: round robin across peers, first come first served within one.

With one FIFO for everybody, a single local user holding hundreds of pipelined logins (unknown
user names pass the lockout budgets) put everyone else's login behind all of them. Here each
peer (the caller's key: its uid) has its own FIFO, and a free worker goes to the peers in turn,
so a login waits for at most one call of every other peer that is waiting, however many each
of them has queued. Each peer may have at most ``limit`` calls waiting; past that ``push``
refuses, and the caller answers ``busy`` at once instead of queueing.

Pure data structure, no asyncio: the pool puts its waiters' futures in it, and the scheduling
decision is tested on its own (tests/pam/test_fairqueue.py).
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class FairQueue(Generic[K, T]):
    """Items queued per key; ``pop`` serves the keys in turn, each key's items in order.

    A key joins the back of the rotation when its first item arrives and leaves it when its
    last item is taken or removed, so a peer that comes back after emptying its queue cannot
    have kept a place ahead of peers that waited meanwhile.
    """

    def __init__(self) -> None:
        self._queues: dict[K, collections.deque[T]] = {}
        self._turns: collections.deque[K] = collections.deque()  # keys with items, next first
        self._size = 0

    def push(self, key: K, item: T, limit: int | None = None) -> bool:
        """Queue ``item`` at the back of ``key``'s queue; False (and nothing queued) if
        ``key`` already has ``limit`` items waiting."""
        if limit is not None and self.queued(key) >= limit:
            return False
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
            self._turns.append(key)
        queue.append(item)
        self._size += 1
        return True

    def pop(self) -> T:
        """The oldest item of the key whose turn it is; IndexError if nothing is queued."""
        return self.pop_turn()[1]

    def pop_turn(self) -> tuple[K, T]:
        """``pop``, with the key whose turn it was."""
        key = self._turns.popleft()
        queue = self._queues[key]
        item = queue.popleft()
        self._size -= 1
        if queue:
            self._turns.append(key)
        else:
            del self._queues[key]
        return key, item

    def remove(self, key: K, item: T) -> bool:
        """Take ``item`` out of ``key``'s queue wherever it is (its caller gave up)."""
        queue = self._queues.get(key)
        if queue is None:
            return False
        try:
            queue.remove(item)
        except ValueError:
            return False
        self._size -= 1
        if not queue:
            del self._queues[key]
            self._turns.remove(key)
        return True

    def queued(self, key: K) -> int:
        queue = self._queues.get(key)
        return len(queue) if queue is not None else 0

    def keys(self) -> int:
        """How many keys have something queued."""
        return len(self._queues)

    def __len__(self) -> int:
        return self._size
