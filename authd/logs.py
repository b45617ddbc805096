"""structlog set-up: JSON lines when not on a tty, a console renderer otherwise.

On journald's stream (under systemd) each line starts with its sd-daemon(3) `<N>` priority,
which journald strips and files the line under: `journalctl -p warning -u authd` works.

Tracebacks are rendered without local variables (`show_locals=False`): a frame's locals may
hold a password. Request-scoped fields (request id, peer pid/uid) come from contextvars.

Log lines carry what clients chose (user names, request ids) and are read by fail2ban and by
people at terminals: the console rendering is coloured only on a tty (fail2ban's filter must
see the plain text), and any value with a control character (CR, LF, ESC, other C0/C1 codes,
U+2028/2029, bidi overrides) is shown as an escaped, quoted repr. JSON escapes C0 itself;
the rest of those, which JSON may carry raw, are \\u-escaped too. The log file is opened
like every file authd writes (`securefs`), on SIGHUP too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import structlog

from . import securefs, systemd

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
            self.file = os.fdopen(securefs.open_append(Path(path), 0o600, "daemon.log_file"), "ab")
        if old not in (sys.stderr.buffer, self.file):
            old.close()

    def reopen(self) -> None:
        """SIGHUP: a new file where the old one was; if that cannot be opened, keep writing the old."""
        if self.path is None:
            return
        try:
            self.open(self.path, std=self.std)
        except (OSError, securefs.UnsafePath) as exc:
            structlog.get_logger("authd.logs").error("cannot reopen the log file; still writing to the old one",
                                                     path=self.path, error=getattr(exc, "strerror", None) or str(exc))

    def isatty(self) -> bool:
        return self.file.isatty()

    def write(self, data: str | bytes) -> int:
        """Bytes from the JSON renderer, text from the console one; one flush per line."""
        return self.file.write(data.encode("utf-8", "replace") if isinstance(data, str) else data)

    def flush(self) -> None:
        self.file.flush()


def redirect_std(path: str | os.PathLike[str]) -> None:
    """Point fds 1 and 2 at a freshly opened `path` (append, 0600)."""
    fd = securefs.open_append(Path(path), 0o600, "daemon.log_file")
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
        processors += console_rendering(colors=stream.isatty())
        factory = structlog.PrintLoggerFactory(stream)
    if path is None and systemd.stderr_is_journal():
        processors[-1] = _with_priority(processors[-1])
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


def console_rendering(*, colors: bool) -> list[Any]:
    """The console format's last processors: control characters escaped, then structlog's renderer."""
    return [_escape_controls, structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback)]


class _Escaped:
    """A string the console renderer shows as its repr: quoted, every control character escaped."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return repr(self.text)

    __str__ = __repr__


def _escape_controls(logger: Any, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog's console renderer writes a string without quotes unless it has a space, `=`,
    a quote, CR or LF: an ESC or U+2028 in a user name would reach the terminal or the reader as is."""
    for key, value in event_dict.items():
        if isinstance(value, str) and key not in ("exception", "stack") and not value.isprintable():
            event_dict[key] = _Escaped(value)
    return event_dict


_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "exception": 3, "critical": 2}


def _with_priority(render: Any) -> Any:
    """Prefix what `render` makes with the `<N>` syslog priority of the line's level."""

    def prefixed(logger: Any, name: str, event_dict: dict[str, Any]) -> str | bytes:
        prefix = f"<{_PRIORITIES.get(event_dict.get('level', ''), 6)}>"
        line = render(logger, name, event_dict)
        return prefix.encode() + line if isinstance(line, bytes) else prefix + line

    return prefixed


_json = msgspec.json.Encoder(enc_hook=str)
# What JSON may carry raw but a terminal or a line splitter may act on: DEL, C1 controls,
# U+2028/2029 and the bidi controls (C0 controls JSON escapes itself).
_UNSAFE_IN_JSON = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8-\xae]|\xe2\x81[\xa6-\xa9]")


def _render_json(logger: Any, name: str, event_dict: dict[str, Any]) -> bytes:
    """structlog's JSONRenderer, with msgspec: a log line is on every request's path."""
    line = _json.encode(event_dict)
    if _UNSAFE_IN_JSON.search(line):  # only ever inside a string, where \uXXXX means the same
        line = _UNSAFE_IN_JSON.sub(lambda m: b"\\u%04x" % ord(m[0].decode()), line)
    return line

