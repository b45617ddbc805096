"""Notice when something blocks the event loop, and name the handler that did it.

An ``async def`` handler runs on the daemon's event loop: a blocking call in it (``time.sleep``,
a synchronous HTTP request) stalls every login until it returns, and no timeout can interrupt
it. The bus cannot prevent that, but it can say so: a thread asks the loop for a turn every
``threshold`` seconds; when the turn does not come in time, it looks up the task the loop is
running, and if that task is a handler's, logs a warning naming it and counts it against that
handler (``blocked_loop`` in ``status``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("authd.events")

TASK_PREFIX = "authd-handler:"  # the name of every task that runs a handler's code on the loop


class LoopWatch:
    def __init__(self, loop: asyncio.AbstractEventLoop, threshold: float, on_block: Callable[[str], None]) -> None:
        self._loop = loop
        self._threshold = threshold
        self._on_block = on_block  # called from the loop, once it runs again, with the handler's name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="authd-loopwatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            turn = threading.Event()
            started = time.monotonic()
            try:
                self._loop.call_soon_threadsafe(turn.set)
            except RuntimeError:  # the loop is closed
                return
            if turn.wait(self._threshold):
                self._stop.wait(self._threshold)
                continue
            task = asyncio.current_task(self._loop)
            name = task.get_name() if task is not None else ""
            handler = name[len(TASK_PREFIX):] if name.startswith(TASK_PREFIX) else None
            while not turn.wait(self._threshold) and not self._stop.is_set():
                pass
            blocked = round(time.monotonic() - started, 3)
            if handler is None:
                log.warning("event loop was blocked", seconds=blocked, task=name or None)
                continue
            log.warning("an async handler blocked the event loop; every request waited: make it a plain "
                        "function, or use non-blocking calls", handler=handler, seconds=blocked)
            try:
                self._loop.call_soon_threadsafe(self._on_block, handler)
            except RuntimeError:
                return
