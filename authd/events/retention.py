"""How long the event log keeps events: by age and by count, whether delivered or not."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

PRUNE_EVERY = 5.0  # seconds between retention passes


@dataclass(frozen=True)
class Retention:
    max_age: float = 7 * 86400.0  # events older than this are pruned, delivered or not
    max_events: int = 1_000_000  # and the oldest beyond this many

    def prune(self, db: sqlite3.Connection, now: float, cursors: Iterable[int]) -> int:
        """Delete what is past retention (an event that is a dead letter stays while the letter
        does), in one transaction; the number of deleted events some handler had not delivered
        (its cursor before them)."""
        with db:
            (count,) = db.execute("SELECT count(*) FROM events").fetchone()
            (cutoff,) = db.execute("SELECT coalesce(max(seq), 0) FROM events WHERE time < ?",
                                   (now - self.max_age,)).fetchone()
            if count > self.max_events:
                (nth,) = db.execute("SELECT seq FROM events ORDER BY seq LIMIT 1 OFFSET ?",
                                    (count - self.max_events - 1,)).fetchone()
                cutoff = max(cutoff, nth)
            if not cutoff:
                return 0
            slowest = min(cursors, default=cutoff)
            (lost,) = db.execute("SELECT count(*) FROM events WHERE seq > ? AND seq <= ?", (slowest, cutoff)).fetchone()
            db.execute("DELETE FROM events WHERE seq <= ? AND seq NOT IN (SELECT seq FROM dead)", (cutoff,))
            db.execute("DELETE FROM dead WHERE time < ?", (now - self.max_age,))
        return int(lost)
