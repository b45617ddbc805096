"""A normal client's login latency while authd is being abused, as ratios to a quiet daemon.

    python -m benchmarks.bench_abuse [--seconds S] [--idle N] [--flood C] [--workers W] [--stack matrix|unix]

Three phases of S seconds (default 15, so about a minute in all), against the real daemon:

1. quiet: one client logs in over and over on its own connection (`open_session = false`);
   its p50 and p99 are the baseline;
2. the same while N (default 1000) idle connections are held open: each was accepted (it got
   its `hello` answered) and then says nothing;
3. the same while, on top of those idle connections, a flood runs: a separate process keeps C
   (default 2000) connections cycling (connect, `hello`, close) as fast as it can. The daemon's
   `max_connections` is N + 100, so most of the flood is refused with `busy`.

Printed per phase: logins, p50 and p99, p99 over the quiet p99, the daemon's RSS and open
descriptors; for the flood its connection rate and how much of it was refused; and the cores
used by this benchmark's processes and by everything else (on a shared box, the second
number says whether to trust the first). The daemon's limits are raised to fit N idle
connections, and this process lifts its own descriptor limit. Unix sockets only. It prints
figures and asserts nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from authd.client import AsyncClient, Client, ReplyError

from .harness import (
    NOISY,
    AuthdProcess,
    CpuMeter,
    cpu_note,
    ms,
    overhead_parser,
    percentile,
    policy,
    scratch_dir,
)
from .pamstack import REPO, PamStack

SERVICE = "bench"
USER, PASSWORD = "bench1", "bench-pass-1"
HELLO = b'{"id":1,"op":"hello"}\n'
GRACE = 30.0


@dataclass
class Phase:
    name: str
    latencies: list[float]
    errors: Counter[str]
    cores: tuple[float, float]
    rss: int
    fds: int
    note: str = ""


class Authd(AuthdProcess):
    """The real daemon as a subprocess over the benchmark's PAM stack; a context manager."""

    def __init__(self, root: Path, stack: PamStack, workers: int, max_connections: int) -> None:
        super().__init__(root, stack.subprocess_env(), grace=GRACE)
        limits = (f"\n[daemon.limits]\nmax_connections = {max_connections}\n"
                  f"max_connections_per_uid = {max_connections}\nidle_timeout = 600.0\n")
        self.config.write_text(policy(socket=self.socket, workers=workers, service=SERVICE,
                                      pam_service=stack.service, log_level="warning", daemon=limits))

    def counters(self) -> dict[str, int]:
        with Client(self.socket, timeout=30) as client:
            return client.status()["counters"]


async def normal_client(authd: Authd, seconds: float, start_abuse: Callable[[], None]) -> tuple[list[float], Counter[str]]:
    """One well-behaved client logging in back to back: the latencies it saw.

    It is connected (like a mail server's pooled connection) before `start_abuse` runs.
    """
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    clock = time.perf_counter
    async with AsyncClient(authd.socket) as client:
        await client.auth(USER, PASSWORD, SERVICE, open_session=False)  # warm-up
        start_abuse()
        deadline = clock() + seconds
        while (started := clock()) < deadline:
            try:
                await asyncio.wait_for(client.auth(USER, PASSWORD, SERVICE, open_session=False), GRACE)
            except (ReplyError, TimeoutError) as exc:
                errors[getattr(exc, "code", "timeout")] += 1
                continue
            latencies.append(clock() - started)
    return latencies, errors


def measure(name: str, authd: Authd, seconds: float, note: str = "", start_abuse: Callable[[], None] = lambda: None) -> Phase:
    meter = CpuMeter()

    def start() -> None:
        start_abuse()
        meter.restart()

    latencies, errors = asyncio.run(normal_client(authd, seconds, start))
    return Phase(name, latencies, errors, meter.cores(), authd.rss(), authd.fds(), note)


def hold_idle(authd: Authd, count: int) -> list[socket.socket]:
    """`count` connections, each accepted (its hello answered), then silent."""
    held = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(GRACE)
        sock.connect(str(authd.socket))
        sock.sendall(HELLO)
        reply = sock.recv(4096)
        if b'"ok":true' not in reply:
            raise RuntimeError(f"idle connection {len(held)} was not accepted: {reply!r}")
        held.append(sock)
    return held


