"""authd against the raw PAM loop on the same cores, and failure-delay isolation.

    python -m benchmarks.bench_auth [--clients N] [--seconds S] [--workers W] [--stack unix|matrix]

Four phases of S seconds each, every one bounded by its own deadline:

1. raw PAM loop: W processes call ``authd.pam.binding.authenticate`` back to back;
2. authd, ``open_session = false``: the real daemon (W workers) under N asyncio clients, one
   connection, user and rhost each, run from this process (not the daemon's); ratio to (1);
3. the same with ``open_session = true`` (a session written to SQLite per login);
4. (2) again while 10 more clients send wrong passwords for an existing user: good-login p99
   against (2)'s. The service's own ``failure_delay`` is 0, so the wait is the one PAM asks for
   (pam_unix's 2 s); lockout exempts that user so every attempt really reaches PAM.

Each phase also says how much CPU the box spent on this benchmark's processes and on
everything else: on a shared machine the second number tells whether a figure can be trusted,
and the ratio "per CPU-second" (logins per core-second of our processes, authd over raw) is the
one that neighbours cannot skew.
It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from authd.client import AsyncClient, ReplyError

from .harness import (
    NOISY,
    AuthdProcess,
    CpuMeter,
    cpu_note,
    ms,
    percentile,
    policy,
    report_errors,
    scratch_dir,
)
from .pamstack import PamStack, raw_loop

INTRUDER = "intruder"
WRONG_PASSWORD = "not-the-password"
WRONG_CLIENTS = 10
SERVICE = "bench"
GRACE = 30.0  # how long past its window a phase may take to wind down before it is cut off
STAGGER = 2.0  # wrong-password clients start spread over one failure delay


def good_users(count: int) -> dict[str, str]:
    return {f"bench{i}": f"bench-pass-{i}" for i in range(1, count + 1)}


def rhost(client: int) -> str:
    """A distinct remote host per client (TEST-NET-1: only ever a string handed to PAM)."""
    return f"192.0.2.{client % 254 + 1}"


@dataclass
class LoadResult:
    """Good logins completed inside the window, their latencies, and the wrong-password side."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wrong_waits: list[float] = field(default_factory=list)
    daemon_cpu: float = 0.0
    client_cpu: float = 0.0
    cores: tuple[float, float] = (0.0, 0.0)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def per_auth(self, cpu: float) -> float:
        return cpu / max(1, len(self.latencies) + len(self.wrong_waits))


class Authd(AuthdProcess):
    """The real daemon with the stack's environment and W workers; a context manager."""

    def __init__(self, root: Path, stack: PamStack, workers: int) -> None:
        super().__init__(root, stack.subprocess_env(), grace=GRACE)
        self.config.write_text(policy(
            socket=self.socket, workers=workers, service=SERVICE, pam_service=stack.service, exempt_users=[INTRUDER],
        ))


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def load(
    authd: Authd, users: dict[str, str], clients: int, seconds: float, *, open_session: bool,
    wrong_clients: int = 0,
) -> LoadResult:
    """``clients`` good clients (client i logs in as user i mod len(users)), and optionally
    wrong-password ones, against authd for ``seconds``."""
    result = LoadResult(seconds=seconds)
    ready = asyncio.Barrier(clients + wrong_clients + 1)
    go = asyncio.Event()
    accounts = list(users.items())
    clock = time.perf_counter
    deadline = 0.0

    async def good(i: int) -> None:
        user, password = accounts[i % len(accounts)]
        host = rhost(i)
        async with AsyncClient(authd.socket) as client:
            await client.auth(user, password, SERVICE, rhost=host, open_session=open_session)  # warm-up
            await ready.wait()
            await go.wait()
            while (started := clock()) < deadline:
                try:
                    await client.auth(user, password, SERVICE, rhost=host, open_session=open_session)
                except ReplyError as exc:
                    result.errors[exc.code] += 1
                    continue
                if (done := clock()) <= deadline:
                    result.latencies.append(done - started)

    async def wrong(i: int) -> None:
        async with AsyncClient(authd.socket) as client:
            await ready.wait()
            await go.wait()
            await asyncio.sleep(i * STAGGER / max(1, wrong_clients))  # steady hammering, not one burst
            while (started := clock()) < deadline:
                try:
                    await client.auth(INTRUDER, WRONG_PASSWORD, SERVICE, open_session=open_session)
                    result.errors["wrong password accepted"] += 1
                except ReplyError as exc:
                    if exc.code != "auth_failed":
                        result.errors[f"wrong password: {exc.code}"] += 1
                result.wrong_waits.append(clock() - started)

    goods = [asyncio.create_task(good(i)) for i in range(clients)]
    wrongs = [asyncio.create_task(wrong(i)) for i in range(wrong_clients)]
    gate = asyncio.create_task(ready.wait())
    await asyncio.wait([gate, *goods, *wrongs], timeout=GRACE, return_when=asyncio.FIRST_COMPLETED)
    if not gate.done():  # a client failed its warm-up (or never connected): say why, stop all
        failed = [t.exception() for t in [*goods, *wrongs] if t.done() and not t.cancelled()]
        for task in [gate, *goods, *wrongs]:
            task.cancel()
        await asyncio.gather(gate, *goods, *wrongs, return_exceptions=True)
        raise RuntimeError(f"clients did not start: {failed[0]!r}" if failed else "clients did not start in time")
    meter = CpuMeter()
    daemon_before, client_before = authd.cpu_seconds(), _own_cpu()
    deadline = clock() + seconds
    go.set()
    done, pending = await asyncio.wait(goods, timeout=seconds + GRACE)
    result.daemon_cpu = authd.cpu_seconds() - daemon_before
    result.client_cpu = _own_cpu() - client_before
    result.cores = meter.cores()
    for task in [*pending, *wrongs]:  # a wrong-password client may be mid-delay: that wait is not ours
        task.cancel()
    await asyncio.gather(*pending, *wrongs, return_exceptions=True)
    for task in done:
        if (exc := task.exception()) is not None:
            result.errors[f"client: {exc!r}"] += 1
    if pending:
        result.errors["client still waiting after the window"] += len(pending)
    return result


