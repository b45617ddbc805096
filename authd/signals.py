"""Receivers for authd's events in an application process, the way Flask and Django code connects them.

    from authd.signals import Receivers

    receivers = Receivers(cursor_file="var/authd.cursor")

    @receivers.on("auth.succeeded", services=["webmail"])
    def welcome(event):                 # runs here, in the application, not in the root daemon
        send_welcome_mail(event.user)

    receivers.run()                     # or: await receivers.run_async()

The stream comes from authd's `subscribe` op. A lost connection, a restart of authd or a cut-off
for reading too slowly is survived: the adapter reconnects (with backoff) and resumes after the
last event it handed to the receivers, so none is missed. With `cursor_file` that position
survives a restart of the application too; without one, a new process starts with new events.
Delivery is at least once: a receiver that must not act twice de-duplicates on `event.id`.
A receiver that raises is logged and the others still run.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .client import AsyncClient, ClientError, StreamEnded
from .events.model import Event

log = logging.getLogger("authd.signals")
F = TypeVar("F", bound=Callable[[Event], Any])
RECONNECT_MAX = 30.0  # seconds between reconnection attempts, at most


@dataclass(frozen=True)
class _Receiver:
    fn: Callable[[Event], Any]
    patterns: tuple[str, ...]
    services: frozenset[str] | None

    def wants(self, event: Event) -> bool:
        if self.services is not None and event.service not in self.services:
            return False
        return any(fnmatch.fnmatchcase(event.name, p) for p in self.patterns)


class Receivers:
    def __init__(self, path: str | os.PathLike[str] | None = None, *, cursor_file: str | os.PathLike[str] | None = None,
                 after: str = "now") -> None:
        self.path = path
        self.cursor_file = Path(cursor_file) if cursor_file is not None else None
        self.after = self._load_cursor() or after
        self._receivers: list[_Receiver] = []
        self._stop = asyncio.Event()

    def on(self, pattern: str | Iterable[str], *, services: Iterable[str] | None = None) -> Callable[[F], F]:
        """Decorator: call the function with every event whose name matches (`auth.*` style)."""
        patterns = (pattern,) if isinstance(pattern, str) else tuple(pattern)

        def connect(fn: F) -> F:
            self._receivers.append(_Receiver(fn, patterns, frozenset(services) if services is not None else None))
            return fn

        return connect

    def run(self) -> None:
        """Receive until a receiver calls `stop()`, or KeyboardInterrupt."""
        asyncio.run(self.run_async())

    def stop(self) -> None:
        self._stop.set()

    async def run_async(self) -> None:
        """Receive on the running loop; receivers run in order, `async def` ones awaited."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                await self._stream()
                delay = 0.5
            except StreamEnded as ended:
                log.warning("authd ended the event stream (%s); resuming", ended.code)
                delay = 0.5
            except ClientError as exc:
                log.warning("authd event stream lost (%s); reconnecting in %.1fs", exc, delay)
                await self._sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)

    async def _stream(self) -> None:
        patterns = sorted({p for r in self._receivers for p in r.patterns}) or ["*"]
        async with AsyncClient(self.path) as client:
            stream = client.subscribe(after=self.after, events=patterns)
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                while not self._stop.is_set():
                    step = asyncio.ensure_future(anext(stream))
                    await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if not step.done():
                        step.cancel()
                        return
                    event = step.result()
                    for receiver in self._receivers:
                        if receiver.wants(event):
                            await self._call(receiver, event)
                    self.after = event.id
                    self._save_cursor()
            finally:
                stop.cancel()
                await stream.aclose()

    async def _call(self, receiver: _Receiver, event: Event) -> None:
        try:
            result = receiver.fn(event)
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            log.exception("authd event receiver %s failed on %s", receiver.fn.__qualname__, event.id)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    def _load_cursor(self) -> str | None:
        if self.cursor_file is None:
            return None
        try:
            return self.cursor_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _save_cursor(self) -> None:
        if self.cursor_file is None:
            return
        fd, tmp = tempfile.mkstemp(dir=self.cursor_file.parent, prefix=f".{self.cursor_file.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(self.after + "\n")
        os.replace(tmp, self.cursor_file)
