"""One handler's queue and the task (and, for sync handlers, the thread) that drains it.

Failures are logged and counted, overruns time out, and a full queue drops (and counts)
instead of blocking whoever emits: whatever the handler does costs only its own events.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from authd.events.handler import Handler, HandlerError, is_async
from authd.events.loopwatch import TASK_PREFIX
from authd.events.model import Event

if TYPE_CHECKING:
    from authd.events.bus import EventBus

log = structlog.get_logger("authd.events")


@dataclass
class Counters:
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    timed_out: int = 0
    blocked_loop: int = 0  # an async handler held the event loop past LoopWatch's threshold

    def add(self, other: Counters) -> None:
        self.delivered += other.delivered
        self.failed += other.failed
        self.dropped += other.dropped
        self.timed_out += other.timed_out
        self.blocked_loop += other.blocked_loop


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
        future.add_done_callback(forget)
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


def forget(task: asyncio.Task[Any] | asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class _Overran(Exception):
    """A sync handler's call outlived its timeout; it was counted as timed out when it did."""


class Worker:
    """One handler's queue and the task that drains it, in order."""

    def __init__(self, bus: EventBus, handler: Handler, counters: Counters) -> None:
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
            self.task = loop.create_task(self._run(), name=f"{TASK_PREFIX}{self.name}")
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
                self.bus.track(asyncio.ensure_future(self._await("reopen", pending)))

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
        except _Overran:
            pass  # counted and logged when it overran
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
        task = asyncio.get_running_loop().create_task(
            _guard(lambda: self.handler.handle(event)), name=f"{TASK_PREFIX}{self.name}"
        )
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            # Don't wait for the cancellation to land: a handler that swallows it must not
            # stall the queue. The bus keeps the task referenced until it ends.
            task.cancel()
            self.bus.track(task)
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
            # then the queue absorbs events, and drops them (counted) once full. The event
            # counts as timed out, never also as delivered; how the late call ended is logged.
            self.counters.timed_out += 1
            log.warning("handler timed out; its thread is still busy", **self._about(event), timeout=self.timeout)
            await asyncio.wait({future})
            error = future.exception()
            if error is None:
                log.info("timed-out handler call finished late", **self._about(event))
            elif isinstance(error, HandlerError):
                log.warning("timed-out handler call failed late", **self._about(event), error=str(error))
            else:
                log.warning("timed-out handler call raised late", **self._about(event), exc_info=error)
            raise _Overran from None

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
