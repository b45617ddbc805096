"""Turn ``[[handler]]`` tables into live handlers, validating everything a reload must check first.

Building has no side effects beyond imports: files, databases and connections are opened on
the first event, so ``authd check-config`` can build handlers too.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

from authd.errors import ConfigError
from authd.events.handler import Handler
from authd.events.config import (
    AuditConfig,
    ExecConfig,
    HandlerConfig,
    HandlerContext,
    LastlogConfig,
    MailConfig,
    PythonConfig,
    RedisStreamConfig,
    WebhookConfig,
)
from authd.events.handlers import audit, lastlog, mail, python, redis_stream, webhook
from authd.events.handlers import exec as exec_
from authd.events.model import EVENT_NAMES

_BUILDERS: dict[type, Callable[..., Handler]] = {
    AuditConfig: audit.build,
    LastlogConfig: lastlog.build,
    WebhookConfig: webhook.build,
    MailConfig: mail.build,
    RedisStreamConfig: redis_stream.build,
    ExecConfig: exec_.build,
    PythonConfig: python.build,
}


def build_handlers(configs: Sequence[HandlerConfig], ctx: HandlerContext) -> list[Handler]:
    """Build every handler, or raise ConfigError naming ``handler[i]...``.

    Built handlers hold no resources until their first event, so a failed build (a refused
    reload) leaves nothing to clean up.

    A handler's name defaults to its type; names must be unique (they key ``status`` counters
    and who a welcome mail was sent to), so two handlers of one type need explicit names.
    """
    handlers: list[Handler] = []
    seen: dict[str, int] = {}
    for i, cfg in enumerate(configs):
        where = f"handler[{i}]"
        name = cfg.name if cfg.name is not None else str(type(cfg).__struct_config__.tag)
        if not name or any(c.isspace() or not c.isprintable() for c in name):
            raise ConfigError(f"{where}.name: {name!r} must be printable, without spaces")
        if name in seen:
            raise ConfigError(
                f"{where}.name: {name!r} is already used by handler[{seen[name]}];"
                " give each handler of the same type its own name"
            )
        seen[name] = i
        for j, pattern in enumerate(cfg.events):
            if not any(fnmatch.fnmatchcase(e, pattern) for e in EVENT_NAMES):
                raise ConfigError(f"{where}.events[{j}]: {pattern!r} matches no event")
        base: dict[str, Any] = {
            "name": name,
            "events": cfg.events,
            "services": cfg.services,
            "queue_size": cfg.queue_size,
        }
        handlers.append(_BUILDERS[type(cfg)](cfg, ctx, where, **base))
    return handlers
