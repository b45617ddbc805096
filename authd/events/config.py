"""``[[handler]]`` tables of authd.toml: one strict struct per built-in type, tagged on ``type``.

These are plain data; :func:`authd.events.build_handlers` turns them into live handlers and
does the checks that need the file system or imports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from authd import securefs
from authd.errors import ConfigError

Positive = Annotated[float, msgspec.Meta(gt=0)]
Patterns = Annotated[tuple[str, ...], msgspec.Meta(min_length=1)]


@dataclass(frozen=True)
class HandlerContext:
    """Where handlers keep state (``state_dir``) and resolve relative paths (``base_dir``)."""

    state_dir: Path
    base_dir: Path


class _Handler(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"
):
    name: str | None = None
    events: Patterns = ("*",)
    services: Annotated[tuple[str, ...], msgspec.Meta(min_length=1)] | None = None
    queue_size: Annotated[int, msgspec.Meta(ge=1)] | None = None


class AuditConfig(_Handler, tag="audit", frozen=True, kw_only=True):
    path: str
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o600


class LastlogConfig(_Handler, tag="lastlog", frozen=True, kw_only=True):
    pass


class _Retrying(_Handler, frozen=True, kw_only=True):
    """Handlers whose failures may be temporary: retried with backoff for up to `max_age`."""

    max_age: Annotated[float, msgspec.Meta(ge=0)] = 86400.0
    retry_backoff: Annotated[float, msgspec.Meta(gt=0)] = 1.0


class WebhookConfig(_Retrying, tag="webhook", frozen=True, kw_only=True):
    url: str
    timeout: Positive = 5.0
    retries: Annotated[int, msgspec.Meta(ge=0, le=20)] = 3
    backoff: Annotated[float, msgspec.Meta(ge=0)] = 0.5
    headers: dict[str, str] = {}
    secret: str | None = None
    secret_file: str | None = None
    secret_env: str | None = None
    signature_header: str = "X-Authd-Signature"
    ca_file: str | None = None

    def __repr__(self) -> str:
        shown = "<hidden>" if self.secret is not None else None
        return f"WebhookConfig(name={self.name!r}, url={self.url!r}, secret={shown})"


class MailConfig(_Retrying, tag="mail", frozen=True, kw_only=True):
    mode: Literal["welcome", "every"] = "welcome"
    host: str = "localhost"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    tls: Literal["none", "starttls", "implicit"] = "none"
    ca_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    sender: str = msgspec.field(name="from")
    to: str
    subject: str
    body: str
    timeout: Positive = 10.0


class RedisStreamConfig(_Retrying, tag="redis_stream", frozen=True, kw_only=True):
    url: str = "unix:///run/redis/redis.sock"
    stream: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] = "authd:events"
    maxlen: Annotated[int, msgspec.Meta(ge=1)] = 1_000_000  # trimmed approximately (MAXLEN ~)
    timeout: Positive = 2.0  # connect, and one XADD

    def __repr__(self) -> str:  # the URL may carry a password
        return f"RedisStreamConfig(name={self.name!r}, stream={self.stream!r})"


class ExecConfig(_Handler, tag="exec", frozen=True, kw_only=True):
    command: Annotated[tuple[str, ...], msgspec.Meta(min_length=1)]
    timeout: Positive = 10.0
    env: dict[str, str] = {}


class PythonConfig(_Handler, tag="python", frozen=True, kw_only=True):
    callable: str | None = None
    entry_point: str | None = None
    factory: bool = False
    options: dict[str, Any] = {}
    timeout: Positive | None = None


HandlerConfig = (AuditConfig | LastlogConfig | WebhookConfig | MailConfig | RedisStreamConfig | ExecConfig
                 | PythonConfig)


def resolve_path(ctx: HandlerContext, value: str) -> Path:
    """A config path: absolute as written, relative ones against the directory of authd.toml."""
    return securefs.resolve(ctx.base_dir, value)


def read_secret(
    ctx: HandlerContext,
    where: str,
    key: str,
    *,
    value: str | None,
    file: str | None,
    env: str | None,
) -> bytes | None:
    """The secret given inline, as ``{key}_file`` or as ``{key}_env`` (at most one), or None.

    Errors name the key, never the secret.
    """
    given = [k for k, v in ((key, value), (f"{key}_file", file), (f"{key}_env", env)) if v]
    if len(given) > 1:
        raise ConfigError(f"{where}: set only one of {', '.join(given)}")
    if value:
        return value.encode()
    if file:
        path = resolve_path(ctx, file)
        try:
            data = path.read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"{where}.{key}_file: cannot read {path}: {e.strerror}") from None
        if not data:
            raise ConfigError(f"{where}.{key}_file: {path} is empty")
        return data
    if env:
        data = os.environ.get(env, "").encode().strip()
        if not data:
            raise ConfigError(f"{where}.{key}_env: environment variable {env} is unset or empty")
        return data
    return None
