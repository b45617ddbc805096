"""structlog set-up: JSON lines when not on a tty, a console renderer otherwise.

Tracebacks are rendered without local variables (`show_locals=False`): a frame's locals may
hold a password. Request-scoped fields (request id, peer pid/uid) come from contextvars.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Stream:
    """A reopenable log destination: SIGHUP reopens the file so logrotate can move it."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.file: TextIO = sys.stderr

    def open(self, path: str | None) -> None:
        old = self.file
        if path is None:
            self.file = sys.stderr
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
        self.path = path
        if old is not sys.stderr and old is not self.file:
            old.close()

    def reopen(self) -> None:
        if self.path is not None:
            self.open(self.path)

    def write(self, text: str) -> int:
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()


stream = _Stream()


def configure(*, level: str = "info", fmt: str = "auto", path: str | None = None) -> None:
    stream.open(path)
    json_out = fmt == "json" or (fmt == "auto" and (path is not None or not sys.stderr.isatty()))
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_out:
        processors += [
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )

