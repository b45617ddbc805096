"""The event bus: fan events out to handlers without ever slowing down or breaking a login.

``emit()`` only appends to per-handler queues. Every handler has its own bounded queue and its
own worker task, so one that raises, crawls or hangs costs only its own events: failures are
logged and counted, overruns are timed out, and a full queue drops (and counts) instead of
blocking the caller. Async handlers run on the event loop; sync ones run in a thread that
belongs to that handler alone, which keeps a stuck call from starving anybody else and lets
resources such as SQLite connections stay on one thread.

For in-process users the bus also speaks a blinker / Django-signals dialect: ``connect``,
the ``@bus.on(...)`` decorator, named :class:`Signal` objects and ``sender=`` filtering (the
sender of an event is its service). Receivers are held strongly and called in a
deterministic order: connected receivers first, in connection order, then configured
handlers in config order.
"""

from __future__ import annotations

import abc
import asyncio
import fnmatch
import inspect
import queue
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import structlog

from authd.events.model import Event

log = structlog.get_logger("authd.events")

Receiver = Callable[[Event], Any]
F = TypeVar("F", bound=Receiver)


class HandlerError(Exception):
    """An expected failure that explains itself; logged without a traceback."""


class Handler(abc.ABC):
    """Something the bus delivers events to.

    Subclasses implement :meth:`handle` either as a plain method, which the bus runs in the
    handler's own thread (as it does :meth:`reopen` and :meth:`close`), or as ``async def``,
    which runs on the event loop. ``timeout`` bounds one event (None: the bus default);
    ``queue_size`` bounds the backlog (None: the bus default).
    """

    def __init__(
        self,
        *,
        name: str,
        events: Iterable[str] = ("*",),
        services: Iterable[str] | None = None,
        timeout: float | None = None,
        queue_size: int | None = None,
    ) -> None:
        self.name = name
        self.events = tuple(events)
        self.services = frozenset(services) if services is not None else None
        self.timeout = timeout
        self.queue_size = queue_size
        self._matches: dict[str, bool] = {}

    def accepts(self, event: Event) -> bool:
        """Whether the event's name matches a pattern and its service passes the filter."""
        if self.services is not None and event.service not in self.services:
            return False
        hit = self._matches.get(event.name)
        if hit is None:
            hit = any(fnmatch.fnmatchcase(event.name, p) for p in self.events)
            self._matches[event.name] = hit
        return hit

    @abc.abstractmethod
    def handle(self, event: Event) -> Any:
        """Deliver one event; raise :class:`HandlerError` for a failure that explains itself."""
        ...

    def reopen(self) -> None:
        """Reopen files after log rotation (SIGHUP)."""

    def close(self) -> None:
        """Release resources; called once, after the last event."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class FunctionHandler(Handler):
    """A callable (sync or async) taking an Event; its ``reopen``/``close`` are used if present."""

    def __init__(self, fn: Receiver, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fn = fn

    @property
    def handle(self) -> Receiver:  # type: ignore[override]
        """The function itself, so the bus sees whether it is async and calls it directly."""
        return self.fn

    def reopen(self) -> Any:
        method = getattr(self.fn, "reopen", None)
        return method() if callable(method) else None

    def close(self) -> Any:
        method = getattr(self.fn, "close", None)
        return method() if callable(method) else None


class Signal:
    """A named event, blinker style: ``bus.signal(AUTH_SUCCEEDED).connect(fn, sender="imap")``."""

    def __init__(self, bus: EventBus, name: str) -> None:
        self.bus = bus
        self.name = name

    def connect(self, fn: F | None = None, **kwargs: Any) -> Any:
        return self.bus.connect(self.name, fn, **kwargs)

    def send(self, **fields: Any) -> Event:
        """Create the event (fresh id and time) and emit it."""
        event = Event.create(self.name, **fields)
        self.bus.emit(event)
        return event

    def __repr__(self) -> str:
        return f"<Signal {self.name!r}>"


def is_async(fn: Any) -> bool:
    """True for coroutine functions and for objects whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)
    )


@dataclass
class _Counters:
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    timed_out: int = 0

    def add(self, other: _Counters) -> None:
        self.delivered += other.delivered
        self.failed += other.failed
        self.dropped += other.dropped
        self.timed_out += other.timed_out


