"""``redis_stream``: append each event to a Redis stream, so a fleet's events land in one place.

``XADD <stream> MAXLEN ~ <maxlen> * name <event name> event <event JSON>``: every host's authd
appends to the same stream, and consumers read it with groups (``XREADGROUP``, ``XACK``,
``XAUTOCLAIM`` for a dead consumer's entries), de-duplicating on the event ``id``, since the
outbox delivers at least once. Per-host jobs a fleet must do once (a welcome mail, last-login
records) belong in one such consumer.

As a handler it is isolated from logins: Redis down or slow only delays this handler, and its
events wait in the outbox and are retried with backoff for up to ``max_age``. The client is
synchronous and runs in the handler's own thread; it connects on the first event.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from authd.errors import ConfigError
from authd.events.config import HandlerContext, RedisStreamConfig
from authd.events.handler import Handler, HandlerError
from authd.events.model import Event

SCHEMES = ("redis", "rediss", "unix")


class RedisStreamHandler(Handler):
    def __init__(self, *, url: str, stream: str, maxlen: int, attempt_timeout: float, **base: Any) -> None:
        super().__init__(timeout=2 * attempt_timeout + 1.0, **base)  # a connect and one XADD
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.attempt_timeout = attempt_timeout
        self._client: Any = None

    def handle(self, event: Event) -> None:
        import redis

        try:
            if self._client is None:
                self._client = redis.Redis.from_url(self.url, socket_timeout=self.attempt_timeout,
                                                    socket_connect_timeout=self.attempt_timeout)
            self._client.xadd(self.stream, {"name": event.name, "event": event.to_json()}, maxlen=self.maxlen,
                              approximate=True)
        except (redis.RedisError, OSError) as exc:
            self.close()  # the next attempt starts from a fresh connection
            raise HandlerError(f"XADD to stream {self.stream!r} failed: {type(exc).__name__}: {exc}", retry=True) from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def build(cfg: RedisStreamConfig, ctx: HandlerContext, where: str, **base: Any) -> RedisStreamHandler:
    try:
        import redis  # noqa: F401
    except ImportError:
        raise ConfigError(f"{where}: the redis_stream handler needs the redis package (pip install authd[redis])") from None
    if urlsplit(cfg.url).scheme not in SCHEMES:
        raise ConfigError(f"{where}.url: expected redis://HOST[:PORT][/DB], rediss://... or unix:///PATH")
    return RedisStreamHandler(url=cfg.url, stream=cfg.stream, maxlen=cfg.maxlen, attempt_timeout=cfg.timeout,
                              max_age=cfg.max_age, retry_backoff=cfg.retry_backoff, **base)
