"""The lifecycle under load: reload latency, requests lost across reloads, drain, USR1 dumps.

    python -m benchmarks.bench_lifecycle [--quick] [--phases reload,drain,dump] [--sizes 100000,1000000] [--keep]

A real daemon (2 PAM workers, real libpam over pam_wrapper + pam_matrix) on a Unix socket:

1. reload latency: SIGHUP sent -> the new generation seen in `hello`, p50/p99 over 200
   reloads (50 with --quick), each sent once the previous one is visible, while client loops
   in a separate process (3 logins, 1 `session`, one request at a time each) keep the daemon
   busy; the policy file alternates between two valid versions, replaced atomically;
2. 1000 reloads (200 with --quick) the same way: requests the loops sent against replies,
   lost (no reply within 10 s or the connection dropped) and error replies;
3. drain: N requests (10, 100, 1000) pipelined over connections of at most 25 (below
   `max_inflight`): a tenth are wrong passwords, sent 0.5 s ahead so they are waiting out
   their 2 s failure delay; the rest (logins opening a session, `session`, `hello`) go out
   right before SIGTERM, so all N are in flight; SIGTERM -> process exit, and that every
   request got a reply;
4. SIGUSR1 dump with 100k and 1M sessions written straight into `sessions.db` before start:
   load time and RSS, then `session` requests back to back on one connection while the daemon
   dumps; the dump's own `seconds` (its log line) and request latency during the dumps against
   a window without one. The expiry sweep (every `sweep_interval`, on the event loop) is
   measured apart: the daemon starts with a 1 s sweep, then a reload sets it to an hour.
   --quick: 100k only.

Each phase says how busy the box was with other processes: on a shared machine the figures
are only as good as that. It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import secrets
import signal
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from authd.client import Client
from authd.sessions import SessionStore, hash_token
from tests.daemon import Daemon
from tests.pamenv import PamEnv

from .harness import (
    CpuMeter,
    cpu_note,
    memory_kib,
    ms,
    percentile,
    policy,
    report_errors,
    scratch_dir,
)
from .lifecycle_load import GRACE, REPLY_TIMEOUT, Load, request

PAM_SERVICE = "authd-bench"
USER, PASSWORD = "alice", "bench-pass-alice"
INTRUDER, WRONG_PASSWORD = "intruder", "not-the-password"
FAILURE_DELAY = 2.0
PER_CONNECTION = 25  # pipelined requests per connection in the drain phase (max_inflight is 32)
WRONG_SETTLE = 0.5  # drain phase: time for the wrong passwords to get through PAM into their delay
BENCH_TOKEN = "bench-known-token"


def authd_policy(*, sweep: float = 30.0, extra: str = "") -> str:
    """The phases' policy; `{socket}` and `{state}` are left for `Daemon` to fill in."""
    return policy(
        socket="{socket}", state_dir="{state}", workers=2, service="login", pam_service=PAM_SERVICE,
        failure_delay=FAILURE_DELAY, daemon=f"drain_timeout = 20.0\ndump_keep = 2\nsweep_interval = {sweep}\n",
        service_extra=extra, exempt_users=[INTRUDER],
    )


def spread(values: list[float]) -> str:
    p50, p99 = (percentile(values, q, rank=math.ceil) for q in (50, 99))
    return f"p50 {ms(p50)}  p99 {ms(p99)}  max {ms(max(values, default=math.nan))}"


def box_note(meter: CpuMeter) -> str:
    return f"{cpu_note(meter.cores())} of {os.cpu_count()}"


# --- the authd under test ------------------------------------------------------------------


class Bench:
    """Scratch directory, PAM users and a fresh daemon per phase."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pam = PamEnv.create(root / "pam")
        self.pam.add_service(PAM_SERVICE)
        self.pam.add_user(USER, PASSWORD, PAM_SERVICE)
        self.pam.add_user(INTRUDER, "intruder-pass", PAM_SERVICE)

    def daemon(self, name: str, text: str) -> Daemon:
        root = self.root / name
        root.mkdir()
        return Daemon(root, self.pam, text)


def start(daemon: Daemon, timeout: float = GRACE) -> float:
    started = time.monotonic()
    daemon.start(wait=False)
    daemon.wait_ready(timeout)
    return time.monotonic() - started


def stop(daemon: Daemon) -> None:
    try:
        daemon.stop(signal.SIGTERM, GRACE)
    finally:
        daemon.cleanup()


def rss(pid: int) -> str:
    kib = memory_kib(pid)
    return f"RSS {kib['VmRSS'] / 1024:.0f} MiB (peak {kib['VmHWM'] / 1024:.0f} MiB)"


def login(daemon: Daemon) -> str:
    with Client(daemon.socket, timeout=GRACE) as client:
        token: str = client.auth(USER, PASSWORD, "login")["session"]["token"]
        return token


class LogTail:
    """New JSON lines of the daemon's log since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self._partial = b""

    def events(self, name: str) -> list[dict[str, Any]]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = self._partial + f.read()
            self.offset = f.tell()
        *lines, self._partial = data.split(b"\n")
        out = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                out.append(record)
        return out


