"""What the event log's writer spends per event, by the shape of event ids and the log's size.

    python -m benchmarks.bench_eventlog [--rows N] [--events E] [--batch B] [--rounds R]

The real `Outbox` (its writer thread, its SQLite file in WAL mode) on a log already holding N
events (default 1,000,000: the default `max_events` retention), fed E more in batches of B
(what B requests answered in one turn of the event loop emit), each batch waited for as a
request waits before its reply. Two kinds of id, in alternating rounds: random (UUIDv4,
what authd used before) and time-ordered (UUIDv7, `Event.create` now). The log has an index
on `id` (for `subscribe` from an id): a random id lands on a random page of that index, a
time-ordered one at its end. Printed: the writer thread's CPU per event and the bytes it
wrote per event (WAL frames and checkpoints: what the disk will get), medians over the rounds. It prints
figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import time
import uuid
from pathlib import Path

from authd.events.model import AUTH_SUCCEEDED, Event, time_ordered_id
from authd.events.outbox import _SCHEMA, Outbox
from authd.events.retention import Retention

from .harness import scratch_dir

KINDS = {"random (UUIDv4)": lambda now: uuid.uuid4().hex, "time-ordered (UUIDv7)": time_ordered_id}
FIELDS = {"user": "alice", "service": "imap", "rhost": "192.0.2.17", "pid": 4242, "uid": 8, "gid": 8,
          "latency": 0.00021, "generation": 1, "protocol": "saslauthd", "cached": True}


def prefill(path: Path, rows: int, make_id: object) -> None:
    """A log of `rows` events, as a daemon that ran a while leaves it (ids of the same kind)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_SCHEMA)
    start = time.time() - rows / 100
    body = Event(name=AUTH_SUCCEEDED, id="0" * 32, time=start, **FIELDS).to_json()  # type: ignore[arg-type]
    with db:
        db.execute("BEGIN")
        db.executemany("INSERT INTO events (seq, id, time, body) VALUES (?, ?, ?, ?)",
                       ((seq, make_id(start + seq / 100), start + seq / 100, body) for seq in range(1, rows + 1)))  # type: ignore[operator]
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def thread_usage(native_id: int) -> tuple[float, int]:
    """A thread's CPU seconds and the bytes it has handed to write(2) and friends."""
    task = Path(f"/proc/self/task/{native_id}")
    fields = (task / "stat").read_text().rpartition(")")[2].split()
    io = dict(line.split(": ") for line in (task / "io").read_text().splitlines())
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(io["wchar"])


async def feed(path: Path, events: int, batch: int, make_id: object) -> tuple[float, float]:
    """(writer CPU seconds, bytes written) per event, for `events` appended `batch` at a time."""
    outbox = Outbox(path, Retention(max_age=1e9, max_events=10**9))
    outbox.start(asyncio.get_running_loop())
    assert outbox._thread is not None and outbox._thread.native_id is not None
    cpu, written = thread_usage(outbox._thread.native_id)
    for _ in range(events // batch):
        for _ in range(batch):
            now = time.time()
            outbox.append(Event(name=AUTH_SUCCEEDED, id=make_id(now), time=now, **FIELDS))  # type: ignore[arg-type, operator]
        await outbox.durable()
    cpu_after, written_after = thread_usage(outbox._thread.native_id)
    await outbox.close()
    done = events // batch * batch
    return (cpu_after - cpu) / done, (written_after - written) / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    with scratch_dir("authd-eventlog-") as root:
        logs = {kind: root / f"{kind.split()[0]}.db" for kind in KINDS}
        for kind, make_id in KINDS.items():
            prefill(logs[kind], args.rows, make_id)
        for number in range(args.rounds):
            for kind, make_id in (list(KINDS.items()) if number % 2 == 0 else list(KINDS.items())[::-1]):
                # the same log each round: it keeps growing, as in service
                results[kind].append(asyncio.run(feed(logs[kind], args.events, args.batch, make_id)))
    print(f"event log of {args.rows:,} events, {args.events:,} more per round in batches of {args.batch}, "
          f"median of {args.rounds} rounds")
    for kind, rounds in results.items():
        cpu = statistics.median(r[0] for r in rounds)
        written = statistics.median(r[1] for r in rounds)
        print(f"  {kind:<22} writer CPU {cpu * 1e6:6.1f} us/event   written {written / 1024:5.1f} KiB/event")


if __name__ == "__main__":
    main()
