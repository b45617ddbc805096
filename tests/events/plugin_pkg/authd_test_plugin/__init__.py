"""A stand-in third-party plugin for authd's ``python`` handler.

Installed for the tests by putting ``tests/events/plugin_pkg`` on ``sys.path`` (or
``PYTHONPATH`` for a daemon subprocess): ``authd_test_plugin-1.0.dist-info/entry_points.txt``
registers ``record`` and ``recorder`` in the entry-point group ``authd.handlers``.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

RECEIVED: list[tuple[str, Any]] = []
THREADS: list[str] = []


def record(event: Any) -> None:
    """A sync handler: runs in the handler's own thread."""
    THREADS.append(threading.current_thread().name)
    RECEIVED.append(("sync", event))


async def record_async(event: Any) -> None:
    """An async handler: runs on the event loop."""
    await asyncio.sleep(0)
    RECEIVED.append(("async", event))


class Recorder:
    """A factory plugin: ``Recorder(context, path=...)`` appends each event's JSON to a file
    in the state dir, and keeps track of reopen/close."""

    def __init__(self, context: Any, *, path: str = "plugin-events.jsonl") -> None:
        self.path = Path(context.state_dir) / path
        self.reopened = 0
        self.closed = False

    def __call__(self, event: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            f.write(event.to_json() + b"\n")

    def reopen(self) -> None:
        self.reopened += 1

    def close(self) -> None:
        self.closed = True
