"""``python`` handlers for the daemon tests: misbehaving ones, and recorders.

They run inside the authd subprocess (``callable = "tests.events.probes:..."``), so whatever
a test needs to see is written to files, never kept in memory.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class Recorder:
    """Factory: appends ``{"event": ..., "started": t0, "finished": t1}`` per event to
    ``path`` (relative to the state dir) after sleeping ``delay`` seconds, and touches
    ``path + ".closed"`` when the bus closes it. ``started`` / ``finished`` let a test
    compare when the handler ran with when a reply arrived, without timing anything.

    With ``gate`` (the name of a FIFO the test made in the state dir: `gate`), it finishes
    each event only when it reads a byte from it: the test holds the handler for as long as
    it needs (`release`), instead of the handler sleeping for a time the test must guess."""

    def __init__(self, context: Any, *, path: str, delay: float = 0.0, gate: str = "") -> None:
        self.path = Path(context.state_dir) / path
        self.delay = delay
        self.gate = Path(context.state_dir) / gate if gate else None
        self._gate: Any = None

    def __call__(self, event: Any) -> None:
        started = time.time()
        if self.delay:
            time.sleep(self.delay)
        while self.gate is not None:
            if self._gate is None:
                self._gate = self.gate.open("rb", buffering=0)  # blocks until the test opens it to release
            if self._gate.read(1):
                break
            self._gate.close()  # that release is used up (end of file): wait for the next one
            self._gate = None
        line = {"event": event.to_dict(), "started": started, "finished": time.time()}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self.path.with_name(self.path.name + ".closed").touch()


def raises(event: Any) -> None:
    raise RuntimeError(f"probe handler refuses {event.name}")


def hangs(event: Any) -> None:
    """Sync, never returns: its thread stays busy forever."""
    threading.Event().wait()


async def hangs_async(event: Any) -> None:
    """Async, never returns unless cancelled."""
    await asyncio.Event().wait()


def gate(path: Path) -> Path:
    """Make the FIFO a gated :class:`Recorder` waits at (for the test side)."""
    os.mkfifo(path, 0o600)
    return path


def release(gate: Path, events: int, timeout: float = 20.0) -> None:
    """Let a gated :class:`Recorder` finish `events` more events (for the test side), once it
    waits at its gate; fails if it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:  # ENXIO: nobody at the gate yet
                raise
            time.sleep(0.01)
    try:
        os.write(fd, b"x" * events)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """What a :class:`Recorder` wrote (for the test side)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