# --- 1 and 2: reloads ----------------------------------------------------------------------


def reloads(daemon: Daemon, count: int) -> tuple[list[float], int]:
    """`count` SIGHUPs, each once the previous generation is visible; (latencies, failures)."""
    variants = [authd_policy(), authd_policy(extra='deny_users = ["mallory"]')]
    latencies: list[float] = []
    failures = 0
    with Client(daemon.socket, timeout=GRACE) as client:
        generation = client.hello()["generation"]
        for i in range(count):
            staged = daemon.config.with_name("authd.toml.new")
            staged.write_text(variants[i % 2].replace("{socket}", str(daemon.socket)).replace("{state}", str(daemon.state)))
            os.replace(staged, daemon.config)
            started = time.perf_counter()
            daemon.kill(signal.SIGHUP)
            deadline = started + REPLY_TIMEOUT
            while (seen := client.hello()["generation"]) <= generation:
                if time.perf_counter() > deadline:
                    failures += 1
                    break
            else:
                latencies.append(time.perf_counter() - started)
            generation = seen
    return latencies, failures


def reload_phase(bench: Bench, quick_count: int, loss_count: int) -> None:
    daemon = bench.daemon("reload", authd_policy())
    try:
        start(daemon)
        token = login(daemon)
        for label, count in (("reload latency", quick_count), ("reloads under load", loss_count)):
            meter = CpuMeter()
            started = time.monotonic()
            with Load(daemon, token, USER, PASSWORD) as load:
                latencies, failures = reloads(daemon, count)
            tally = load.result()
            wall = time.monotonic() - started
            print(f"{label}: {count} SIGHUPs -> generation visible: {spread(latencies)}", flush=True)
            lost = tally.sent - tally.answered
            errors = sum(tally.codes.values())
            print(f"  client loops: {tally.sent} requests in {wall:.1f} s, {tally.answered} answered, lost {lost},"
                  f" error replies {errors - tally.lost}; {box_note(meter)}", flush=True)
            report_errors(tally.codes)
            if failures:
                print(f"  !! {failures} reloads not visible within {REPLY_TIMEOUT:g} s")
        status = daemon.call("status")
        counters = status["counters"]
        print(f"  daemon: generation {status['generation']}, reloads {counters.get('reloads', 0)},"
              f" failed {counters.get('reloads_failed', 0)}, state {status['state']}")
    finally:
        stop(daemon)


# --- 3: drain ------------------------------------------------------------------------------


def drain_mix(n: int, token: str) -> list[tuple[str, bytes]]:
    """A tenth wrong passwords, four tenths logins with a session, the rest session/hello."""
    out = []
    for i in range(n):
        kind = i % 10
        if kind == 0:
            out.append(("wrong", request(i, "auth", user=INTRUDER, password=WRONG_PASSWORD, service="login")))
        elif kind <= 4:
            out.append(("auth", request(i, "auth", user=USER, password=PASSWORD, service="login")))
        elif kind <= 7:
            out.append(("session", request(i, "session", token=token)))
        else:
            out.append(("hello", request(i, "hello")))
    return out


@dataclass
class DrainResult:
    n: int
    in_flight: int = 0
    wrong_waiting: int = 0
    exit_after: float = math.nan
    last_reply_after: float = math.nan
    stopped_after: float = math.nan
    exit_code: int | None = None
    codes: Counter[str] = field(default_factory=Counter)
    missing: int = 0
    socket_left: bool = False


