"""Fleet lockout: is the limit exact across two hosts, and how many reserve+finish pairs per second?

    python -m benchmarks.bench_fleet_lockout [--guesses N] [--runs N] [--max-failures N] [--pairs N]

Starts a private redis-server on a Unix socket (as the tests do) and two "hosts" in this
process, each with its own connection pool and fallback engine, as two daemons have. Each run
sends `--guesses` concurrent distinct wrong passwords for one user, split over both hosts; an
admitted guess spends 2 ms "in PAM" and fails. It prints, per run, how many reached PAM
against `max_failures` (exact means equal), then the rate of reserve+finish pairs (distinct
users, successful logins, 64 concurrent over both hosts) and, for scale, the same pairs on one
host's local engine. In-process: the socket protocol's and PAM's own costs are not included.
It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

import msgspec
import structlog

from authd.lockout import Attempt, Lockout, LockoutConfig
from authd.stores import LockoutStore
from authd.stores.config import StoreConfig
from authd.stores.local import LocalLockout
from authd.stores.redis.link import Link
from authd.stores.redis.lockout import FleetLockout
from tests.fleet.redisserver import RedisServer

PAM_TIME = 0.002
CONCURRENCY = 64


def config(max_failures: int) -> LockoutConfig:
    return msgspec.convert({"user": {"max_failures": max_failures}, "rhost": {"max_failures": 0}}, LockoutConfig)


async def guess(lockout: LockoutStore, user: str, password: str, reached: list[str]) -> None:
    attempt = await lockout.begin(user, None, password)
    if isinstance(attempt, Attempt):
        reached.append(password)
        await asyncio.sleep(PAM_TIME)
        await lockout.finish(attempt, success=False)


async def pairs(hosts: list[LockoutStore], count: int) -> float:
    async def worker(offset: int) -> None:
        for i in range(offset, count, CONCURRENCY):
            attempt = await hosts[i % len(hosts)].begin(f"pair{i}", None, "right")
            assert isinstance(attempt, Attempt)
            await hosts[i % len(hosts)].finish(attempt, success=True)

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
    return count / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    server = RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    secret = os.urandom(32)
    cfg = config(args.max_failures)
    try:
        hosts = []
        for name in ("a", "b"):
            store = StoreConfig(backend="redis", url=server.url, prefix="bench:", timeout=5.0)
            hosts.append(FleetLockout(Link(store), store, cfg, secret, Lockout(cfg, tmp / f"{name}.db")))
        print(f"{args.guesses} concurrent distinct wrong guesses per run over two hosts, max_failures = {args.max_failures}")
        counts = []
        for run in range(args.runs):
            reached: list[str] = []
            await asyncio.gather(*(guess(hosts[i % 2], f"victim{run}", f"wrong-{i}", reached) for i in range(args.guesses)))
            counts.append(len(reached))
            print(f"  run {run + 1}: {len(reached)} reached PAM ({'exact' if len(reached) == args.max_failures else 'NOT exact'})")
        print(f"  {sum(c == args.max_failures for c in counts)}/{args.runs} runs exact")
        fleet = await pairs(hosts, args.pairs)
        local = LocalLockout(Lockout(cfg, tmp / "local.db"))
        alone = await pairs([local], args.pairs)
        print(f"reserve+finish pairs, {CONCURRENCY} concurrent: redis over two hosts {fleet:,.0f}/s;"
              f" one host's local engine {alone:,.0f}/s (x{fleet / alone:.2f})")
        for host in hosts:
            await host.close()
        await local.close()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guesses", type=int, default=100)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-failures", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=5_000)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main(parser.parse_args()))
