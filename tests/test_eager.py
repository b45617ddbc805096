"""authd.eager: work run at once up to its first wait, then in a task that awaits exactly that."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable
from typing import Any

import pytest

from authd import eager

seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="caller")


async def rest(remainder: Awaitable[Any]) -> Any:
    return await remainder


def run(body: Any) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 10))


def test_work_that_never_waits_finishes_without_a_task_in_a_context_of_its_own() -> None:
    done: list[str] = []

    async def work() -> None:
        seen.set("work")
        done.append(seen.get())

    async def body() -> None:
        assert eager.start(asyncio.get_running_loop(), work(), rest) is None
        assert done == ["work"] and seen.get() == "caller"  # as a task's first step would: a copy

    run(body)


def test_work_that_waits_goes_on_in_a_task_in_the_same_context() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        gate = loop.create_future()
        steps: list[str] = []

        async def work() -> str:
            seen.set("work")
            steps.append("first")
            await asyncio.sleep(0)  # a bare yield
            value = await gate
            steps.append(seen.get())
            return value

        task = eager.start(loop, work(), rest)
        assert task is not None and steps == ["first"]
        loop.call_soon(gate.set_result, "answer")
        assert await task == "answer" and steps == ["first", "work"] and seen.get() == "caller"

    run(body)


def test_cancelling_the_task_reaches_the_work_where_it_waits() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        cleaned: list[str] = []

        async def work() -> None:
            try:
                await loop.create_future()
            except asyncio.CancelledError:
                cleaned.append("cancelled")
                await asyncio.sleep(0)  # it may still wait while it cleans up
                cleaned.append("cleaned")
                raise

        task = eager.start(loop, work(), rest)
        assert task is not None
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == ["cancelled", "cleaned"]

    run(body)


def test_errors_surface_where_they_happen() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()

        async def fails_at_once() -> None:
            raise ValueError("first step")

        async def fails_later() -> None:
            await asyncio.sleep(0)
            raise ValueError("after the wait")

        with pytest.raises(ValueError, match="first step"):
            eager.start(loop, fails_at_once(), rest)
        task = eager.start(loop, fails_later(), rest)
        assert task is not None
        with pytest.raises(ValueError, match="after the wait"):
            await task

    run(body)


def test_a_first_step_that_needs_a_task_of_its_own_is_not_for_this() -> None:
    """Why only some ops run at once: `asyncio.timeout` before the first wait finds no task."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[str] = loop.create_future()

        async def timed() -> None:
            async with asyncio.timeout(1):
                await asyncio.sleep(0)

        def from_a_callback() -> None:  # as `data_received` runs: no task is current
            try:
                eager.start(loop, timed(), rest)
            except RuntimeError as exc:
                failed.set_result(str(exc))

        loop.call_soon(from_a_callback)
        assert "inside a task" in await failed

    run(body)
