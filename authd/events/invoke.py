"""How a handler is called: in its own thread (sync) or as a named task (async), with a timeout.

A sync call that overruns cannot be stopped (Python cannot kill a thread): it is reported as
timed out once it has finished, and how it finished is logged, so the next event never runs
beside it and the overrun is never also counted as delivered.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from authd.events.handler import Handler, HandlerError, is_async
from authd.events.loopwatch import TASK_PREFIX
from authd.events.model import Event

log = structlog.get_logger("authd.events")


class Overran(TimeoutError):
    """A sync call outlived its timeout; `on_overrun` was told when it did, this when it ended."""


class Invoker:
    def __init__(self, handler: Handler, timeout: float, track: Callable[[asyncio.Future[Any]], None],
                 on_overrun: Callable[[], None]) -> None:
        self.handler = handler
        self.name = handler.name
        self.timeout = timeout
        self.is_async = is_async(handler.handle)
        self._track = track  # keeps a timed-out async call referenced until it ends
        self._on_overrun = on_overrun  # counts the overrun at once, not when the stuck call returns
        self._thread: _HandlerThread | None = None if self.is_async else _HandlerThread(self.name)

    async def call(self, event: Event) -> None:
        """Deliver one event; TimeoutError past the timeout, or whatever the handler raised."""
        if self.is_async:
            await self._deliver_async(event)
        else:
            await self._deliver_sync(event)

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()

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
            self._track(task)
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
            # The thread cannot be stopped: the next event starts only when this call returns,
            # so order holds and threads never pile up. The event counts as timed out, never
            # also as delivered; how the late call ended is logged.
            log.warning("handler timed out; its thread is still busy", **self._about(event), timeout=self.timeout)
            self._on_overrun()
            await asyncio.wait({future})
            error = future.exception()
            if error is None:
                log.info("timed-out handler call finished late", **self._about(event))
            elif isinstance(error, HandlerError):
                log.warning("timed-out handler call failed late", **self._about(event), error=str(error))
            else:
                log.warning("timed-out handler call raised late", **self._about(event), exc_info=error)
            raise Overran from None

    def _about(self, event: Event) -> dict[str, str]:
        return {"handler": self.name, "event_name": event.name, "event_id": event.id}

    def begin(self, what: str, fn: Callable[[], Any]) -> Awaitable[Any] | None:
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

    async def finish(self, what: str, pending: Awaitable[Any]) -> None:
        try:
            await asyncio.wait_for(pending, self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning(f"handler {what} failed", handler=self.name, exc_info=True)


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