def flood_child(path: str, concurrency: int) -> int:
    """The flooder (a separate process): cycle connections until stdin closes; print counts."""
    lift_fd_limit(concurrency + 64)
    counts: Counter[str] = Counter()

    async def cycle(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_unix_connection(path)
            except OSError:
                counts["connect_failed"] += 1
                await asyncio.sleep(0.01)
                continue
            try:
                writer.write(HELLO)
                line = await reader.readline()
                counts["busy" if b'"busy"' in line else "answered" if line else "closed"] += 1
            except OSError:
                counts["cut"] += 1  # refused and closed at once (too many refusals pending), or reset
            finally:
                writer.close()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(sys.stdin.fileno(), stop.set)
        tasks = [asyncio.create_task(cycle(stop)) for _ in range(concurrency)]
        print("flooding", flush=True)
        await stop.wait()
        await asyncio.wait(tasks, timeout=GRACE)
        if pending := [task for task in tasks if not task.done()]:
            counts["still_running"] = len(pending)

    asyncio.run(main())
    print(json.dumps(counts), flush=True)
    return 0


def lift_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            raise RuntimeError(f"need {wanted} descriptors, the hard limit is {hard}: raise it (ulimit -Hn)")


def under_flood(authd: Authd, stack: PamStack, concurrency: int, seconds: float) -> Phase:
    before = authd.counters()
    flooder = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_abuse", "flood", str(authd.socket),
                                str(concurrency)], cwd=REPO, env=stack.subprocess_env(), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert flooder.stdin is not None and flooder.stdout is not None
    started = 0.0

    def start_flood() -> None:
        nonlocal started
        assert flooder.stdout is not None
        if flooder.stdout.readline().strip() != "flooding":
            raise RuntimeError("the flooder did not start")
        time.sleep(1.0)  # let it ramp up
        started = time.monotonic()

    try:
        phase = measure("connection flood", authd, seconds, start_abuse=start_flood)
        window = time.monotonic() - started
        flooder.stdin.close()
        counts = json.loads(flooder.stdout.readline())
        flooder.wait(GRACE)
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()
    after = authd.counters()
    refused = after.get("connections_refused_busy", 0) - before.get("connections_refused_busy", 0)
    total = after.get("connections_total", 0) - before.get("connections_total", 0)
    phase.note = (f"flood of {concurrency} connections on top of the idle ones: {total / (window + 1.0):,.0f} connects/s, "
                  f"{refused / max(1, total):.0%} refused busy; the flooder saw {counts.get('answered', 0):,} answered, "
                  f"{counts.get('busy', 0):,} busy, {counts.get('cut', 0):,} cut, {counts.get('connect_failed', 0):,} "
                  "connects fail")
    return phase


def print_details(phase: Phase) -> None:
    """The lines under a phase's figures: its errors, its note, and a warning if neighbours were busy."""
    if phase.errors:
        print(f"    errors: {dict(phase.errors)}")
    if phase.note:
        print(f"    {phase.note}")
    if phase.cores[1] > NOISY:
        print(f"    (other processes used {phase.cores[1]:.2f} cores: this phase's figures are suspect)")


def report(phases: list[Phase], idle: int) -> None:
    base = percentile(phases[0].latencies, 99)
    print(f"{'phase':<24} {'logins':>7} {'p50':>9} {'p99':>9} {'p99 ratio':>10} {'RSS':>8} {'fds':>6}  cores (ours, others)")
    for phase in phases:
        p99 = percentile(phase.latencies, 99)
        print(f"{phase.name:<24} {len(phase.latencies):>7} {ms(percentile(phase.latencies, 50)):>9} {ms(p99):>9} "
              f"{p99 / base:>9.2f}x {phase.rss / 2**20:>6.1f}Mi {phase.fds:>6}  {cpu_note(phase.cores)}")
        print_details(phase)
    quiet, held = phases[0], phases[1]
    print(f"memory per idle connection: {(held.rss - quiet.rss) / idle / 1024:.1f} KiB")


def main(argv: list[str] | None = None) -> int:
    parser = overhead_parser("bench_abuse", __doc__, seconds=15.0)
    parser.add_argument("--idle", type=int, default=1000, help="idle connections held in phase 2")
    parser.add_argument("--flood", type=int, default=2000, help="concurrent flood connections in phase 3")
    args = parser.parse_args(argv)
    lift_fd_limit(args.idle + 256)

    with scratch_dir("authd-bench-abuse-", keep=args.keep) as root:
        stack = PamStack.create(root / "pam", {USER: PASSWORD}, kind=args.stack)
        max_connections = args.idle + 100  # the flood goes past it
        print(f"authd abuse benchmark: {stack.description}; {args.workers} workers; {args.seconds:g} s per phase; "
              f"max_connections {max_connections}; {os.cpu_count()} CPUs")
        with Authd(root, stack, args.workers, max_connections) as authd:
            phases = [measure("quiet", authd, args.seconds)]
            held = hold_idle(authd, args.idle)
            try:
                phases.append(measure(f"{args.idle} idle connections", authd, args.seconds, f"{len(held)} held open"))
                phases.append(under_flood(authd, stack, args.flood, args.seconds))
            finally:
                for sock in held:
                    sock.close()
        report(phases, args.idle)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        sys.exit(flood_child(sys.argv[2], int(sys.argv[3])))
    sys.exit(main())
