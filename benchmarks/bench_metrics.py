"""What a Prometheus scrape costs, and what scraping costs a login, against the real daemon.

    python -m benchmarks.bench_metrics [--seconds S] [--sessions N] [--failures F] [--rate HZ] [--stack matrix|unix]

First the daemon is given state for a scrape to read: N sessions (default 10000), and F failed
logins (default 20000), each from its own made-up user and rhost, so that the lockout table
holds 2F keys (a scrape counts them in one pass). Then:

1. scrape: one scraper fetches `GET /metrics` over loopback TCP back to back for S seconds
   (default 10); its p50 and p99, the body size, and the daemon's CPU per scrape;
2. quiet: one client logs in back to back (`open_session = false`) for S seconds; its p50/p99;
3. the same while a scraper fetches `--rate` scrapes a second (default 10: 150 times
   Prometheus' usual one per 15 s): login p99 over the quiet p99.

Scrapers run in a child process, so they share no interpreter lock with the login client.

Prints figures and asserts nothing. CPU shares as in the other benchmarks (harness.CpuMeter).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from authd.client import AsyncClient, Client, ReplyError

from .harness import (
    NOISY, AuthdProcess, CpuMeter, cpu_note, ms, overhead_parser, percentile, policy, report_errors, scratch_dir,
)
from .pamstack import REPO, PamStack

SERVICE = "bench"
USER, PASSWORD = "bench1", "bench-pass-1"
GRACE = 30.0
REQUEST = b"GET /metrics HTTP/1.1\r\nHost: authd\r\n\r\n"


class Authd(AuthdProcess):
    def __init__(self, root: Path, stack: PamStack, workers: int) -> None:
        super().__init__(root, stack.subprocess_env(), grace=GRACE)
        metrics = '[metrics]\nlisten = "127.0.0.1:0"\n'
        self.config.write_text(policy(socket=self.socket, workers=workers, service=SERVICE, pam_service=stack.service,
                                      log_level="info", service_extra=f"\n{metrics}"))

    def lockout_keys(self) -> int:
        with Client(self.socket, timeout=GRACE) as client:
            return int(client.status()["lockout"]["tracked"])

    def metrics_port(self) -> int:
        for text in self.log.read_text().splitlines():
            if "metrics listening" in text:
                return int(json.loads(text)["address"].rsplit(":", 1)[1])
        raise RuntimeError(f"no `metrics listening` line:\n{self.tail()}")


async def populate(authd: Authd, sessions: int, failures: int) -> None:
    """`sessions` open sessions, and one failed login from each of `failures` made-up users, each
    from its own rhost (a user key and an rhost key each). A failure waits out pam_faildelay's
    2 s, so they go 32 at a time on each of 64 connections."""

    async def opener(count: int) -> None:
        async with AsyncClient(authd.socket) as c:
            for _ in range(count):
                await c.auth(USER, PASSWORD, SERVICE)

    async def failer(names: range) -> None:
        async with AsyncClient(authd.socket) as c:
            for start in range(0, len(names), 32):
                await asyncio.gather(*(fail(c, i) for i in names[start:start + 32]))

    async def fail(c: AsyncClient, i: int) -> None:
        rhost = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        try:
            await c.auth(f"ghost{i}", "wrong", SERVICE, rhost=rhost, open_session=False)
        except ReplyError:
            pass

    await asyncio.gather(*(opener(sessions // 8 + (i < sessions % 8)) for i in range(8)),
                         *(failer(range(failures)[i::64]) for i in range(64)))


def scrape_once(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=GRACE) as sock:
        sock.sendall(REQUEST)
        size = 0
        while chunk := sock.recv(65536):
            size += len(chunk)
    return size


class Scraper:
    """A child process scraping at `rate` per second (0: back to back) until stopped, so that
    it shares no interpreter lock with the login client; a context manager."""

    def __init__(self, port: int, rate: float) -> None:
        self.args = [sys.executable, "-m", "benchmarks.bench_metrics", "scrape", str(port), str(rate)]
        self.latencies: list[float] = []
        self.size = 0

    def __enter__(self) -> Scraper:
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self.proc.communicate(timeout=GRACE)
        result = json.loads(out)
        self.latencies, self.size = result["latencies"], result["size"]


def scrape_child(port: int, rate: float) -> int:
    """The scraper (a separate process): scrape until stdin closes; print latencies and body size."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    latencies, size = [], 0
    while not stop.is_set():
        started = time.perf_counter()
        size = scrape_once(port)
        latencies.append(time.perf_counter() - started)
        if rate:
            stop.wait(max(0.0, started + 1 / rate - time.perf_counter()))
    print(json.dumps({"latencies": latencies, "size": size}))
    return 0