def efficiency(rate: float, cores: tuple[float, float]) -> float:
    """Logins per core-second of our own processes: what neighbours on the box cannot skew."""
    return rate / max(cores[0], 1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_auth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent good-login clients (default 16)")
    parser.add_argument("--users", type=int, default=0, help="distinct good users the clients log in as (default: one per client)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="PAM workers = raw-loop processes (default: CPUs)")
    parser.add_argument("--stack", choices=["unix", "matrix"], default="unix", help="PAM stack (default: pam_unix + yescrypt)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (daemon log, stack files)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.workers < 1 or args.users < 0 or args.seconds <= 0:
        parser.error("--clients and --workers must be >= 1, --users >= 0 and --seconds > 0")
    users = good_users(args.users or args.clients)

    noisy = False
    with scratch_dir("authd-bench-", keep=args.keep) as root:
        stack = PamStack.create(root / "pam", {**users, INTRUDER: "intruder-pass"}, kind=args.stack)
        print(
            f"stack: {stack.description}, workers={args.workers}, clients={args.clients}"
            f" ({len(users)} users), {args.seconds:g} s",
            flush=True,
        )
        user, password = next(iter(users.items()))
        meter = CpuMeter()
        raw = raw_loop(
            stack, user, password, processes=args.workers, seconds=args.seconds, rhost=rhost(0), on_go=meter.restart,
        )
        cores = meter.cores()
        noisy |= cores[1] > NOISY
        print(
            f"raw PAM loop:   {raw.rate:7.1f} auth/s  p50 {ms(percentile(raw.latencies, 50))} per call"
            f"   ({cpu_note(cores)})",
            flush=True,
        )
        if raw.failures:
            print(f"  !! {raw.failures} raw-loop logins failed")

        with Authd(root, stack, args.workers) as authd:
            phases = {}
            for name, open_session in (("authd:", False), ("authd+session:", True)):
                r = phases[open_session] = asyncio.run(load(authd, users, args.clients, args.seconds, open_session=open_session))
                noisy |= r.cores[1] > NOISY
                print(
                    f"{name:<15} {r.rate:7.1f} auth/s  p50 {ms(percentile(r.latencies, 50))}"
                    f"  p99 {ms(percentile(r.latencies, 99))}   ratio {r.rate / raw.rate:.2f}x"
                    f"  (per CPU-second: {efficiency(r.rate, r.cores) / efficiency(raw.rate, cores):.2f}x)",
                    flush=True,
                )
                print(
                    f"  (open_session={str(open_session).lower()}; per auth: daemon {ms(r.per_auth(r.daemon_cpu))},"
                    f" client {ms(r.per_auth(r.client_cpu))} CPU; {cpu_note(r.cores)})"
                )
                report_errors(r.errors)
            alone = phases[False]
            hammered = asyncio.run(load(authd, users, args.clients, args.seconds, open_session=False, wrong_clients=WRONG_CLIENTS))
        noisy |= hammered.cores[1] > NOISY
        p99_alone, p99_hammered = percentile(alone.latencies, 99), percentile(hammered.latencies, 99)
        delay = "2 s delay" if args.stack == "unix" else "2 s pam_faildelay"
        print(
            f"good p99 alone: {ms(p99_alone)}; with {WRONG_CLIENTS} wrong-password clients ({delay}):"
            f" {ms(p99_hammered)}  ratio {p99_hammered / p99_alone:.2f}x"
        )
        print(
            f"  (good logins {hammered.rate:.1f} auth/s, p50 {ms(percentile(hammered.latencies, 50))};"
            f" {len(hammered.wrong_waits)} wrong-password replies, p50 wait {percentile(hammered.wrong_waits, 50):.2f} s;"
            f" {cpu_note(hammered.cores)})"
        )
        report_errors(hammered.errors)
        if noisy:
            print(f"note: other processes used more than {NOISY} cores during some phase; those figures are noisy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
