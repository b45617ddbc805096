"""authd against the raw PAM loop on the same cores, and failure-delay isolation.

    python -m benchmarks.bench_auth [--clients N] [--seconds S] [--workers W] [--stack unix|matrix]

Four phases of S seconds each, every one bounded by its own deadline:

1. raw PAM loop: W processes call ``authd.pam.binding.authenticate`` back to back;
2. authd, ``open_session = false``: the real daemon (W workers) under N asyncio clients, one
   connection each, run from this process (not the daemon's); ratio to (1) is the overhead;
3. the same with ``open_session = true`` (a session written to SQLite per login);
4. (2) again while 10 more clients send wrong passwords for an existing user: good-login p99
   against (2)'s. The service's own ``failure_delay`` is 0, so the wait is the one PAM asks for
   (pam_unix's 2 s); lockout exempts that user so every attempt really reaches PAM.

It prints figures and asserts nothing: the targets are ratios on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from authd.client import AsyncClient, Client, ClientError, ReplyError

from .pamstack import LoopResult, PamStack, raw_loop

GOOD_USERS = {f"bench{i}": f"bench-pass-{i}" for i in range(1, 5)}
INTRUDER = "intruder"
USERS = {**GOOD_USERS, INTRUDER: "intruder-pass"}
WRONG_PASSWORD = "not-the-password"
WRONG_CLIENTS = 10
SERVICE = "bench"
RHOST = "127.0.0.1"
GRACE = 30.0  # how long past its window a phase may take to wind down before it is cut off

POLICY = """\
[daemon]
socket = "{socket}"
socket_mode = 0o600
state_dir = "state"
workers = {workers}
log_level = "info"

[clients]
users = ["*"]
admin_users = ["root"]

[[service]]
name = "{service}"
pam_service = "{pam_service}"
failure_delay = 0.0

[lockout]
exempt_users = ["{intruder}"]
"""


@dataclass
class LoadResult:
    """Good logins completed inside the window, their latencies, and the wrong-password side."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wrong_waits: list[float] = field(default_factory=list)
    daemon_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def cpu_per_auth(self) -> float:
        return self.daemon_cpu / max(1, len(self.latencies) + len(self.wrong_waits))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


