"""When a connection may take its next request: not while its uid's PAM queue is full.

The PAM queue answers a uid's call past `max_queued_per_uid` with `busy` at once. A client
that resends every `busy` at once turned that into a busy-bounce machine: thousands of
requests a second, each a round trip through the daemon's one event loop, so every loop turn
took hundreds of ms and everyone's login with it (21x the idle p99). So a uid whose queue is
full is not read from at all: its connections wait here, in the order they came, and its
bytes wait in the socket buffers (the kernel's backpressure, not ours). Each call that leaves
the uid's queue lets the first waiting connection take one request; it then lets the next
one in if there is still room. A connection is never let in past a waiting one of its uid.

Nothing here knows what a request is: the predicate `full(uid)` is the pool's queue against
the limit. Every request of a paused uid waits, not only logins; see docs/abuse.md.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable


class Intake:
    """Connections of one uid wait in turn while ``full(uid)``; ``room(uid)`` lets the first in.

    A connection that was let in re-checks ``full``: the call that made room may have been
    taken by someone else meanwhile; then it waits again, first in line. ``open_all`` (the
    drain) lets everybody in, now and from then on: a drain answers every line it reads.
    """

    def __init__(self, full: Callable[[int], bool]) -> None:
        self._full = full
        self._waiting: dict[int, collections.deque[asyncio.Future[None]]] = {}
        self._open = False

    def ready(self, uid: int) -> bool:
        """May a connection of ``uid`` take a request now, without waiting?"""
        return self._open or (uid not in self._waiting and not self._full(uid))

    async def wait(self, uid: int) -> None:
        """Return once a connection of ``uid`` may take a request: there is room and it is first."""
        first = False
        while not self.ready(uid):
            loop = asyncio.get_running_loop()
            turn: asyncio.Future[None] = loop.create_future()
            line = self._waiting.setdefault(uid, collections.deque())
            if first:
                line.appendleft(turn)
            else:
                line.append(turn)
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self.room(uid)  # let in just as it gave up: pass the turn on
                else:
                    self._leave(uid, turn)
                raise
            if self._open or not self._full(uid):
                return
            first = True

    def room(self, uid: int) -> None:
        """A call of ``uid`` left its queue, or a connection took its request: let the next in.

        A turn already settled is passed over: a waiter cancelled in this very step (its
        connection closed) stays in line until its task runs and leaves it."""
        line = self._waiting.get(uid)
        while line and not self._full(uid):
            turn = line.popleft()
            if not line:
                del self._waiting[uid]
            if not turn.done():
                turn.set_result(None)
                return

    def open_all(self) -> None:
        self._open = True
        for line in self._waiting.values():
            for turn in line:
                if not turn.done():
                    turn.set_result(None)
        self._waiting.clear()

    def waiting(self) -> int:
        """Connections waiting for their uid's turn now."""
        return sum(len(line) for line in self._waiting.values())

    def _leave(self, uid: int, turn: asyncio.Future[None]) -> None:
        line = self._waiting.get(uid)
        if line is not None and turn in line:
            line.remove(turn)
            if not line:
                del self._waiting[uid]
