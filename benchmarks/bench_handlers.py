"""What a slow handler costs a login: auth p99 with a 1 s webhook attached against none.

    python -m benchmarks.bench_handlers [--clients N] [--seconds S] [--rounds R]

One real daemon (pam_wrapper + pam_matrix, set up by ``tests/pamenv.py`` exactly as the tests
do) serves N asyncio clients, each logging in as its own user with a session, back to back.
The daemon alternates between two policies, switched by ``authctl reload`` on the same
process so that both see the same workers, caches and machine: ``none`` (no handler) and
``webhook`` (one webhook handler, every event, POSTing to a real HTTP server on 127.0.0.1
that takes 1 s to answer each request, so its queue fills and then drops). R rounds of S
seconds per policy, interleaved, and the latencies of each policy pooled; the figure that
matters is p99(webhook) - p99(none) (target: <= 1 ms), printed pooled and as the median of
the per-round differences, which a single noisy round cannot swing. Machine noise moves both
alike, which is why the rounds alternate; each round's p99 and the CPU other processes used
during it are printed too, so the spread is visible.

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from authd.client import AsyncClient, Client, ReplyError
from tests.pamenv import PamEnv

from .harness import (
    AuthdProcess,
    CpuMeter,
    SlowReceiver,
    cpu_note,
    ms,
    percentile,
    policy,
    report_errors,
    scratch_dir,
    slow_http_server,
)
from .pamstack import REPO

SERVICE = "bench"
PAM_SERVICE = "authd-bench"
GRACE = 30.0

WEBHOOK = """
[[handler]]
type = "webhook"
url = "{url}"
retries = 0
timeout = 5
"""


class Authd(AuthdProcess):
    """The real daemon over pam_wrapper; ``use(policy)`` rewrites authd.toml and reloads."""

    def __init__(self, root: Path, users: dict[str, str], workers: int) -> None:
        pam = PamEnv.create(root / "pam")
        pam.add_service(PAM_SERVICE)
        for user, password in users.items():
            pam.add_user(user, password, PAM_SERVICE)
        super().__init__(root, {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **pam.env()}, grace=GRACE)
        self.base = policy(socket=self.socket, workers=workers, service=SERVICE, pam_service=PAM_SERVICE,
                           daemon="drain_timeout = 5.0\n")
        self.config.write_text(self.base)

    def use(self, extra: str) -> None:
        self.config.write_text(self.base + extra)
        with Client(self.socket, timeout=GRACE) as client:
            client.reload()

    def events(self) -> dict[str, Any]:
        with Client(self.socket, timeout=GRACE) as client:
            return client.status()["events"]


async def load(socket: Path, users: dict[str, str], seconds: float, rate: float) -> tuple[list[float], Counter[str]]:
    """Every user logs in (with a session) on its own connection for ``seconds``: paced so that
    all together send ``rate`` logins per second, or back to back with ``rate = 0``."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    interval = len(users) / rate if rate else 0.0

    async def client(i: int, user: str, password: str) -> None:
        due = start + interval * i / len(users)  # spread the clients over one interval
        async with AsyncClient(socket) as c:
            while (started := clock()) < deadline:
                if started < due:
                    await asyncio.sleep(due - started)
                    continue
                due += interval
                try:
                    await c.auth(user, password, SERVICE)
                except ReplyError as exc:
                    errors[exc.code] += 1
                    continue
                if (done := clock()) <= deadline:
                    latencies.append(done - started)

    async with asyncio.timeout(seconds + GRACE):
        await asyncio.gather(*(client(i, u, p) for i, (u, p) in enumerate(users.items())))
    return latencies, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_handlers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, one user each (default 8)")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="logins per second, all clients together; 0 = as fast as they can (default 200)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one round (default 3)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per policy, interleaved (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="PAM workers (default 2)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.workers < 1 or args.seconds <= 0 or args.rate < 0:
        parser.error("--clients, --rounds and --workers must be >= 1, --seconds > 0 and --rate >= 0")
    users = {f"bench{i}": f"bench-pass-{i}" for i in range(1, args.clients + 1)}

    with scratch_dir("authd-bh-") as root, slow_http_server() as url, Authd(root, users, args.workers) as authd:
        print(
            f"pam_matrix via pam_wrapper, workers={args.workers}, clients={args.clients},"
            f" rate={f'{args.rate:g}/s' if args.rate else 'max'}, {args.rounds} x {args.seconds:g} s per policy,"
            " open_session=true",
            flush=True,
        )
        policies = {"none": "", "webhook": WEBHOOK.format(url=url)}
        pooled: dict[str, list[float]] = {name: [] for name in policies}
        p99s: dict[str, list[float]] = {name: [] for name in policies}
        errors: Counter[str] = Counter()
        asyncio.run(load(authd.socket, users, 1.0, args.rate))  # warm-up: workers, SQLite, imports
        for round_no in range(1, args.rounds + 1):
            for name, extra in policies.items():
                authd.use(extra)
                meter = CpuMeter()
                latencies, errs = asyncio.run(load(authd.socket, users, args.seconds, args.rate))
                pooled[name] += latencies
                p99s[name].append(percentile(latencies, 99))
                errors.update(errs)
                print(
                    f"  round {round_no} {name:<8} {len(latencies) / args.seconds:7.0f} auth/s"
                    f"  p50 {ms(percentile(latencies, 50))}  p99 {ms(percentile(latencies, 99))}"
                    f"   ({cpu_note(meter.cores())})",
                    flush=True,
                )
                if name == "webhook":
                    webhook = authd.events()["handlers"]["webhook"]
                    print(f"    webhook handler: {webhook}")
        print("pooled:")
        for name, latencies in pooled.items():
            print(
                f"  {name:<8} n={len(latencies):<7} p50 {ms(percentile(latencies, 50))}"
                f"  p99 {ms(percentile(latencies, 99))}  p99.9 {ms(percentile(latencies, 99.9))}"
            )
        added = percentile(pooled["webhook"], 99) - percentile(pooled["none"], 99)
        paired = sorted(w - n for w, n in zip(p99s["webhook"], p99s["none"]))
        print(f"p99 added by a 1 s webhook handler: {added * 1000:+.2f} ms pooled,"
              f" {statistics.median(paired) * 1000:+.2f} ms median of the rounds' differences"
              f" (range {paired[0] * 1000:+.1f} .. {paired[-1] * 1000:+.1f} ms); target <= 1 ms")
        print(f"requests the slow receiver answered: {SlowReceiver.seen}")
        report_errors(errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