class _HandlerThread:
    """The one thread a sync handler runs in.

    A daemon thread, because Python cannot kill a thread: one stuck in a handler must not
    keep the process from exiting after drain.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"authd-handler:{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.add_done_callback(_forget)
        self._jobs.put((loop, future, fn, args))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            result = error = None
            try:
                result = fn(*args)
            except Exception as e:
                error = e
            except BaseException as e:  # SystemExit in a plugin must not stop the daemon
                error = RuntimeError(f"handler raised {type(e).__name__}")
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:
                return  # the loop is closed: nobody is waiting any more


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


async def _guard(make: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await make()
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as e:  # SystemExit/KeyboardInterrupt would tear down the loop
        raise RuntimeError(f"handler raised {type(e).__name__}") from None


def _forget(task: asyncio.Task[Any] | asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class _Worker:
    """One handler's queue and the task that drains it, in order."""

    def __init__(self, bus: EventBus, handler: Handler, counters: _Counters) -> None:
        self.bus = bus
        self.handler = handler
        self.name = handler.name
        self.counters = counters
        self.limit = handler.queue_size or bus.queue_size
        self.timeout = handler.timeout or bus.handler_timeout
        self.is_async = is_async(handler.handle)
        self.queue: deque[Event] = deque()
        self.current: Event | None = None
        self.stopping = False
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._thread: _HandlerThread | None = None
        self._dropping = 0
        self.deadline: asyncio.TimerHandle | None = None

    def offer(self, event: Event) -> None:
        if len(self.queue) >= self.limit:
            self.counters.dropped += 1
            if not self._dropping:
                log.warning(
                    "handler queue full, dropping events", handler=self.name, queue_size=self.limit
                )
            self._dropping += 1
            return
        if self._dropping:
            log.warning("handler queue accepting again", handler=self.name, dropped=self._dropping)
            self._dropping = 0
        self.queue.append(event)
        self._wake.set()

    def start(self) -> None:
        if self.task is None:
            if not self.is_async:
                self._thread = _HandlerThread(self.name)
            loop = asyncio.get_running_loop()
            self.task = loop.create_task(self._run(), name=f"authd-handler:{self.name}")
            self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("handler worker crashed", handler=self.name, exc_info=task.exception())
        self.bus._worker_done(self)

    def stop(self) -> None:
        """Finish what is queued, close the handler, end."""
        self.stopping = True
        self._wake.set()

    def abandon(self) -> None:
        """Drop (and count) what is still queued; the event in hand finishes, then it closes."""
        if self.queue:
            lost = len(self.queue)
            self.queue.clear()
            self.counters.dropped += lost
            log.warning(
                "removed handler missed its deadline; queued events dropped",
                handler=self.name,
                dropped=lost,
            )

    def reopen(self) -> None:
        if self.task is not None and not self.task.done():
            pending = self._begin("reopen", self.handler.reopen)
            if pending is not None:
                self.bus._track(asyncio.ensure_future(self._await("reopen", pending)))

    async def _run(self) -> None:
        try:
            while True:
                while self.queue:
                    self.current = self.queue.popleft()
                    await self._deliver(self.current)
                    self.current = None
                if self.stopping:
                    break
                self._wake.clear()
                await self._wake.wait()
            pending = self._begin("close", self.handler.close)
            if pending is not None:
                await self._await("close", pending)
        finally:
            if self._thread is not None:
                self._thread.stop()

    async def _deliver(self, event: Event) -> None:
        try:
            if self.is_async:
                await self._deliver_async(event)
            else:
                await self._deliver_sync(event)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self.counters.timed_out += 1
            log.warning("handler timed out", **self._about(event), timeout=self.timeout)
        except HandlerError as e:
            self.counters.failed += 1
            log.warning("handler failed", **self._about(event), error=str(e))
        except Exception:
            self.counters.failed += 1
            log.warning("handler raised", **self._about(event), exc_info=True)
        else:
            self.counters.delivered += 1

    async def _deliver_async(self, event: Event) -> None:
        task = asyncio.ensure_future(_guard(lambda: self.handler.handle(event)))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            # Don't wait for the cancellation to land: a handler that swallows it must not
            # stall the queue. The bus keeps the task referenced until it ends.
            task.cancel()
            self.bus._track(task)
            raise TimeoutError
        if task.cancelled():  # by the handler itself: must not end this worker
            raise HandlerError("handler was cancelled")
        task.result()

    async def _deliver_sync(self, event: Event) -> None:
        assert self._thread is not None
        future = self._thread.submit(self.handler.handle, event)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            # The thread cannot be stopped: count the overrun now, and start the next event
            # only when this call returns, so order holds and threads never pile up. Until
            # then the queue absorbs events, and drops them (counted) once full.
            self.counters.timed_out += 1
            log.warning("handler timed out; its thread is still busy", **self._about(event))
            await asyncio.wait({future})

    def _about(self, event: Event) -> dict[str, str]:
        return {"handler": self.name, "event_name": event.name, "event_id": event.id}

    def _begin(self, what: str, fn: Callable[[], Any]) -> Awaitable[Any] | None:
        """Start ``reopen``/``close`` now, where ``handle`` runs: so it is ordered before
        every event emitted after this call."""
        if self._thread is not None:
            return self._thread.submit(fn)
        try:
            result = fn()
        except Exception:
            log.warning(f"handler {what} failed", handler=self.name, exc_info=True)
            return None
        return result if inspect.isawaitable(result) else None

    async def _await(self, what: str, pending: Awaitable[Any]) -> None:
        try:
            await asyncio.wait_for(pending, self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning(f"handler {what} failed", handler=self.name, exc_info=True)


class EventBus:
    """Per-handler queues and workers; see the module docstring."""

    def __init__(self, *, queue_size: int = 1000, handler_timeout: float = 10.0) -> None:
        self.queue_size = queue_size
        self.handler_timeout = handler_timeout
        self._connected: list[_Worker] = []
        self._configured: list[_Worker] = []
        self._active: tuple[_Worker, ...] = ()
        self._retiring: list[_Worker] = []
        self._counters: dict[str, _Counters] = {}
        self._retired = _Counters()
        self._signals: dict[str, Signal] = {}
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

    # -- blinker-style subscriptions ------------------------------------------------------

    def signal(self, name: str) -> Signal:
        """The named signal (one object per name and bus)."""
        if name not in self._signals:
            self._signals[name] = Signal(self, name)
        return self._signals[name]

    def connect(
        self,
        pattern: str | Iterable[str],
        fn: F | None = None,
        *,
        sender: str | Iterable[str] | None = None,
        name: str | None = None,
        timeout: float | None = None,
        queue_size: int | None = None,
    ) -> Any:
        """Subscribe ``fn(event)`` to events matching ``pattern`` (fnmatch style, e.g. ``auth.*``).

        ``sender`` keeps only events of that service (or services). Without ``fn`` it returns a
        decorator. Connecting the same function twice is a no-op. Returns ``fn``.
        """
        if fn is None:

            def decorator(f: F) -> F:
                return self.connect(
                    pattern, f, sender=sender, name=name, timeout=timeout, queue_size=queue_size
                )

            return decorator
        patterns = (pattern,) if isinstance(pattern, str) else tuple(pattern)
        if isinstance(sender, str):
            sender = (sender,)
        senders = None if sender is None else frozenset(sender)
        for w in self._connected:
            h = w.handler
            if getattr(h, "fn", None) is fn and (h.events, h.services) == (patterns, senders):
                return fn
        qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
        handler = FunctionHandler(
            fn,
            name=self._unique_name(name or f"{getattr(fn, '__module__', None)}.{qualname}"),
            events=patterns,
            services=senders,
            timeout=timeout,
            queue_size=queue_size,
        )
        self._connected.append(self._worker(handler))
        self._refresh()
        return fn

    def on(self, pattern: str | Iterable[str], **kwargs: Any) -> Callable[[F], F]:
        """Decorator form of :meth:`connect`: ``@bus.on("auth.*")``."""
        return self.connect(pattern, None, **kwargs)

    def disconnect(self, fn: Receiver) -> bool:
        """Unsubscribe ``fn`` everywhere; what is already queued for it is still delivered."""
        gone = [w for w in self._connected if getattr(w.handler, "fn", None) is fn]
        self._connected = [w for w in self._connected if w not in gone]
        self._refresh()
        for w in gone:
            self._retire(w)
        return bool(gone)

    def _unique_name(self, base: str) -> str:
        taken = {w.name for w in (*self._active, *self._retiring)}
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}#{n}"
        return name

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
        workers = [*self._active, *self._retiring]
        self._connected, self._configured = [], []
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
        totals = _Counters()
        totals.add(self._retired)
        for c in self._counters.values():
            totals.add(c)
        totals.dropped += self._discarded
        return {
            "handlers": handlers,
            "totals": {**asdict(totals), "queued": sum(queued.values()), "emitted": self._emitted},
        }

    # -- internals ------------------------------------------------------------------------

    def _worker(self, handler: Handler) -> _Worker:
        counters = self._counters.setdefault(handler.name, _Counters())
        worker = _Worker(self, handler, counters)
        if self._loop is not None:
            worker.start()
        return worker

    def _refresh(self) -> None:
        self._active = (*self._connected, *self._configured)

    def _retire(self, worker: _Worker) -> None:
        worker.stop()
        if worker not in self._retiring:
            self._retiring.append(worker)

    def _worker_done(self, worker: _Worker) -> None:
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

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_forget)
