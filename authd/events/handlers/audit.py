"""``audit``: one JSON line per event, appended to a file that logrotate may move away."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from authd import securefs
from authd.errors import ConfigError
from authd.events.handler import Handler, HandlerError
from authd.events.config import AuditConfig, HandlerContext, resolve_path
from authd.events.model import Event


class AuditHandler(Handler):
    """Appends with ``O_APPEND`` and one ``write`` per line, so concurrent writers (an old and a
    new handler during a reload) never interleave within a line. The file is opened on the
    first event and again after :meth:`reopen`, which is what logrotate's ``create`` needs.

    Each line carries client-chosen text (a user name): the file is opened as every file authd
    writes (:mod:`authd.securefs`), never through a symlink nor in a directory another user
    controls, so that text cannot be appended to some other file."""

    def __init__(self, path: Path, mode: int, where: str = "audit", **base: Any) -> None:
        super().__init__(**base)
        self.path = path
        self.mode = mode
        self.where = where
        self._fd: int | None = None

    def handle(self, event: Event) -> None:
        if self._fd is None:
            what = f"{self.where}.path"
            try:
                securefs.make_dir(self.path.parent, what, private=False)
                self._fd = securefs.open_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode, what)
            except securefs.UnsafePath as exc:
                raise HandlerError(str(exc)) from None
        os.write(self._fd, event.to_json() + b"\n")

    def reopen(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def build(cfg: AuditConfig, ctx: HandlerContext, where: str, **base: Any) -> AuditHandler:
    path = resolve_path(ctx, cfg.path)
    if cfg.mode & 0o002:
        raise ConfigError(f"{where}.mode: an audit log must not be world-writable")
    if path.is_dir():
        raise ConfigError(f"{where}.path: {path} is a directory")
    securefs.check_existing(path, f"{where}.path")  # refused at start and reload, not only at the first event
    target = path
    while not target.exists():  # missing directories are created (0700) on the first event
        target = target.parent
    if (target != path and not target.is_dir()) or not os.access(target, os.W_OK):
        raise ConfigError(f"{where}.path: {target} is not writable")
    securefs.check_dir(target if target != path else path.parent, f"{where}.path", private=False)
    return AuditHandler(path, cfg.mode, where, **base)
