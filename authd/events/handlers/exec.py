"""``exec``: run a command per event — the event as JSON on stdin, its fields as ``AUTHD_*``.

No shell. The command runs in the directory of authd.toml, against which its relative paths
resolve. The child gets a small, clean environment (``PATH``, ``LANG``, the ``AUTHD_*``
variables and the handler's ``env`` table), never the daemon's own: that may hold secrets such
as a webhook key. It runs in its own process group, so a timeout kills whatever it spawned.
A non-zero exit is a failure; the tail of its stderr is logged.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from contextlib import suppress
from pathlib import Path
from typing import Any

from authd.errors import ConfigError
from authd.events.handler import Handler, HandlerError
from authd.events.config import ExecConfig, HandlerContext, resolve_path
from authd.events.model import Event

STDERR_TAIL = 2048
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


_RENAMED = {"name": "AUTHD_EVENT", "id": "AUTHD_EVENT_ID"}


def event_environ(event: Event) -> dict[str, str]:
    """``AUTHD_EVENT`` (the name), ``AUTHD_EVENT_ID``, ``AUTHD_USER``, ... for each field set."""
    return {
        _RENAMED.get(key, f"AUTHD_{key.upper()}"): str(value)
        for key, value in event.to_dict().items()
    }


class ExecHandler(Handler):
    def __init__(
        self, argv: list[str], env: dict[str, str], cwd: Path, kill_after: float, **base: Any
    ) -> None:
        super().__init__(timeout=kill_after + 5.0, **base)
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.kill_after = kill_after

    async def handle(self, event: Event) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**self.env, **event_environ(event)},
            cwd=self.cwd,
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(self.kill_after):
                stderr = await self._talk(proc, event.to_json() + b"\n")
                status = await proc.wait()
        except TimeoutError:
            raise TimeoutError(f"{self.argv[0]} killed after {self.kill_after}s") from None
        finally:
            if proc.returncode is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if status != 0:
            raise HandlerError(
                f"{self.argv[0]} exited with status {status}"
                + (f": {stderr.decode(errors='replace').strip()}" if stderr.strip() else "")
            )

    @staticmethod
    async def _talk(proc: asyncio.subprocess.Process, data: bytes) -> bytes:
        assert proc.stdin is not None and proc.stderr is not None
        with suppress(BrokenPipeError, ConnectionResetError):  # it need not read stdin
            proc.stdin.write(data)
            await proc.stdin.drain()
        proc.stdin.close()
        tail = b""
        while chunk := await proc.stderr.read(65536):
            tail = (tail + chunk)[-STDERR_TAIL:]
        return tail


def build(cfg: ExecConfig, ctx: HandlerContext, where: str, **base: Any) -> ExecHandler:
    program = cfg.command[0]
    path = str(resolve_path(ctx, program)) if "/" in program else shutil.which(program)
    if path is None or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise ConfigError(f"{where}.command[0]: {program!r} is not an executable file")
    for key in cfg.env:
        if not key or "=" in key or "\0" in key or key.startswith("AUTHD_"):
            raise ConfigError(f"{where}.env: invalid variable name {key!r}")
    env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), "LANG": "C.UTF-8", **cfg.env}
    return ExecHandler([path, *cfg.command[1:]], env, ctx.base_dir, cfg.timeout, **base)
