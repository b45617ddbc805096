"""A clock the test drives: time moves only when the test moves it (`advance`, or `now` set),
and `sleep` returns when time has passed its deadline.

Components take it as an `authd.clock.Clock` (`time`, `sleep`) or as a bare callable (the
lockout, the sessions, the credential cache, a store's retry pacing): both read `now`, so
one clock can stand for the wall clock and the monotonic one at once."""

from __future__ import annotations

import asyncio


class ManualClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now  # fixed, so a run repeats exactly; `ManualClock(time.time())` beside real events
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def time(self) -> float:
        return self.now

    __call__ = time

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, future))
        await future

    @property
    def sleeping(self) -> int:
        return sum(not f.done() for _, f in self._sleepers)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self.now]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self.now]
        for _, future in due:
            if not future.done():
                future.set_result(None)
