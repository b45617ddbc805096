"""The event bus: fan events out to handlers without ever slowing down or breaking a login.

``emit()`` only appends to per-handler queues (`authd.events.worker`): every handler has its
own bounded queue and its own worker, so one that raises, crawls or hangs costs only its own
events. ``set_handlers`` swaps the configured handlers on a reload; ``close`` flushes on drain.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict
from typing import Any

import structlog

from authd.events.handler import Handler
from authd.events.loopwatch import LoopWatch
from authd.events.model import Event
from authd.events.worker import Counters, Worker, forget

log = structlog.get_logger("authd.events")


class EventBus:
    """Per-handler queues and workers; see the module docstring."""

    def __init__(self, *, queue_size: int = 1000, handler_timeout: float = 10.0, block_threshold: float = 0.25) -> None:
        self.queue_size = queue_size
        self.handler_timeout = handler_timeout
        self.block_threshold = block_threshold
        self._watch: LoopWatch | None = None
        self._configured: list[Worker] = []
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
        """Queue the event for every handler that wants it. Never blocks, never raises."""
        try:
            if self._loop is not None and threading.get_ident() != self._loop_thread:
                self._loop.call_soon_threadsafe(self._dispatch, event)
            else:
                self._dispatch(event)
        except Exception:
            log.error("event not dispatched", event_name=event.name, exc_info=True)

    def _dispatch(self, event: Event) -> None:
        if self._closed:
            self._discarded += 1
            log.debug("event after close discarded", event_name=event.name, event_id=event.id)
            return
        self._emitted += 1
        for worker in self._active:
            if worker.handler.accepts(event):
                worker.offer(event)

    # -- configured handlers and lifecycle ------------------------------------------------

    def set_handlers(self, handlers: list[Handler], *, retire_within: float | None = None) -> None:
        """Swap the configured handlers: new ones start now, removed ones drain, then close.

        With ``retire_within``, what a removed handler has not delivered by then is dropped and
        counted: without a bound, every reload while a receiver is down would leave one more
        worker behind, each with a full queue and retrying.
        """
        old = self._configured
        self._configured = [self._worker(h) for h in handlers]
        self._refresh()
        for w in old:
            self._retire(w)
            if retire_within is not None and self._loop is not None:
                w.deadline = self._loop.call_later(retire_within, w.abandon)

    async def start(self) -> None:
        """Start the workers; events emitted before this wait in their queues."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._watch = LoopWatch(self._loop, self.block_threshold, self._blocked)
        self._watch.start()
        for w in (*self._active, *self._retiring):
            w.start()

    def reopen(self) -> None:
        """Ask every handler to reopen its files (call on every SIGHUP, after any swap)."""
        for w in self._active:
            w.reopen()

    async def close(self, timeout: float) -> int:
        """Deliver what is queued within ``timeout`` seconds; return (and log) how many were not."""
        await self.start()
        self._closed = True
        if self._watch is not None:
            self._watch.stop()
        workers = [*self._active, *self._retiring]
        self._configured = []
        self._refresh()
        for w in workers:
            self._retire(w)
            if w.deadline is not None:
                w.deadline.cancel()  # the drain deadline rules now
        tasks = [w.task for w in workers if w.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=max(timeout, 0.0))
        undelivered = 0
        late = [w for w in workers if w.task is not None and not w.task.done()]
        for w in late:
            lost = len(w.queue) + (w.current is not None)
            undelivered += lost
            log.warning("handler missed the deadline", handler=w.name, undelivered=lost)
        for t in [*(w.task for w in late if w.task is not None), *self._tasks]:
            t.cancel()
        if late:
            await asyncio.wait([w.task for w in late if w.task is not None], timeout=1.0)
        if undelivered:
            log.warning("events not delivered at close", undelivered=undelivered)
        return undelivered

    def stats(self) -> dict[str, Any]:
        """Counters per handler name (kept across reloads, and after close) and totals."""
        workers = (*self._active, *self._retiring)
        queued = dict.fromkeys(self._counters, 0)
        for w in workers:
            queued[w.name] += len(w.queue)
        handlers = {n: {**asdict(self._counters[n]), "queued": queued[n]} for n in queued}
        totals = Counters()
        totals.add(self._retired)
        for c in self._counters.values():
            totals.add(c)
        totals.dropped += self._discarded
        return {
            "handlers": handlers,
            "totals": {**asdict(totals), "queued": sum(queued.values()), "emitted": self._emitted},
        }

    # -- internals ------------------------------------------------------------------------

    def _worker(self, handler: Handler) -> Worker:
        counters = self._counters.setdefault(handler.name, Counters())
        worker = Worker(self, handler, counters)
        if self._loop is not None:
            worker.start()
        return worker

    def _refresh(self) -> None:
        self._active = tuple(self._configured)

    def _retire(self, worker: Worker) -> None:
        worker.stop()
        if worker not in self._retiring:
            self._retiring.append(worker)

    def _worker_done(self, worker: Worker) -> None:
        if worker.deadline is not None:
            worker.deadline.cancel()
        if worker in self._retiring:
            self._retiring.remove(worker)
        live = (*self._active, *self._retiring)
        if self._closed or any(w.counters is worker.counters for w in live):
            return
        if self._counters.get(worker.name) is worker.counters:
            del self._counters[worker.name]
        self._retired.add(worker.counters)

    def _blocked(self, handler: str) -> None:
        if (counters := self._counters.get(handler)) is not None:
            counters.blocked_loop += 1

    def track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(forget)
