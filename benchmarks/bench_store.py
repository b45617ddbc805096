"""Session checks per second and p99 through the store interface: SQLite, Redis, Redis + near-cache.

    python -m benchmarks.bench_store [--checks N] [--tokens N] [--concurrency N]

Starts a private redis-server on a Unix socket (as the tests do), issues `--tokens` sessions in
each store, then runs `--checks` lookups (with touch, as the `session` op does) from
`--concurrency` tasks in one process, and prints checks/s and p50/p99 latency for each, with
the ratio to SQLite. Then as many reads of the fleet's credential-cache mark
(`FleetCacheDrops.mark`, the round trip every login that may use the cache makes first on a
fleet). In-process: the socket protocol's own cost is not included. It prints figures and
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from authd.sessions import SessionStore as SessionTable
from authd.stores import SessionStore
from authd.stores.config import StoreConfig
from authd.stores.local import LocalSessions
from authd.stores.redis.cachedrops import FleetCacheDrops
from authd.stores.redis.link import Link
from authd.stores.redis.sessions import RedisSessions
from tests.fleet.redisserver import RedisServer


async def measure(store: SessionStore, tokens: int, checks: int, concurrency: int) -> tuple[float, float, float]:
    issued = [(await store.create(user=f"u{i}", groups=["staff"], service="login", rhost=None, ttl=3600.0,
                                  idle_timeout=600.0))[1] for i in range(tokens)]

    async def check() -> None:
        assert await store.lookup(random.choice(issued)) is not None

    return await timed(check, checks, concurrency)


async def timed(call: Callable[[], Awaitable[None]], checks: int, concurrency: int) -> tuple[float, float, float]:
    """`checks` calls from `concurrency` tasks: calls/s, p50 and p99 in µs."""
    latencies: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(checks // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return len(latencies) / elapsed, latencies[len(latencies) // 2] * 1e6, latencies[int(len(latencies) * 0.99)] * 1e6


async def main(args: argparse.Namespace) -> None:
    server = RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        local = LocalSessions(SessionTable(tmp / "sessions.db"))
        await local.start()
        stores: list[tuple[str, SessionStore]] = [("sqlite (memory + write-through)", local)]
        for name, near in (("redis", 0.0), ("redis + near_cache 1 s", 1.0)):
            link = Link(StoreConfig(backend="redis", url=server.url, prefix=f"b{near}:", timeout=5.0))
            stores.append((name, RedisSessions(link, near_cache=near)))
        print(f"{args.checks:,} session checks over {args.tokens:,} sessions, {args.concurrency} concurrent tasks")
        baseline = None
        for name, store in stores:
            rate, p50, p99 = await measure(store, args.tokens, args.checks, args.concurrency)
            baseline = baseline or rate
            print(f"  {name:<32} {rate:>9,.0f} checks/s  p50 {p50:>7.0f} us  p99 {p99:>7.0f} us  x{rate / baseline:.2f}")
            await store.close()
        link = Link(StoreConfig(backend="redis", url=server.url, prefix="bcd:", timeout=5.0))
        drops = FleetCacheDrops(link)

        async def mark() -> None:
            await drops.mark(f"u{random.randrange(args.tokens)}")

        rate, p50, p99 = await timed(mark, args.checks, args.concurrency)
        print(f"  {'fleet credential-cache mark':<32} {rate:>9,.0f} reads/s   p50 {p50:>7.0f} us  p99 {p99:>7.0f} us")
        await link.close()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=20_000)
    parser.add_argument("--tokens", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=16)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main(parser.parse_args()))
