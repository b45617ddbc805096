"""One Redis connection pool and its health, shared by the session and lockout stores.

Every command runs under `[store] timeout`; a failure marks the link down and raises
`StoreUnavailable`. While down, calls fail at once (no request pays the timeout again) until
`retry_interval` has passed, when the next call tries Redis again; its success brings the
link back up. `state()` is what `status` shows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from .. import StoreUnavailable
from ..config import StoreConfig

log = structlog.get_logger("authd.store")
T = TypeVar("T")


class Link:
    def __init__(self, config: StoreConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.prefix = config.prefix
        self._clock = clock
        pool = BlockingConnectionPool.from_url(config.url, max_connections=config.connections, timeout=config.timeout,
                                               socket_timeout=config.timeout, socket_connect_timeout=config.connect_timeout)
        self.client = Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        self.error: str | None = None
        self.down_since: float | None = None
        self.failures = 0
        self._retry_at = 0.0
        self._closed = False

    def script(self, source: str) -> Callable[..., Awaitable[Any]]:
        return self.client.register_script(source)  # type: ignore[return-value]

    @property
    def up(self) -> bool:
        return self.error is None

    def state(self) -> dict[str, Any]:
        return {"backend": "redis", "state": "ok" if self.up else "down", "error": self.error,
                "down_since": self.down_since, "failures": self.failures}

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        if self.error is not None and self._clock() < self._retry_at:
            raise StoreUnavailable(self.error)
        try:
            async with asyncio.timeout(self.config.timeout):
                result = await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise StoreUnavailable(self.error) from None
        if self.error is not None:
            log.warning("redis store reachable again", url=_safe_url(self.config.url), down_for=round(time.time() - (self.down_since or 0), 3))
            self.error = self.down_since = None
        return result

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self._retry_at = self._clock() + self.config.retry_interval
        message = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        if self.error is None:
            self.down_since = time.time()
            log.error("redis store unavailable", url=_safe_url(self.config.url), error=message)
        self.error = message

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.client.aclose()


def _safe_url(url: str) -> str:
    """The URL without a password (redis://:secret@host)."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    return f"{scheme}{sep}{rest[at + 1:]}" if at >= 0 else url
