"""Shared helpers for the lockout tests: real asyncio, real SQLite, short real lock times."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

from authd.lockout import Attempt, Locked, Lockout, LockoutConfig, load_config

TEST_TIMEOUT = 20.0


def run(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop, with a generous overall timeout."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), TEST_TIMEOUT))

    return wrapper


def config(**table: Any) -> LockoutConfig:
    """A LockoutConfig from a [lockout] table written as keyword arguments."""
    return load_config(table)


async def login(
    lockout: Lockout, user: str, password: str, rhost: str | None = None, *, ok: bool = False
) -> Locked | tuple[Locked, ...]:
    """One login that PAM answers with `ok`: the refusal, or the locks its failure imposed."""
    outcome = await lockout.begin(user, rhost, password)
    if isinstance(outcome, Locked):
        return outcome
    assert isinstance(outcome, Attempt)
    locks = lockout.finish(outcome, ok)
    await lockout.durable()  # as the daemon does before it replies
    return locks


async def fail_distinct(
    lockout: Lockout, user: str, count: int, rhost: str | None = None, *, tag: str = "wrong"
) -> list[Locked | tuple[Locked, ...]]:
    """`count` failed logins, each with a different wrong password."""
    return [await login(lockout, user, f"{tag}-{i}", rhost) for i in range(count)]
