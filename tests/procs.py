"""What the kernel says about a process: its children, and the signals it ignores."""

from __future__ import annotations

import signal
from pathlib import Path


def children(pid: int) -> list[int]:
    """The live children of `pid`, from every one of its threads."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += map(int, (task / "children").read_text().split())
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return found


def ignored_signals(pid: int) -> set[signal.Signals]:
    """The signals `pid` has set to SIG_IGN: the kernel discards them as they are sent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {signal.Signals(n) for n in range(1, signal.NSIG) if mask >> (n - 1) & 1 and n in signal.valid_signals()}
    raise AssertionError(f"no SigIgn line for {pid}")
