"""``webhook``: POST the event as JSON, retrying with exponential backoff.

Speaks just enough HTTP/1.1 over asyncio streams to send one request and read the status
line: no thread, and a timeout really cancels. Connection errors, timeouts, 5xx and 429 are
retried; other statuses are final. With a secret, ``X-Authd-Signature: sha256=<hex>`` is the
HMAC-SHA256 of the exact body; the body carries the event id and time, so receivers can reject
replays. ``X-Authd-Delivery`` (the event id) stays the same across retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

import authd
from authd.errors import ConfigError
from authd.events.handler import Handler, HandlerError
from authd.events.config import HandlerContext, WebhookConfig, read_secret, resolve_path
from authd.events.model import Event

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_RESERVED = {"host", "content-length", "connection", "transfer-encoding"}


class WebhookHandler(Handler):
    def __init__(
        self,
        *,
        host: str,
        port: int,
        netloc: str,
        target: str,
        ssl_context: ssl.SSLContext | None,
        headers: dict[str, str],
        secret: bytes | None,
        signature_header: str,
        attempt_timeout: float,
        retries: int,
        backoff: float,
        **base: Any,
    ) -> None:
        budget = (retries + 1) * attempt_timeout + backoff * (2**retries - 1) + 1.0
        super().__init__(timeout=budget, **base)
        self.host = host
        self.port = port
        self.netloc = netloc
        self.target = target
        self.ssl_context = ssl_context
        self.headers = headers
        self.secret = secret
        self.signature_header = signature_header
        self.attempt_timeout = attempt_timeout
        self.retries = retries
        self.backoff = backoff

    async def handle(self, event: Event) -> None:
        request = self._request(event)
        delay = self.backoff
        for attempt in range(1, self.retries + 2):
            try:
                async with asyncio.timeout(self.attempt_timeout):
                    status = await self._post(request)
            except OSError as e:  # TimeoutError and ConnectionError included
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if 200 <= status < 300:
                    return
                problem = f"HTTP {status}"
                if status < 500 and status != 429:
                    raise HandlerError(f"POST to {self.netloc} refused: {problem}")  # final: no retry
            if attempt <= self.retries:
                await asyncio.sleep(delay)
                delay *= 2
        raise HandlerError(f"POST to {self.netloc} failed after {attempt} attempt(s): {problem}", retry=True)

    def _request(self, event: Event) -> bytes:
        body = event.to_json()
        defaults = {
            "User-Agent": f"authd/{authd.__version__}",
            "Content-Type": "application/json",
            "X-Authd-Event": event.name,
            "X-Authd-Delivery": event.id,
        }
        custom = {k.lower() for k in self.headers}
        headers = {
            "Host": self.netloc,
            **{k: v for k, v in defaults.items() if k.lower() not in custom},
            **self.headers,
            "Content-Length": str(len(body)),
            "Connection": "close",
        }
        if self.secret is not None:
            digest = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
            headers[self.signature_header] = f"sha256={digest}"
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return f"POST {self.target} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body

    async def _post(self, request: bytes) -> int:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl_context)
        try:
            writer.write(request)
            await writer.drain()
            line = await reader.readline()
        except ValueError:  # no newline within the stream's limit
            raise ConnectionError("the reply's status line is too long") from None
        finally:
            writer.close()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ConnectionError("no HTTP status line in the reply")
        return int(parts[1])


def build(cfg: WebhookConfig, ctx: HandlerContext, where: str, **base: Any) -> WebhookHandler:
    url = urlsplit(cfg.url)
    try:
        port = url.port
    except ValueError as e:
        raise ConfigError(f"{where}.url: {e}") from None
    if url.scheme not in ("http", "https") or not url.hostname or not cfg.url.isascii():
        raise ConfigError(f"{where}.url: expected an ASCII http://HOST/... or https://HOST/...")
    if url.username is not None or url.password is not None:
        raise ConfigError(f"{where}.url: no credentials in the URL; use headers or secret_file")
    if url.fragment:
        raise ConfigError(f"{where}.url: a fragment is never sent; remove it")
    context = None
    if url.scheme == "https":
        cafile = str(resolve_path(ctx, cfg.ca_file)) if cfg.ca_file else None
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{where}.ca_file: {e}") from None
    elif cfg.ca_file:
        raise ConfigError(f"{where}.ca_file: only meaningful for https URLs")
    for key, value in (*cfg.headers.items(), (cfg.signature_header, "")):
        if not _TOKEN.fullmatch(key):
            raise ConfigError(f"{where}.headers: {key!r} is not a valid header name")
        if key.lower() in _RESERVED:
            raise ConfigError(f"{where}.headers: {key} is set by authd")
        if any(c in value for c in "\r\n\0") or not value.isascii():
            raise ConfigError(f"{where}.headers.{key}: value must be printable ASCII on one line")
    secret = read_secret(
        ctx, where, "secret", value=cfg.secret, file=cfg.secret_file, env=cfg.secret_env
    )
    return WebhookHandler(
        host=url.hostname,
        port=port or (443 if context else 80),
        netloc=url.netloc,
        target=(url.path or "/") + (f"?{url.query}" if url.query else ""),
        ssl_context=context,
        headers=dict(cfg.headers),
        secret=secret,
        signature_header=cfg.signature_header,
        attempt_timeout=cfg.timeout,
        retries=cfg.retries,
        backoff=cfg.backoff,
        max_age=cfg.max_age,
        retry_backoff=cfg.retry_backoff,
        **base,
    )
