"""One handler's position in the event log, its in-memory window onto it, and the task that delivers.

Live events reach the worker in memory. When its queue is full the worker *spills*: it stops
taking events from memory and reads them back from the outbox once it has room, so a slow
handler costs disk, never events, and never memory beyond `queue_size`. After each event the
worker moves its cursor in the outbox; on start it resumes from there.

A handler that reports a retryable failure (`HandlerError(retry=True)`, or a timeout) and has
a `max_age` is retried with exponential backoff, holding back its later events so their order
holds; an event older than `max_age` becomes a dead letter and delivery moves on. Other
failures are counted and logged, and delivery moves on at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from authd.clock import Clock
from authd.events.handler import Handler, HandlerError
from authd.events.invoke import Invoker, Overran
from authd.events.loopwatch import TASK_PREFIX
from authd.events.model import Event
from authd.events.outbox import Outbox

if TYPE_CHECKING:
    from authd.events.bus import EventBus

log = structlog.get_logger("authd.events")

MAX_BACKOFF = 300.0  # seconds between two tries of the same event, at most


@dataclass
class Counters:
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    timed_out: int = 0
    retried: int = 0
    dead: int = 0  # gave up after max_age: kept as a dead letter
    blocked_loop: int = 0  # an async handler held the event loop past LoopWatch's threshold

    def add(self, other: Counters) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Worker:
    def __init__(self, bus: EventBus, handler: Handler, counters: Counters, *, after: int, durable: bool = True,
                 predecessor: Worker | None = None) -> None:
        """Deliver `handler`'s events with sequence numbers above `after`; `durable` keeps its cursor;
        a `predecessor` of the same name (a reload) is given time to settle the event it holds."""
        self.bus = bus
        self.outbox: Outbox = bus.outbox
        self.clock: Clock = bus.clock
        self.handler = handler
        self.name = handler.name
        self.counters = counters
        self.durable = durable
        self.limit = handler.queue_size or bus.queue_size
        self.invoker: Invoker | None = None
        self.queue: deque[tuple[int, Event]] = deque()
        self.position = after  # the last sequence number taken into the queue or passed over
        self.spilled = after < self.outbox.appended  # what is beyond `position` is read from the log
        self.current: tuple[int, Event] | None = None
        self.retrying = False
        self.stopping = False
        self.task: asyncio.Task[None] | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._predecessor = predecessor
        self._advance(after)

    # -- fed by the bus, on the loop --------------------------------------------------------

    def offer(self, seq: int, event: Event) -> None:
        if self.spilled or self.stopping:
            return  # it is in the log; the worker reads it from there
        if len(self.queue) >= self.limit:
            self.spilled = True
            log.info("handler behind; reading its events back from the log", handler=self.name, queue_size=self.limit)
        else:
            self.queue.append((seq, event))
            self.position = seq
        self._wake.set()

    def skip(self, seq: int) -> None:
        """An event this handler does not want: its cursor may pass it."""
        if not self.spilled:
            self.position = seq

    def replay(self, events: list[tuple[int, Event]]) -> None:
        """Dead letters given another chance: delivered after what is queued, out of order."""
        self.queue.extend(events)
        self._wake.set()

    def lag(self) -> int:
        """Events waiting for this handler: queued, in hand, and (while it reads back from the
        log) everything logged beyond its position, of which not all may be its own."""
        waiting = len(self.queue) + (self.current is not None)
        return waiting + (self.outbox.appended - self.position if self.spilled else 0)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self.task is None:
            self.invoker = Invoker(self.handler, self.handler.timeout or self.bus.handler_timeout, self.bus.track,
                                   self._overran)
            self.task = asyncio.get_running_loop().create_task(self._run(), name=f"{TASK_PREFIX}{self.name}")
            self.task.add_done_callback(self._done)

    def stop(self) -> None:
        """Deliver what is queued and what the log still holds for it, close the handler, end."""
        self.stopping = True
        self._wake.set()

    def hand_over(self) -> int:
        """A reload replaced this handler with one of the same name: stop after the event in
        hand and say where the successor starts at the latest (it waits to see if the event in
        hand is settled: `_take_over`)."""
        self.queue.clear()
        self.spilled = False
        done = self.current[0] - 1 if self.current else self.position
        self.position = min(done, self.outbox.cursors.get(self.name, done))  # never past what it settles
        self.stop()
        return self.position

    def unsubscribe(self) -> None:
        """A client's stream ended: stop after the event in hand; nothing more is delivered."""
        self.durable = False
        self.queue.clear()
        self.spilled = False
        self.stop()

    def abandon(self) -> None:
        """A removed handler's deadline passed: drop (and count) what is still queued."""
        lost = len(self.queue) + (self.outbox.appended - self.position if self.spilled else 0)
        self.queue.clear()
        self.spilled = False
        self._wake.set()  # out of a wait for the log, if it is in one
        if lost:
            self.counters.dropped += lost
            log.warning("removed handler missed its deadline; queued events dropped", handler=self.name, dropped=lost)

    def reopen(self) -> None:
        if self.task is not None and not self.task.done() and self.invoker is not None:
            pending = self.invoker.begin("reopen", self.handler.reopen)
            if pending is not None:
                self.bus.track(asyncio.ensure_future(self.invoker.finish("reopen", pending)))

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("handler worker crashed", handler=self.name, exc_info=task.exception())
        self.bus.worker_done(self)

    # -- the delivery loop ------------------------------------------------------------------

    async def _take_over(self, predecessor: Worker) -> None:
        """Wait (up to the handler's timeout) for the predecessor to settle its event in hand, so
        that a reload does not deliver it twice; past that, it may (at least once)."""
        if predecessor.task is not None and not predecessor.task.done():
            await asyncio.wait({predecessor.task}, timeout=self.handler.timeout or self.bus.handler_timeout)
        if predecessor.task is None or not predecessor.task.done():
            predecessor.durable = False  # still stuck: its late verdict must not move our cursor
            return
        done = self.outbox.cursors.get(self.name, self.position)
        while self.queue and self.queue[0][0] <= done:
            self.queue.popleft()
        if self.spilled:
            self.position = max(self.position, done)

    async def _run(self) -> None:
        assert self.invoker is not None
        try:
            if self._predecessor is not None:
                await self._take_over(self._predecessor)
                self._predecessor = None
            while True:
                if self.queue:
                    self.current = self.queue.popleft()
                    if not await self._deliver(*self.current):
                        break  # stopped while retrying: the log keeps it (and `current` says so)
                    self.current = None
                    continue
                if self.spilled:
                    await self._refill()
                    continue
                self._advance(self.position)
                if self.stopping:
                    break
                self._wake.clear()
                await self._wake.wait()
            pending = self.invoker.begin("close", self.handler.close)
            if pending is not None:
                await self.invoker.finish("close", pending)
        finally:
            self.invoker.stop()

    async def _refill(self) -> None:
        """Read the next window of this handler's events from the log; leave spilling when caught up.

        Only what the log holds is read. Events a failing disk has not taken yet are waited for,
        except by a worker told to stop: it leaves them, its cursor before them, and the outbox
        counts them if they are never written."""
        if self.position >= self.outbox.appended:
            self.spilled = False  # caught up (a predecessor settled the last event): live again
            return
        if self.outbox.stopped:
            self._leave_the_log()
            return
        if self.position >= self.outbox.written:
            if self.stopping and self.outbox.unwritable:
                self.spilled = False
            else:
                await self._until_written(self.position + 1)
            return  # `_run` looks again, whatever ended the wait
        upto = min(self.outbox.appended, self.outbox.written)
        try:
            rows = await self.outbox.read(self.position, upto, self.limit)
        except RuntimeError:  # the writer died meanwhile
            self._leave_the_log()
            return
        if not self.spilled:
            return  # handed over, unsubscribed or abandoned meanwhile: none of it is its own any more
        self.queue.extend((seq, e) for seq, e in rows if self.handler.accepts(e))
        self.position = rows[-1][0] if len(rows) == self.limit else upto
        if self.position >= self.outbox.appended:
            self.spilled = False  # nothing was emitted since `upto` was read: live again

    def _leave_the_log(self) -> None:
        """The event log's writer died: the log gives nothing more, memory does. What it does not
        hold is lost; what it holds is delivered after a restart (this cursor is not written)."""
        lost = self.outbox.appended - max(self.position, self.outbox.written)
        self.position, self.spilled = self.outbox.appended, False
        self.counters.dropped += lost
        log.error("handler behind when the event log stopped; delivering from memory again", handler=self.name,
                  dropped=lost)

    async def _until_written(self, seq: int) -> None:
        """Until `seq` is in the log, a try to write fails, or the worker is woken (stopped,
        handed over, abandoned, or given dead letters to replay)."""
        self._wake.clear()
        written = asyncio.ensure_future(self.outbox.written_upto(seq))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({written, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            written.cancel()
            woken.cancel()

    async def _deliver(self, seq: int, event: Event) -> bool:
        """Deliver, retrying as the handler allows. False if stopped before the event was settled."""
        attempt = 0
        while True:
            error = await self._attempt(event)
            if error is None or self.handler.max_age is None:
                self._advance(seq)
                return True
            age = self.clock.time() - event.time
            if age >= self.handler.max_age:
                self.counters.dead += 1
                log.warning("giving up on an event; kept as a dead letter", handler=self.name, event_id=event.id,
                            event_name=event.name, attempts=attempt + 1, error=error)
                self.outbox.add_dead(self.name, seq, attempt + 1, error)
                self._advance(seq)
                return True
            delay = min(self.handler.retry_backoff * 2**attempt, MAX_BACKOFF, self.handler.max_age - age)
            attempt += 1
            self.counters.retried += 1
            if attempt == 1:
                log.warning("handler failed; retrying with backoff", handler=self.name, event_id=event.id,
                            error=error, max_age=self.handler.max_age)
            if not await self._pause(delay):
                return False

    async def _attempt(self, event: Event) -> str | None:
        """One call; the retryable failure as text, None when delivered or failed for good."""
        assert self.invoker is not None
        about = {"handler": self.name, "event_name": event.name, "event_id": event.id}
        try:
            await self.invoker.call(event)
        except asyncio.CancelledError:
            raise
        except Overran:
            return "timed out"  # counted when it overran
        except TimeoutError:
            self.counters.timed_out += 1
            log.warning("handler timed out", **about, timeout=self.invoker.timeout)
            return "timed out"
        except HandlerError as e:
            self.counters.failed += 1
            if e.retry:
                return str(e)
            log.warning("handler failed", **about, error=str(e))
        except Exception:
            self.counters.failed += 1
            log.warning("handler raised", **about, exc_info=True)
        else:
            self.counters.delivered += 1
        return None

    async def _pause(self, seconds: float) -> bool:
        """Sleep on the bus's clock; False if the worker is told to stop meanwhile."""
        self.retrying = True
        sleep = asyncio.ensure_future(self.clock.sleep(seconds))
        stop = asyncio.ensure_future(self._wait_stop())
        try:
            await asyncio.wait({sleep, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleep.cancel()
            stop.cancel()
            self.retrying = False
        return not self.stopping

    async def _wait_stop(self) -> None:
        while not self.stopping:
            self._wake.clear()
            await self._wake.wait()

    def _overran(self) -> None:
        self.counters.timed_out += 1

    def _advance(self, seq: int) -> None:
        if self.durable:
            self.outbox.set_cursor(self.name, seq)
