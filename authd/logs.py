"""structlog set-up: JSON lines when not on a tty, a console renderer otherwise.

On journald's stream (under systemd) each line starts with its sd-daemon(3) `<N>` priority,
which journald strips and files the line under: `journalctl -p warning -u authd` works.

Tracebacks are rendered without local variables (`show_locals=False`): a frame's locals may
hold a password. Request-scoped fields (request id, peer pid/uid) come from contextvars.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, BinaryIO

import msgspec
import structlog

from . import systemd

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Stream:
    """A reopenable log destination: SIGHUP reopens the file so logrotate can move it.

    With `std=True` (the `--daemon` mode) the file also becomes fds 1 and 2, so whatever a
    library or a PAM worker prints lands in the same, reopened, log.
    """

    def __init__(self) -> None:
        self.path: str | None = None
        self.std = False
        self.file: BinaryIO = sys.stderr.buffer

    def open(self, path: str | None, *, std: bool = False) -> None:
        old = self.file
        self.path, self.std = path, std
        if path is None:
            self.file = sys.stderr.buffer
        elif std:
            redirect_std(path)
            self.file = sys.stderr.buffer
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.file = os.fdopen(fd, "ab")
        if old not in (sys.stderr.buffer, self.file):
            old.close()

    def reopen(self) -> None:
        if self.path is not None:
            self.open(self.path, std=self.std)

    def write(self, data: str | bytes) -> int:
        """Bytes from the JSON renderer, text from the console one; one flush per line."""
        return self.file.write(data.encode("utf-8", "replace") if isinstance(data, str) else data)

    def flush(self) -> None:
        self.file.flush()


def redirect_std(path: str | os.PathLike[str]) -> None:
    """Point fds 1 and 2 at a freshly opened `path` (append, 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


stream = _Stream()


def configure(*, level: str = "info", fmt: str = "auto", path: str | None = None, std: bool = False) -> None:
    stream.open(path, std=std)
    json_out = fmt == "json" or (fmt == "auto" and (path is not None or not sys.stderr.isatty()))
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_out:
        processors += [
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            _render_json,
        ]
        factory: Any = structlog.BytesLoggerFactory(stream)
    else:
        processors.append(structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback))
        factory = structlog.PrintLoggerFactory(stream)
    if path is None and systemd.stderr_is_journal():
        processors[-1] = _with_priority(processors[-1])
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "exception": 3, "critical": 2}


def _with_priority(render: Any) -> Any:
    """Prefix what `render` makes with the `<N>` syslog priority of the line's level."""

    def prefixed(logger: Any, name: str, event_dict: dict[str, Any]) -> str | bytes:
        prefix = f"<{_PRIORITIES.get(event_dict.get('level', ''), 6)}>"
        line = render(logger, name, event_dict)
        return prefix.encode() + line if isinstance(line, bytes) else prefix + line

    return prefixed


_json = msgspec.json.Encoder(enc_hook=str)


def _render_json(logger: Any, name: str, event_dict: dict[str, Any]) -> bytes:
    """structlog's JSONRenderer, with msgspec: a log line is on every request's path."""
    return _json.encode(event_dict)

