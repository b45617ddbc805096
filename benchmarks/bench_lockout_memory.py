"""Memory per tracked lockout key and per session, measured with tracemalloc.

    python -m benchmarks.bench_lockout_memory [--keys N] [--ipv6] [--sessions N]

A flood of distinct user names, each failing once, is what fills the lockout table: every
name becomes a key that is kept for the scope's `interval`. This drives the real engine (a
manual clock, a real SQLite file) with N such failures and prints the Python heap it holds
per key (SQLite's own page cache is outside tracemalloc and bounded by SQLite). `--ipv6`
does the same through the rhost scope, one IPv6 address per failure. `--sessions N` also
prints the heap per issued session of the session store. It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import tempfile
import tracemalloc
from pathlib import Path

import structlog

from authd.lockout import Attempt, Lockout, load_config
from authd.sessions import SessionStore


async def per_key(n: int, ipv6: bool) -> tuple[float, int]:
    """Heap bytes per key after n one-failure keys, and how many keys the engine lists."""
    table: dict[str, object] = {"user": {"max_failures": 0}} if ipv6 else {"rhost": {"max_failures": 0}}
    table["max_keys"] = n
    now = [1_000_000.0]  # a manual clock: failures 1 ms apart, all within `interval`
    with tempfile.TemporaryDirectory() as tmp:
        lockout = Lockout(load_config(table), Path(tmp) / "lockout.db", clock=lambda: now[0])
        base = int(ipaddress.IPv6Address("2001:db8::"))
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            now[0] += 0.001
            rhost = str(ipaddress.IPv6Address(base + (i << 64))) if ipv6 else None
            attempt = await lockout.begin(f"flood-{i:08d}", rhost, "wrong")
            assert isinstance(attempt, Attempt)
            lockout.finish(attempt, False)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        tracked = len(lockout.lockouts())
        lockout.close()
    return (after - before) / n, tracked


def per_session(n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = SessionStore(Path(tmp) / "sessions.db")
        store.open()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            store.create(user=f"user-{i % 100}", groups=("users",), service="login", rhost="192.0.2.1",
                         ttl=3600.0, idle_timeout=600.0)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        store.close()
    return (after - before) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--ipv6", action="store_true", help="distinct IPv6 /64s in the rhost scope")
    parser.add_argument("--sessions", type=int, default=0)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    scope = "rhost (one IPv6 /64 each)" if args.ipv6 else "user"
    size, tracked = asyncio.run(per_key(args.keys, args.ipv6))
    print(f"lockout, {args.keys:,} one-failure keys in the {scope} scope:")
    print(f"  heap per key       {size:>10,.0f} bytes")
    print(f"  keys tracked       {tracked:>10,}")
    print(f"  at max_keys 100000 {size * 1e5 / 2**20:>10,.1f} MiB")
    if args.sessions:
        print(f"sessions, {args.sessions:,} issued:")
        print(f"  heap per session   {per_session(args.sessions):>10,.0f} bytes")


if __name__ == "__main__":
    main()