class Authd:
    """The real daemon as a subprocess with the stack's environment; a context manager."""

    def __init__(self, root: Path, stack: PamStack, workers: int) -> None:
        self.socket = root / "authd.sock"
        self.config = root / "authd.toml"
        self.log = root / "authd.log"
        self.stack = stack
        self.config.write_text(POLICY.format(
            socket=self.socket, workers=workers, service=SERVICE, pam_service=stack.service, intruder=INTRUDER,
        ))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Authd:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "authd", "serve", "-c", str(self.config)], env=self.stack.subprocess_env(),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + GRACE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"authd exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with Client(self.socket, timeout=2) as client:
                    client.hello()
                return self
            except (ClientError, OSError):
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"authd did not serve within {GRACE:.0f} s:\n{self.tail()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(GRACE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def cpu_seconds(self) -> float:
        """User+system CPU of the daemon process itself (all threads, not its PAM workers)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


async def load(authd: Authd, clients: int, seconds: float, *, open_session: bool, wrong_clients: int = 0) -> LoadResult:
    """N good clients (and optionally wrong-password ones) against authd for ``seconds``."""
    result = LoadResult(seconds=seconds)
    ready = asyncio.Barrier(clients + wrong_clients + 1)
    go = asyncio.Event()
    users = list(GOOD_USERS.items())
    clock = time.perf_counter
    deadline = 0.0

    async def good(i: int) -> None:
        user, password = users[i % len(users)]
        async with AsyncClient(authd.socket) as client:
            await client.auth(user, password, SERVICE, rhost=RHOST, open_session=open_session)  # warm-up
            await ready.wait()
            await go.wait()
            while (started := clock()) < deadline:
                try:
                    await client.auth(user, password, SERVICE, rhost=RHOST, open_session=open_session)
                except ReplyError as exc:
                    result.errors[exc.code] += 1
                    continue
                if (done := clock()) <= deadline:
                    result.latencies.append(done - started)

    async def wrong() -> None:
        async with AsyncClient(authd.socket) as client:
            await ready.wait()
            await go.wait()
            while (started := clock()) < deadline:
                try:
                    await client.auth(INTRUDER, WRONG_PASSWORD, SERVICE, open_session=open_session)
                    result.errors["wrong password accepted"] += 1
                except ReplyError as exc:
                    if exc.code != "auth_failed":
                        result.errors[f"wrong: {exc.code}"] += 1
                result.wrong_waits.append(clock() - started)

    goods = [asyncio.create_task(good(i)) for i in range(clients)]
    wrongs = [asyncio.create_task(wrong()) for _ in range(wrong_clients)]
    async with asyncio.timeout(GRACE):
        await ready.wait()
    cpu_before = authd.cpu_seconds()
    deadline = clock() + seconds
    go.set()
    done, pending = await asyncio.wait(goods, timeout=seconds + GRACE)
    result.daemon_cpu = authd.cpu_seconds() - cpu_before
    for task in [*pending, *wrongs]:  # a wrong-password client may be mid-delay: that wait is not ours
        task.cancel()
    await asyncio.gather(*pending, *wrongs, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            result.errors[f"client: {task.exception()!r}"] += 1
    if pending:
        result.errors["client still waiting after the window"] += len(pending)
    return result


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def report_errors(result: LoadResult) -> None:
    for what, count in sorted(result.errors.items()):
        print(f"  !! {count} x {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_auth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent good-login clients (default 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="PAM workers = raw-loop processes (default: CPUs)")
    parser.add_argument("--stack", choices=["unix", "matrix"], default="unix", help="PAM stack (default: pam_unix + yescrypt)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (daemon log, stack files)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.workers < 1 or args.seconds <= 0:
        parser.error("--clients and --workers must be >= 1 and --seconds > 0")

    root = Path(tempfile.mkdtemp(prefix="authd-bench-", dir="/tmp"))  # AF_UNIX paths are short
    try:
        stack = PamStack.create(root / "pam", USERS, kind=args.stack)
        print(f"stack: {stack.description}, workers={args.workers}, clients={args.clients}, {args.seconds:g} s", flush=True)
        user, password = next(iter(GOOD_USERS.items()))
        raw: LoopResult = raw_loop(stack, user, password, processes=args.workers, seconds=args.seconds, rhost=RHOST)
        print(f"raw PAM loop:   {raw.rate:7.1f} auth/s  ({ms(statistics.median(raw.latencies))} per call)", flush=True)
        if raw.failures:
            print(f"  !! {raw.failures} raw-loop logins failed")

        with Authd(root, stack, args.workers) as authd:
            phases = {}
            for name, open_session in (("authd:", False), ("authd+session:", True)):
                r = phases[open_session] = asyncio.run(load(authd, args.clients, args.seconds, open_session=open_session))
                print(
                    f"{name:<15} {r.rate:7.1f} auth/s  p50 {ms(percentile(r.latencies, 50))}  p99 {ms(percentile(r.latencies, 99))}"
                    f"   ratio {r.rate / raw.rate:.2f}x   (open_session={str(open_session).lower()}, daemon CPU {ms(r.cpu_per_auth)}/auth)",
                    flush=True,
                )
                report_errors(r)
            alone = phases[False]
            hammered = asyncio.run(load(authd, args.clients, args.seconds, open_session=False, wrong_clients=WRONG_CLIENTS))
        p99_alone, p99_hammered = percentile(alone.latencies, 99), percentile(hammered.latencies, 99)
        print(
            f"good p99 alone: {ms(p99_alone)}; with {WRONG_CLIENTS} wrong-password clients (2 s delay): {ms(p99_hammered)}"
            f"  ratio {p99_hammered / p99_alone:.2f}x"
        )
        print(
            f"  (good logins {hammered.rate:.1f} auth/s; {len(hammered.wrong_waits)} wrong-password replies,"
            f" median wait {statistics.median(hammered.wrong_waits or [float('nan')]):.2f} s)"
        )
        report_errors(hammered)
    finally:
        if args.keep:
            print(f"scratch directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
