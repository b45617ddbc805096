"""`check` throughput and latency from one pipelined connection, against `hello` on the same one.

    python -m benchmarks.bench_authz [--seconds S] [--depth D] [--roles R] [--deny-every N]

One real daemon (pam_matrix stack: the one login the benchmark makes costs nothing), one
session, then three phases of S seconds, each on one connection with D requests in flight:

1. `hello` from a lean pipelined socket loop: the protocol's floor (decode, dispatch, encode,
   a task per request) with no session or roles work: the baseline;
2. `check` from the same loop: every N-th permission is denied (an `authz.denied` event), the
   rest allowed; the policy has R roles, of which the session's user matches one;
3. `check` through `AsyncClient` (what an app's integration uses), D concurrent callers.

Printed: checks/s, p50/p99 latency, the ratio to (1), and CPU per request of the daemon and of
the client, plus the cores our processes and others used (a neighbour's load skews a line).
"req/s per daemon core-second" is the figure neighbours cannot skew: what one core spent only
on the daemon would serve.
It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from authd.client import AsyncClient, Client

from .harness import NOISY, AuthdProcess, CpuMeter, Window, cpu_note, ms, percentile, policy, report_errors, scratch_dir
from .pamstack import PamStack

USER, PASSWORD, SERVICE = "bench", "bench-pass", "bench"
_reply = msgspec.json.Decoder(dict[str, object])


@dataclass
class Phase(Window):
    daemon_cpu: float = 0.0
    client_cpu: float = 0.0


def roles_toml(count: int) -> str:
    """`count` roles: one for the benchmark user, the rest for other users and groups."""
    text = f'\n[roles.bench]\nusers = ["{USER}"]\npermissions = ["app.*", "report.read"]\ndeny = ["app.admin.*"]\n'
    for i in range(1, count):
        text += f'\n[roles.filler{i}]\nusers = ["someone{i}"]\ngroups = ["daemon"]\npermissions = ["x{i}.*"]\ndeny = ["x{i}.y"]\n'
    return text


def permissions(deny_every: int) -> list[str]:
    return [f"app.admin.p{i}" if deny_every and i % deny_every == 0 else f"app.p{i}.read" for i in range(1, 1001)]


def measure(authd: AuthdProcess, seconds: float, run: Callable[[float], Phase]) -> Phase:
    meter = CpuMeter()
    daemon_before, client_before = authd.cpu_seconds(), time.process_time()
    phase = run(seconds)
    phase.daemon_cpu = authd.cpu_seconds() - daemon_before
    phase.client_cpu = time.process_time() - client_before
    phase.cores = meter.cores()
    return phase


def raw_loop(path: Path, lines: list[bytes], depth: int, seconds: float, expect: Callable[[int, dict[str, object]], str | None]) -> Phase:
    """Keep `depth` requests in flight on one blocking socket; request i is lines[i % len]."""
    phase = Phase(seconds)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sent_at: dict[int, float] = {}
    clock = time.perf_counter
    next_id = 0

    def send(count: int) -> None:
        nonlocal next_id
        batch = []
        now = clock()
        for _ in range(count):
            batch.append(lines[next_id % len(lines)].replace(b'"id":0', b'"id":%d' % next_id, 1))
            sent_at[next_id] = now
            next_id += 1
        sock.sendall(b"".join(batch))

    deadline = clock() + seconds
    send(depth)
    buffer = b""
    while sent_at:
        chunk = sock.recv(1 << 20)
        if not chunk:
            phase.errors["connection closed"] += 1
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        now = clock()
        for line in complete:
            reply = _reply.decode(line)
            request_id = reply["id"]
            assert isinstance(request_id, int)
            started = sent_at.pop(request_id)
            if (problem := expect(request_id, reply)) is not None:
                phase.errors[problem] += 1
            elif now <= deadline:
                phase.latencies.append(now - started)
        if now < deadline:
            send(len(complete))
    sock.close()
    return phase


def client_loop(path: Path, token: str, perms: list[str], depth: int, seconds: float, deny_every: int) -> Phase:
    phase = Phase(seconds)
    clock = time.perf_counter

    async def run() -> None:
        async with AsyncClient(path, max_inflight=depth) as client:
            deadline = clock() + seconds

            async def caller(start: int) -> None:
                i = start
                while (started := clock()) < deadline:
                    perm = perms[i % len(perms)]
                    reply = await client.check(token, perm)
                    if reply["allowed"] is perm.startswith("app.admin."):
                        phase.errors["wrong answer"] += 1
                    elif (done := clock()) <= deadline:
                        phase.latencies.append(done - started)
                    i += depth

            await asyncio.gather(*(caller(i) for i in range(depth)))

    asyncio.run(run())
    return phase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_authz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase (default 5)")
    parser.add_argument("--depth", type=int, default=32, help="requests in flight on the connection (default 32, authd's max_inflight)")
    parser.add_argument("--roles", type=int, default=20, help="roles in the policy (default 20)")
    parser.add_argument("--deny-every", type=int, default=10, help="every N-th check is denied (default 10; 0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (daemon log)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or not 1 <= args.depth <= 32 or args.roles < 1 or args.deny_every < 0:
        parser.error("--seconds > 0, --depth 1..32, --roles >= 1, --deny-every >= 0")

    with scratch_dir("authd-bench-authz-", keep=args.keep) as root:
        stack = PamStack.create(root / "pam", {USER: PASSWORD}, kind="matrix")
        authd = AuthdProcess(root, stack.subprocess_env())
        authd.config.write_text(policy(socket=authd.socket, pam_service=stack.service, workers=1, service=SERVICE)
                                + roles_toml(args.roles))
        with authd:
            with Client(authd.socket) as c:
                token = c.auth(USER, PASSWORD, SERVICE)["session"]["token"]
            perms = permissions(args.deny_every)
            encode = msgspec.json.encode
            hello = [encode({"id": 0, "op": "hello"}) + b"\n"]
            checks = [encode({"id": 0, "op": "check", "token": token, "permission": p}) + b"\n" for p in perms]

            def hello_ok(i: int, reply: dict[str, object]) -> str | None:
                return None if reply.get("ok") else str(reply.get("error"))

            def check_ok(i: int, reply: dict[str, object]) -> str | None:
                if not reply.get("ok"):
                    return str(reply.get("error"))
                return None if reply["allowed"] is not perms[i % len(perms)].startswith("app.admin.") else "wrong answer"

            print(f"one connection, {args.depth} in flight, {args.roles} roles, every {args.deny_every or 'no'}-th check denied,"
                  f" {args.seconds:g} s per phase", flush=True)
            base = measure(authd, args.seconds, lambda s: raw_loop(authd.socket, hello, args.depth, s, hello_ok))
            check = measure(authd, args.seconds, lambda s: raw_loop(authd.socket, checks, args.depth, s, check_ok))
            lib = measure(authd, args.seconds, lambda s: client_loop(authd.socket, token, perms, args.depth, s, args.deny_every))
            noisy = False
            for name, phase in (("hello (raw):", base), ("check (raw):", check), ("check (AsyncClient):", lib)):
                noisy |= phase.cores[1] > NOISY
                print(f"{name:<21} {phase.rate:8.0f} req/s  p50 {ms(percentile(phase.latencies, 50))}"
                      f"  p99 {ms(percentile(phase.latencies, 99))}  ratio to hello {phase.rate / base.rate:.2f}x")
                capacity = len(phase.latencies) / max(phase.daemon_cpu, 1e-9)
                print(f"  (per request: daemon {phase.per_request(phase.daemon_cpu)}, client {phase.per_request(phase.client_cpu)} CPU,"
                      f" i.e. {capacity:.0f} req/s per daemon core-second; {cpu_note(phase.cores)})")
                report_errors(phase.errors)
            with Client(authd.socket) as c:
                counters = c.status()["counters"]
            print(f"daemon counters: authz:allowed {counters.get('authz:allowed', 0)}, authz:denied {counters.get('authz:denied', 0)}")
            if noisy:
                print(f"note: other processes used more than {NOISY} cores during some phase; those figures are noisy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