async def drain_once(daemon: Daemon, n: int, token: str) -> DrainResult:
    """The wrong passwords go first and are left to reach their delay; then the rest is
    pipelined and SIGTERM follows at once, so every request is in flight when it lands."""
    result = DrainResult(n)
    mix = drain_mix(n, token)
    kinds = {i: kind for i, (kind, _) in enumerate(mix)}
    replies: dict[Any, tuple[str, float]] = {}
    readers: list[asyncio.Task[None]] = []
    writers: list[asyncio.StreamWriter] = []

    async def collect(reader: asyncio.StreamReader) -> None:
        async for raw in reader:
            reply = json.loads(raw)
            replies[reply.get("id")] = ("ok" if reply.get("ok") else reply.get("error", "?"), time.monotonic())

    async def pipeline(lines: list[bytes]) -> list[asyncio.StreamWriter]:
        batches = [lines[i : i + PER_CONNECTION] for i in range(0, len(lines), PER_CONNECTION)]
        opened = []
        for _ in batches:
            reader, writer = await asyncio.open_unix_connection(str(daemon.socket))
            writer.write(request(-1, "hello"))  # proves the connection was accepted before SIGTERM
            await reader.readline()
            readers.append(asyncio.create_task(collect(reader)))
            opened.append(writer)
        for writer, batch in zip(opened, batches):
            writer.write(b"".join(batch))
        for writer in opened:
            await writer.drain()
        writers.extend(opened)
        return opened

    await pipeline([line for kind, line in mix if kind == "wrong"])
    await asyncio.sleep(WRONG_SETTLE)
    await pipeline([line for kind, line in mix if kind != "wrong"])
    result.in_flight = n - len(replies)
    result.wrong_waiting = sum(1 for i, kind in kinds.items() if kind == "wrong" and i not in replies)
    assert daemon.proc is not None
    proc = daemon.proc
    signalled, signalled_wall = time.monotonic(), time.time()
    daemon.kill(signal.SIGTERM)

    def wait_exit() -> float:
        proc.wait(GRACE)
        return time.monotonic()

    exited = await asyncio.to_thread(wait_exit)
    await asyncio.wait(readers, timeout=GRACE)
    for reader_task in readers:
        reader_task.cancel()
    for writer in writers:
        writer.close()
    result.exit_after = exited - signalled
    result.exit_code = proc.returncode
    answered = {i: replies[i] for i in kinds if i in replies}
    result.codes = Counter(f"{kinds[i]}:{code}" for i, (code, _) in answered.items())
    result.missing = n - len(answered)
    result.last_reply_after = max((t for _, t in answered.values()), default=math.nan) - signalled
    result.socket_left = daemon.socket.exists()
    if stopped := daemon.log_lines("stopped"):
        result.stopped_after = datetime.fromisoformat(stopped[-1]["timestamp"]).timestamp() - signalled_wall
    return result


def drain_phase(bench: Bench, sizes: list[int]) -> None:
    for n in sizes:
        daemon = bench.daemon(f"drain-{n}", authd_policy())
        meter = CpuMeter()
        try:
            start(daemon)
            r = asyncio.run(drain_once(daemon, n, login(daemon)))
        finally:
            daemon.cleanup()
        codes = ", ".join(f"{what} {count}" for what, count in sorted(r.codes.items()))
        print(f"drain, {n:>4} pipelined: SIGTERM -> exit {r.exit_code} in {r.exit_after:.3f} s"
              f" (last reply +{r.last_reply_after:.3f} s, 'stopped' logged +{r.stopped_after:.3f} s); in flight at SIGTERM {r.in_flight}"
              f" ({r.wrong_waiting} wrong passwords in their {FAILURE_DELAY:g} s delay)", flush=True)
        print(f"  replies {n - r.missing}/{n}: {codes}; {box_note(meter)}")
        if r.missing:
            print(f"  !! {r.missing} requests got no reply")
        if r.socket_left:
            print("  !! socket file left behind")


# --- 4: USR1 dumps with many sessions ------------------------------------------------------


def populate(state: Path, count: int) -> None:
    """`count` live sessions straight into sessions.db (the store's own schema), one of them
    for BENCH_TOKEN, in one transaction."""
    state.mkdir(mode=0o700)
    path = state / "sessions.db"
    store = SessionStore(path)
    store.open()  # creates the schema exactly as the daemon does
    store.close()
    now = time.time()
    services = ("login", "imap", "smtp")

    def rows() -> Iterator[tuple[Any, ...]]:
        yield (secrets.token_urlsafe(12), hash_token(BENCH_TOKEN), USER, "users", "login", None, now, now, 86400.0, 86400.0)
        for i in range(1, count):
            created = now - (i % 3600)
            yield (secrets.token_urlsafe(12), hash_token(f"bench-{i}-{secrets.token_hex(8)}"), f"user{i % 5000}",
                   "users\nstaff", services[i % 3], f"192.0.2.{i % 250}", created, created, 86400.0, 86400.0)

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA cache_size=-262144")
        db.execute("BEGIN")
        db.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


