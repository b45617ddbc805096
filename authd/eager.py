"""Work run at once, up to its first wait, and given a task only if it waits.

What Python 3.12's eager tasks do, for the 3.11 that Debian 12 ships: a `hello`, a `session`
lookup or a `check` never waits, and a task of its own (creating it, scheduling its first
step, running that step from the loop) costs such a request about a fifth of its CPU. The
first step runs in a copy of the caller's context, as a task's would; work that then waits
goes on in a task, in that same context, awaiting exactly what it waited for, and a
cancellation of that task reaches it where it waits.

Only for work whose first step needs no task of its own: `asyncio.timeout` (anything that
calls `asyncio.current_task()`) before the first wait would find none. Called from inside a
task, it would find that one instead, and bind to the wrong task without a word: start work
this way from callbacks only (`Connection.spawn` checks).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any


def start(loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, Any],
          rest: Callable[[Awaitable[Any]], Coroutine[Any, Any, Any]]) -> asyncio.Task[Any] | None:
    """Run `work` up to its first wait. None if it finished there; else the task that awaits
    `rest(the remainder of work)`. An exception from the first step propagates."""
    context = contextvars.copy_context()
    try:
        waiting = context.run(work.send, None)
    except StopIteration:
        return None
    return loop.create_task(rest(Resumed(work, waiting)), context=context)


class Resumed:
    """A coroutine already run up to a wait (`waiting`, what it yielded), awaitable to its end."""

    __slots__ = ("_work", "_waiting")

    def __init__(self, work: Coroutine[Any, Any, Any], waiting: Any) -> None:
        self._work = work
        self._waiting = waiting

    def __await__(self) -> Generator[Any, Any, Any]:
        work, waiting = self._work, self._waiting
        while True:
            try:
                sent = yield waiting  # the task waits on the very future the work waits on
            except GeneratorExit:
                work.close()
                raise
            except BaseException as exc:  # a cancellation: into the work, where it waits
                try:
                    waiting = work.throw(exc)
                except StopIteration as done:
                    return done.value
                continue
            try:
                waiting = work.send(sent)
            except StopIteration as done:
                return done.value
