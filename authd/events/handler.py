"""What the bus delivers events to: the `Handler` interface and its function adapter.

A handler implements ``handle(event)`` either as a plain method, which runs in the handler's
own thread, or as ``async def``, which runs on the event loop. The built-in handler types
(`authd.events.handlers`) and ``type = "python"`` handlers are all `Handler`s.
"""

from __future__ import annotations

import abc
import fnmatch
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from authd.events.model import Event

Receiver = Callable[[Event], Any]


class HandlerError(Exception):
    """An expected failure that explains itself; logged without a traceback.

    ``retry=True`` says trying again later may succeed (a receiver down, a timeout); a handler
    with a ``max_age`` then retries the event with backoff until it is that old.
    """

    def __init__(self, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


class Handler(abc.ABC):
    """Something the bus delivers events to.

    Subclasses implement :meth:`handle` either as a plain method, which the bus runs in the
    handler's own thread (as it does :meth:`reopen` and :meth:`close`), or as ``async def``,
    which runs on the event loop. ``timeout`` bounds one event (None: the bus default);
    ``queue_size`` bounds the in-memory backlog (None: the bus default); ``max_age`` (None: no
    retries) is how long a retryable failure is retried, starting ``retry_backoff`` seconds
    apart and doubling.
    """

    def __init__(
        self,
        *,
        name: str,
        events: Iterable[str] = ("*",),
        services: Iterable[str] | None = None,
        timeout: float | None = None,
        queue_size: int | None = None,
        max_age: float | None = None,
        retry_backoff: float = 1.0,
    ) -> None:
        self.name = name
        self.max_age = max_age
        self.retry_backoff = retry_backoff
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


def is_async(fn: Any) -> bool:
    """True for coroutine functions and for objects whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)
    )