class Probe(threading.Thread):
    """`session` requests back to back on one connection; (start, latency) of each."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_TIMEOUT)
        self.sock.connect(str(path))
        self.samples: list[tuple[float, float]] = []
        self.errors: Counter[str] = Counter()
        self.halt = threading.Event()

    def run(self) -> None:
        clock, buffer, request_id = time.perf_counter, b"", 0
        try:
            while not self.halt.is_set():
                request_id += 1
                started = clock()
                self.sock.sendall(request(request_id, "session", token=BENCH_TOKEN))
                while b"\n" not in buffer:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("authd closed the connection")
                    buffer += chunk
                line, buffer = buffer.split(b"\n", 1)
                self.samples.append((started, clock() - started))
                if not (reply := json.loads(line)).get("ok"):
                    self.errors[reply.get("error", "?")] += 1
        except OSError as exc:
            self.errors[f"client: {exc}"] += 1
        finally:
            self.sock.close()

    def window(self, start: float, end: float) -> list[float]:
        """Latencies of requests that overlapped [start, end]."""
        return [lat for t, lat in list(self.samples) if t <= end and t + lat >= start]


def measure_window(probe: Probe, seconds: float) -> list[float]:
    started = time.perf_counter()
    time.sleep(seconds)
    return probe.window(started, time.perf_counter())


def dump_phase(bench: Bench, size: int, baseline: float, dumps: int) -> None:
    daemon = bench.daemon(f"dump-{size}", authd_policy(sweep=1.0))
    meter = CpuMeter()
    started = time.monotonic()
    populate(daemon.state, size)
    print(f"dump, {size} sessions: sessions.db written in {time.monotonic() - started:.1f} s"
          f" ({(daemon.state / 'sessions.db').stat().st_size / 2**20:.0f} MiB)", flush=True)
    try:
        loaded = start(daemon, timeout=600)
        print(f"  daemon serving after {loaded:.1f} s; {rss(daemon.pid)}", flush=True)
        tail = LogTail(daemon.log)
        probe = Probe(daemon.socket)
        probe.start()
        swept = measure_window(probe, 3.0)
        daemon.write_policy(authd_policy(sweep=3600.0))
        daemon.kill(signal.SIGHUP)
        time.sleep(1.5)  # the sweeper's current 1 s sleep ends; from now on it sleeps an hour
        quiet = measure_window(probe, baseline)
        during: list[float] = []
        seconds: list[float] = []
        count = 0
        for _ in range(dumps):
            signalled = time.perf_counter()
            daemon.kill(signal.SIGUSR1)
            deadline = signalled + GRACE * 5
            while not (done := tail.events("sessions dumped")) and time.perf_counter() < deadline:
                time.sleep(0.01)
            finished = time.perf_counter()
            if not done:
                print(f"  !! no 'sessions dumped' line within {deadline - signalled:.0f} s")
                break
            seconds.append(done[-1]["seconds"])
            during += probe.window(signalled, finished)
            count = done[-1]["count"]
            time.sleep(1.0)
        probe.halt.set()
        probe.join(GRACE)
        dumped = sorted(daemon.state.glob("sessions-*.json"))
        size_note = f", file {dumped[-1].stat().st_size / 2**20:.0f} MiB" if dumped else ""
        if seconds:
            print(f"  USR1 dump: {' / '.join(f'{s:.2f}' for s in seconds)} s ({count} sessions{size_note}); {rss(daemon.pid)}")
        print(f"  `session` latency, no dump ({len(quiet):>6} requests):        {spread(quiet)}")
        print(f"  `session` latency, during the dumps ({len(during):>6}):      {spread(during)}")
        print(f"  `session` latency, expiry sweep each 1 s ({len(swept):>6}): {spread(swept)}")
        print(f"  {box_note(meter)}", flush=True)
        report_errors(probe.errors)
    finally:
        stop(daemon)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_lifecycle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer reloads, 100k sessions only: under a minute")
    parser.add_argument("--sizes", help="session counts for the dump phase, comma-separated (default 100000,1000000)")
    parser.add_argument("--phases", default="reload,drain,dump", help="which phases to run (default reload,drain,dump)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (daemon logs, dumps)")
    args = parser.parse_args(argv)
    phases = set(args.phases.split(","))
    if not phases <= {"reload", "drain", "dump"}:
        parser.error("--phases takes reload, drain and dump, comma-separated")
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [100_000] if args.quick else [100_000, 1_000_000]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # SessionStore in populate()

    with scratch_dir("authd-lifecycle-", keep=args.keep) as root:
        bench = Bench(root)
        print(f"authd lifecycle, 2 PAM workers (pam_matrix), {os.cpu_count()} cores; scratch {root}", flush=True)
        if "reload" in phases:
            reload_phase(bench, 50 if args.quick else 200, 200 if args.quick else 1000)
        if "drain" in phases:
            drain_phase(bench, [10, 100, 1000])
        for size in sizes if "dump" in phases else []:
            dump_phase(bench, size, baseline=2.0 if args.quick else 5.0, dumps=2 if args.quick else 3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
