"""A FastAPI app behind uvicorn under 200 concurrent requests: authd's checks against a dict.

    python -m benchmarks.bench_web [--concurrency C] [--seconds S] [--users U]

One real daemon (pam_matrix stack), U users logged in once up front. Then the same app
(`benchmarks/web_app.py`, one uvicorn worker) is run twice, each for S seconds under C
keep-alive connections that each send `GET /reports` with a user's bearer token, back to back:

1. BENCH_MODE=dict: session and permission from an in-process dict: the baseline;
2. BENCH_MODE=authd: `Depends(authd.require("reports.read"))`, i.e. a `session` and a `check`
   per request over the worker's one pipelined connection to authd.

Printed per run: requests/s, p50/p99 latency, CPU per request of uvicorn and of authd, and
(authd run) authd's share: of the CPU spent by app and daemon together, and of the app's
request-handling wall time spent awaiting authd's replies (that wait includes the app's own
event loop getting round to the reply, so under saturation it overstates authd); then the
ratio of the two rates. The load generator is a lean asyncio HTTP/1.1 client in this process.
It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from authd.client import Client

from .harness import (
    NOISY, AuthdProcess, CpuMeter, Window, cpu_note, ms, percentile, policy, process_cpu, report_errors, scratch_dir,
    stop,
)
from .pamstack import REPO, PamStack

SERVICE = "bench"
ROLES = '\n[roles.staff]\nusers = ["*"]\npermissions = ["reports.read"]\n'


@dataclass
class Run(Window):
    app_cpu: float = 0.0
    authd_cpu: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return status, await reader.readexactly(length)


def request_bytes(path: str, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode()


async def load(port: int, tokens: list[str], concurrency: int, seconds: float, result: Run) -> None:
    clock = time.perf_counter
    ready = asyncio.Barrier(concurrency + 1)
    go = asyncio.Event()
    deadline = 0.0

    async def connection(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = request_bytes("/reports", tokens[i % len(tokens)])
        try:
            status, _ = await get(reader, writer, request)  # warm-up: the connection and the session
            if status != 200:
                result.errors[f"warm-up HTTP {status}"] += 1
            await ready.wait()
            await go.wait()
            while (started := clock()) < deadline:
                status, _ = await get(reader, writer, request)
                if status != 200:
                    result.errors[f"HTTP {status}"] += 1
                elif (done := clock()) <= deadline:
                    result.latencies.append(done - started)
        finally:
            writer.close()

    tasks = [asyncio.create_task(connection(i)) for i in range(concurrency)]
    await asyncio.wait_for(ready.wait(), 60)
    deadline = clock() + seconds
    go.set()
    for task in asyncio.as_completed(tasks, timeout=seconds + 60):
        try:
            await task
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            result.errors[f"client: {exc.__class__.__name__}"] += 1


def fetch_stats(port: int) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return json.loads((await get(reader, writer, request_bytes("/_stats")))[1])
        finally:
            writer.close()

    return asyncio.run(run())


def run_app(mode: str, authd: AuthdProcess, env: dict[str, str], tokens: dict[str, str], args: argparse.Namespace) -> Run:
    port = free_port()
    app_env = env | {"BENCH_MODE": mode, "AUTHD_SOCKET": str(authd.socket), "AUTHD_SERVICE": SERVICE,
                     "BENCH_TOKENS": json.dumps(tokens)}
    app_env.pop("LD_PRELOAD", None)  # the app talks to authd; only the daemon needs pam_wrapper
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "benchmarks.web_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--no-access-log", "--log-level", "warning", "--backlog", str(max(2048, args.concurrency * 2))],
        env=app_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("uvicorn did not listen within 60 s") from None
                time.sleep(0.1)
        result = Run(args.seconds)
        meter = CpuMeter()
        app_before, authd_before = process_cpu(proc.pid), authd.cpu_seconds()
        stats_before = fetch_stats(port)
        asyncio.run(load(port, list(tokens), args.concurrency, args.seconds, result))
        result.app_cpu, result.authd_cpu = process_cpu(proc.pid) - app_before, authd.cpu_seconds() - authd_before
        result.cores = meter.cores()
        after = fetch_stats(port)
        result.stats = {k: after[k] - stats_before[k] for k in after}
        return result
    finally:
        stop(proc, 30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_web", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=200, help="concurrent keep-alive connections (default 200)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run (default 10)")
    parser.add_argument("--users", type=int, default=50, help="distinct logged-in users the requests carry (default 50)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (daemon log)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.seconds <= 0 or args.users < 1:
        parser.error("--concurrency >= 1, --seconds > 0, --users >= 1")

    with scratch_dir("authd-bench-web-", keep=args.keep) as root:
        users = {f"web{i}": f"web-pass-{i}" for i in range(args.users)}
        stack = PamStack.create(root / "pam", users, kind="matrix")
        env = stack.subprocess_env()
        authd = AuthdProcess(root, env)
        authd.config.write_text(policy(socket=authd.socket, pam_service=stack.service, workers=1, service=SERVICE,
                                       daemon="[daemon.limits]\nmax_connections = 4096\n") + ROLES)
        with authd:
            with Client(authd.socket) as c:
                tokens = {c.auth(user, password, SERVICE)["session"]["token"]: user for user, password in users.items()}
            print(f"FastAPI + uvicorn (1 worker), {args.concurrency} concurrent connections, {args.users} users,"
                  f" {args.seconds:g} s per run", flush=True)
            runs = {mode: run_app(mode, authd, env, tokens, args) for mode in ("dict", "authd")}
        noisy = False
        for mode, run in runs.items():
            noisy |= run.cores[1] > NOISY
            label = "in-process dict:" if mode == "dict" else "authd (session+check):"
            print(f"{label:<23} {run.rate:7.0f} req/s  p50 {ms(percentile(run.latencies, 50))}"
                  f"  p99 {ms(percentile(run.latencies, 99))}")
            share = ""
            if mode == "authd" and run.stats.get("handling"):
                share = (f"; authd's share: {run.authd_cpu / max(run.app_cpu + run.authd_cpu, 1e-9):.0%} of the CPU,"
                         f" {run.stats['authd'] / run.stats['handling']:.0%} of the app's handling wall time")
            print(f"  (per request: uvicorn {run.per_request(run.app_cpu)}, authd {run.per_request(run.authd_cpu)} CPU"
                  f"{share}; {cpu_note(run.cores)})")
            report_errors(run.errors)
        print(f"ratio authd/dict: {runs['authd'].rate / max(runs['dict'].rate, 1e-9):.2f}x requests/s")
        if noisy:
            print(f"note: other processes used more than {NOISY} cores during some run; those figures are noisy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