async def logins(authd: Authd, seconds: float) -> tuple[list[float], Counter[str]]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    async with AsyncClient(authd.socket) as client:
        await client.auth(USER, PASSWORD, SERVICE, open_session=False)  # warm-up
        deadline = time.perf_counter() + seconds
        while (started := time.perf_counter()) < deadline:
            try:
                await client.auth(USER, PASSWORD, SERVICE, open_session=False)
            except ReplyError as exc:
                errors[exc.code] += 1
                continue
            latencies.append(time.perf_counter() - started)
    return latencies, errors


def line(name: str, latencies: list[float], cores: tuple[float, float], extra: str = "") -> None:
    print(f"  {name:<22} {len(latencies):>7}  p50 {ms(percentile(latencies, 50)):>9}  p99 {ms(percentile(latencies, 99)):>9}"
          f"  {cpu_note(cores)}{extra}")
    if cores[1] > NOISY:
        print(f"    (other processes used {cores[1]:.2f} cores: this line's figures are suspect)")


def main(argv: list[str] | None = None) -> int:
    parser = overhead_parser("bench_metrics", __doc__, seconds=10.0)
    parser.add_argument("--sessions", type=int, default=10000, help="sessions open while scraping (default 10000)")
    parser.add_argument("--failures", type=int, default=20000, help="users (and rhosts) with a failure each (default 20000)")
    parser.add_argument("--rate", type=float, default=10.0, help="scrapes per second beside the logins of phase 3 (default 10)")
    args = parser.parse_args(argv)

    with scratch_dir("authd-bench-metrics-", keep=args.keep) as root:
        stack = PamStack.create(root / "pam", {USER: PASSWORD}, kind=args.stack)
        print(f"authd metrics benchmark: {stack.description}; {args.workers} workers; {args.seconds:g} s per phase; "
              f"{os.cpu_count()} CPUs")
        with Authd(root, stack, args.workers) as authd:
            asyncio.run(populate(authd, args.sessions, args.failures))
            keys = authd.lockout_keys()
            port = authd.metrics_port()
            print(f"state: {args.sessions} sessions, {keys} lockout keys")

            meter, cpu = CpuMeter(), authd.cpu_seconds()
            with Scraper(port, rate=0) as scraper:
                time.sleep(args.seconds)
            per_scrape = (authd.cpu_seconds() - cpu) / max(1, len(scraper.latencies))
            line("scrapes, back to back", scraper.latencies, meter.cores(),
                 f"  body {scraper.size / 1024:.1f} KiB, daemon CPU {ms(per_scrape)} per scrape")

            meter = CpuMeter()
            quiet, errors = asyncio.run(logins(authd, args.seconds))
            line("logins, quiet", quiet, meter.cores())
            report_errors(errors)

            meter = CpuMeter()
            with Scraper(port, rate=args.rate) as scraper:
                busy, errors = asyncio.run(logins(authd, args.seconds))
            line(f"logins, {args.rate:g} scrapes/s", busy, meter.cores(), f"  ({len(scraper.latencies)} scrapes beside them)")
            report_errors(errors)
            print(f"login p99 while scraping over quiet p99: {percentile(busy, 99) / percentile(quiet, 99):.2f}x")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["scrape"]:
        sys.exit(scrape_child(int(sys.argv[2]), float(sys.argv[3])))
    sys.exit(main())
