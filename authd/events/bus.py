"""The event bus: log every event, fan it out to handlers, and never slow down or break a login.

``emit()`` appends the event to the outbox (`authd.events.outbox`) and offers it to each
interested handler's worker (`authd.events.worker`); the request that emitted it awaits
``durable()`` before its reply goes out. Every handler has its own worker, so one that raises,
crawls or hangs costs only its own events. ``set_handlers`` swaps the configured handlers on a
reload, ``subscribe`` adds a client's stream, ``close`` flushes on drain.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict
from typing import Any

import structlog

from authd.clock import SYSTEM, Clock
from authd.events.handler import Handler
from authd.events.invoke import forget
from authd.events.loopwatch import LoopWatch
from authd.events.model import Event
from authd.events.outbox import Outbox
from authd.events.worker import Counters, Worker

log = structlog.get_logger("authd.events")


class EventBus:
    def __init__(
        self,
        outbox: Outbox | None = None,
        *,
        queue_size: int = 1000,
        handler_timeout: float = 10.0,
        block_threshold: float = 0.25,
        clock: Clock = SYSTEM,
    ) -> None:
        """`outbox` None keeps the log in memory: what a test or a daemon without a state dir gets."""
        self.outbox = outbox or Outbox(None)
        self.outbox.open()
        self.queue_size = queue_size
        self.handler_timeout = handler_timeout
        self.block_threshold = block_threshold
        self.clock = clock
        self._watch: LoopWatch | None = None
        self._configured: list[Worker] = []
        self._subscribers: list[Worker] = []
        self._active: tuple[Worker, ...] = ()
        self._retiring: list[Worker] = []
        self._counters: dict[str, Counters] = {}
        self._retired = Counters()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._closed = False
        self._emitted = 0
        self._discarded = 0

    # -- emitting -------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Log the event and queue it for every handler that wants it. Never blocks, never raises."""
        try:
            if self._loop is not None and threading.get_ident() != self._loop_thread:
                self._loop.call_soon_threadsafe(self._dispatch, event)
            else:
                self._dispatch(event)
        except Exception:
            log.error("event not dispatched", event_name=event.name, exc_info=True)

    def settled(self) -> bool:
        """Are the events the calling task emitted in the log? (A request that emitted none,
        or whose events are committed, need not await `durable`.)"""
        return self.outbox.settled()

    async def durable(self) -> None:
        """Return once the events the calling task emitted are in the log (before its reply)."""
        await self.outbox.durable()

    def _dispatch(self, event: Event) -> None:
        if self._closed:
            self._discarded += 1
            log.debug("event after close discarded", event_name=event.name, event_id=event.id)
            return
        self._emitted += 1
        seq = self.outbox.append(event)
        for worker in self._active:
            if worker.handler.accepts(event):
                worker.offer(seq, event)
            else:
                worker.skip(seq)

    # -- configured handlers, subscribers and lifecycle -----------------------------------

    def set_handlers(self, handlers: list[Handler], *, retire_within: float | None = None) -> None:
        """Swap the configured handlers.

        A handler whose name was configured before takes over where its predecessor is (the
        old one stops after the event in hand, which the new one waits for, up to its timeout); a new name starts with the next event, except
        at start-up, where each handler resumes from its cursor in the log. A removed handler
        finishes its backlog and closes; with ``retire_within``, what it has not delivered by
        then is dropped and counted, so reloads while a receiver is down cannot pile up workers.
        """
        old = {w.name: w for w in self._configured}
        starting = not old and not self._retiring
        self._configured = []
        for handler in handlers:
            if (predecessor := old.pop(handler.name, None)) is not None:
                after = predecessor.hand_over()
                self._retiring.append(predecessor)
            elif starting and handler.name in self.outbox.cursors:
                after = self.outbox.cursors[handler.name]
            else:
                after = self.outbox.appended
            self._configured.append(self._worker(handler, after=after, durable=True, predecessor=predecessor))
        self._refresh()
        for w in old.values():
            self._retire(w)
            if retire_within is not None and self._loop is not None:
                w.deadline = self._loop.call_later(retire_within, w.abandon)
        configured = {h.name for h in handlers}
        for name in [n for n in self.outbox.cursors if n not in configured and n not in old]:
            self.outbox.forget(name)

    def subscribe(self, handler: Handler, after: int | None) -> Worker:
        """Deliver events after sequence number `after` (None: from now) to a client's stream."""
        worker = self._worker(handler, after=self.outbox.appended if after is None else after, durable=False)
        self._subscribers.append(worker)
        self._refresh()
        return worker

    def unsubscribe(self, worker: Worker) -> None:
        if worker in self._subscribers:
            self._subscribers.remove(worker)
            self._refresh()
            worker.unsubscribe()

    async def start(self) -> None:
        """Start the log's writer and the workers; events emitted before this wait in the log."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.outbox.start(self._loop)
        self._watch = LoopWatch(self._loop, self.block_threshold, self._blocked)
        self._watch.start()
        for w in (*self._active, *self._retiring):
            w.start()

    def reopen(self) -> None:
        """Ask every handler to reopen its files (call on every SIGHUP, after any swap)."""
        for w in self._configured:
            w.reopen()

    async def close(self, timeout: float) -> int:
        """Deliver what is queued within ``timeout`` seconds, then close the log.

        Returns (and logs) how many events the configured handlers had not delivered: they stay
        in the log and are delivered after the next start.
        """
        await self.start()
        self._closed = True
        if self._watch is not None:
            self._watch.stop()
        workers = [*self._active, *self._retiring]
        self._configured, self._subscribers = [], []
        self._refresh()
        for w in workers:
            self._retire(w)
            if w.deadline is not None:
                w.deadline.cancel()  # the drain deadline rules now
        tasks = [w.task for w in workers if w.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=max(timeout, 0.0))
        late = [w for w in workers if w.task is not None and not w.task.done()]
        for t in [*(w.task for w in late if w.task is not None), *self._tasks]:
            t.cancel()
        if late:
            await asyncio.wait([w.task for w in late if w.task is not None], timeout=1.0)
        undelivered = 0
        for w in workers:
            if w.durable and (lag := w.lag()):
                undelivered += lag
                log.warning("handler has undelivered events; delivered after restart", handler=w.name, undelivered=lag)
        await self.outbox.close()
        if undelivered:
            log.warning("events not delivered at close", undelivered=undelivered)
        return undelivered

    def stats(self) -> dict[str, Any]:
        """Counters per handler name (kept across reloads, and after close) and totals."""
        queued = dict.fromkeys(self._counters, 0)
        lag = dict.fromkeys(self._counters, 0)
        for w in (*self._configured, *self._retiring):
            queued[w.name] += len(w.queue)
            lag[w.name] = max(lag[w.name], w.lag())
        handlers = {n: {**asdict(self._counters[n]), "queued": queued[n], "lag": lag[n]} for n in queued}
        totals = Counters()
        totals.add(self._retired)
        for c in self._counters.values():
            totals.add(c)
        totals.dropped += self._discarded
        return {
            "handlers": handlers,
            "totals": {**asdict(totals), "queued": sum(queued.values()), "emitted": self._emitted},
            "log": self.outbox.stats(),
            "subscribers": len(self._subscribers),
        }

    def handler_names(self) -> list[str]:
        return [w.name for w in self._configured]

    def worker(self, name: str) -> Worker | None:
        return next((w for w in self._configured if w.name == name), None)

    # -- internals ------------------------------------------------------------------------

    def _worker(self, handler: Handler, *, after: int, durable: bool, predecessor: Worker | None = None) -> Worker:
        counters = self._counters.setdefault(handler.name, Counters()) if durable else Counters()
        worker = Worker(self, handler, counters, after=after, durable=durable, predecessor=predecessor)
        if self._loop is not None:
            worker.start()
        return worker

    def _refresh(self) -> None:
        self._active = (*self._configured, *self._subscribers)

    def _retire(self, worker: Worker) -> None:
        worker.stop()
        if worker not in self._retiring:
            self._retiring.append(worker)

    def worker_done(self, worker: Worker) -> None:
        if worker.deadline is not None:
            worker.deadline.cancel()
        if worker in self._retiring:
            self._retiring.remove(worker)
        if not worker.durable:
            return
        live = (*self._configured, *self._retiring)
        if self._closed or any(w.counters is worker.counters for w in live):
            return
        if self._counters.get(worker.name) is worker.counters:
            del self._counters[worker.name]
        self._retired.add(worker.counters)
        self.outbox.forget(worker.name)

    def _blocked(self, handler: str) -> None:
        if (counters := self._counters.get(handler)) is not None:
            counters.blocked_loop += 1

    def track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(forget)
