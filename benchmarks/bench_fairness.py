"""A victim's correct-password logins while another local uid floods the PAM queue.

    python -m benchmarks.bench_fairness [--seconds S] [--floods 8:spin,256:hold,256:spin] [--depth D]
                                        [--workers W] [--stack unix|matrix] [--flood-user nobody]
                                        [--max-queued N]

authd tells local users apart by their SO_PEERCRED uid and queues PAM calls per uid, served in
turn, with at most `max_queued_per_uid` waiting per uid (beyond that: `busy` at once). This
measures what that buys the victim, against the real daemon, in phases of S seconds (default 15):

1. idle: the victim (this process, root) logs in back to back with the right password on its
   own connection (`open_session = false`); its p50 and p99 are the baseline;
2. one phase per flood C:MODE in `--floods`, each on a fresh daemon: the same while a
   flooder process running as another uid (`nobody` by default; it drops to that uid before
   it connects, so the daemon sees that uid) keeps C connections each with D requests in
   flight (default 32, the default `max_inflight`): `auth` with a new unknown user name every
   time (so each one passes the lockout budgets and reaches PAM) and a wrong password. Each
   reply is answered with the next request at once, except, in mode `hold`, a `busy` one.

The defaults: 8 x 32 spinning is a flood that keeps its uid's queue full; 256 x 32 (the default
`max_connections_per_uid`) is all one uid may have in flight: holding, it is the flood that
put a victim's login 10 s behind one FIFO; spinning, it bounced off `busy` as fast as the CPU
allowed until authd stopped reading a uid with a full queue (`--depth 64 --max-queued 100000`
makes it bounce off `max_inflight` instead).

Printed per phase: the victim's logins, p50, p99 and their ratio to the idle phase (goal: p99
within 2x), cores used by this benchmark's processes and by everything else; for a flood what
the flooder got back and what the daemon's PAM pool did (calls, refused `busy`). Needs root (to
run the flooder as another uid; the unix stack needs it anyway). Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import pwd
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from authd.client import Client

from .bench_abuse import GRACE, PASSWORD, SERVICE, USER, Phase, lift_fd_limit, measure, print_details
from .harness import AuthdProcess, cpu_note, ms, percentile, policy, scratch_dir
from .pamstack import REPO, PamStack

RAMP_UP = 1.0  # seconds the flood runs before the victim's window opens


class Authd(AuthdProcess):
    """The daemon over the benchmark's stack, its socket open to every local uid."""

    def __init__(self, root: Path, stack: PamStack, workers: int, max_queued: int | None) -> None:
        super().__init__(root, stack.subprocess_env(), grace=GRACE)
        root.chmod(0o711)  # the flooder's uid must reach the socket
        limits = f"\n[daemon.limits]\nmax_queued_per_uid = {max_queued}\n" if max_queued else ""
        self.config.write_text(policy(socket=self.socket, workers=workers, service=SERVICE, pam_service=stack.service,
                                      log_level="warning", daemon=limits, socket_mode=0o666))

    def pam_stats(self) -> dict[str, int]:
        with Client(self.socket, timeout=GRACE) as client:
            return client.status()["pam"]


def _request(n: int, service: bytes) -> bytes:
    return b'{"id":%d,"op":"auth","user":"flood-%d","password":"wrong","service":"%s","open_session":false}\n' % (
        n, n, service)


def _kind(line: bytes) -> str:
    for kind in ("busy", "auth_failed", "locked_out", "unavailable"):
        if b'"error":"%s"' % kind.encode() in line:
            return kind
    return "other"


def flood_child(path: str, uid: int, gid: int, connections: int, depth: int, mode: str, service: str) -> int:
    """The flooder (a separate process): drop to uid/gid, flood until stdin closes, print counts.

    Mode ``spin`` answers every reply with a new request; ``hold`` does not resend after a
    ``busy``, so it keeps exactly what the daemon accepted in flight (its uid's queue full)
    without making the daemon refuse requests over and over.
    """
    lift_fd_limit(connections + 64)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    counts: Counter[str] = Counter()
    names = itertools.count()
    service_name = service.encode()

    async def flood(connected: asyncio.Queue[bool]) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError:
            counts["connect_failed"] += 1
            connected.put_nowait(False)
            return
        try:
            writer.write(b"".join(_request(next(names), service_name) for _ in range(depth)))
            connected.put_nowait(True)
            while line := await reader.readline():
                kind = _kind(line)
                counts[kind] += 1
                if kind != "busy" or mode == "spin":
                    writer.write(_request(next(names), service_name))
            counts["closed_by_daemon"] += 1
        except OSError:
            counts["cut"] += 1
        finally:
            writer.close()

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)
        connected: asyncio.Queue[bool] = asyncio.Queue()
        tasks = [asyncio.create_task(flood(connected)) for _ in range(connections)]
        for _ in tasks:
            await connected.get()
        print("flooding", flush=True)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    print(json.dumps(counts), flush=True)
    return 0


class Flooder:
    """``flood_child`` as a subprocess; a context manager that kills it if it is still running.

    ``env`` must make this checkout importable (``PamStack.subprocess_env()``, a test daemon's
    ``env()``). The process starts as the caller (root) and drops to ``uid``/``gid`` before it
    connects, so the daemon sees that uid.
    """

    def __init__(self, socket: Path, env: Mapping[str, str], *, uid: int, gid: int, connections: int, depth: int,
                 mode: str, service: str = SERVICE) -> None:
        command = [sys.executable, "-m", "benchmarks.bench_fairness", "flood", str(socket), str(uid), str(gid),
                   str(connections), str(depth), mode, service]
        self.proc = subprocess.Popen(command, cwd=REPO, env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def __enter__(self) -> Self:
        return self

    def wait_started(self) -> None:
        """Return once every connection is open and has its first requests sent."""
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "flooding":
            raise RuntimeError(f"the flooder did not start (exit status {self.proc.wait(GRACE)})")

    def stop(self) -> dict[str, int]:
        """End the flood; what the flooder got back, by kind of reply."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        counts: dict[str, int] = json.loads(self.proc.stdout.readline())
        self.proc.wait(GRACE)
        return counts

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def under_flood(authd: Authd, stack: PamStack, args: argparse.Namespace, user: pwd.struct_passwd,
                connections: int, mode: str) -> Phase:
    flooder = Flooder(authd.socket, stack.subprocess_env(), uid=user.pw_uid, gid=user.pw_gid,
                      connections=connections, depth=args.depth, mode=mode)
    before: dict[str, int] = {}

    def start_flood() -> None:
        flooder.wait_started()
        time.sleep(RAMP_UP)
        before.update(authd.pam_stats())

    with flooder:
        phase = measure(f"flood {connections}x{args.depth} {mode}", authd, args.seconds, start_abuse=start_flood)
        after = authd.pam_stats()
        counts = flooder.stop()
    calls, busy = (after.get(key, 0) - before.get(key, 0) for key in ("calls", "refused_busy"))  # 0: an older daemon
    phase.note = (f"flood from {user.pw_name}: the daemon ran "
                  f"{calls:,} PAM calls ({calls / args.seconds:,.0f}/s, the victim's included) and refused "
                  f"{busy:,} busy ({busy / args.seconds:,.0f}/s); {after['waiting']} waiting at the end. "
                  f"The flooder got (ramp-up included): {dict(sorted(counts.items()))}")
    return phase


def report(phases: list[Phase]) -> None:
    idle = phases[0]
    base50, base99 = percentile(idle.latencies, 50), percentile(idle.latencies, 99)
    print(f"{'phase':<20} {'logins':>7} {'p50':>9} {'p99':>9} {'p50 ratio':>10} {'p99 ratio':>10}  cores (ours, others)")
    for phase in phases:
        p50, p99 = percentile(phase.latencies, 50), percentile(phase.latencies, 99)
        print(f"{phase.name:<20} {len(phase.latencies):>7} {ms(p50):>9} {ms(p99):>9} {p50 / base50:>9.2f}x "
              f"{p99 / base99:>9.2f}x  {cpu_note(phase.cores)}")
        print_details(phase)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fairness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase (default 15)")
    parser.add_argument("--floods", default="8:spin,256:hold,256:spin",
                        help="one phase per CONNECTIONS:MODE, mode spin or hold (default 8:spin,256:hold,256:spin)")
    parser.add_argument("--depth", type=int, default=32, help="requests in flight per flood connection (default 32)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--stack", choices=["matrix", "unix"], default="unix",
                        help="unix: pam_unix + yescrypt (default); matrix: pam_matrix, daemon overhead only")
    parser.add_argument("--flood-user", default="nobody", help="the flooder's user (default nobody)")
    parser.add_argument("--max-queued", type=int, help="daemon.limits.max_queued_per_uid (default: the daemon's)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    floods = []
    for flood in args.floods.split(","):
        count, _, mode = flood.partition(":")
        if not count.isdigit() or mode not in ("spin", "hold"):
            parser.error(f"--floods: {flood!r} is not CONNECTIONS:spin or CONNECTIONS:hold")
        floods.append((int(count), mode))
    if os.geteuid() != 0:
        parser.error("needs root: the flooder must run as another uid than the victim")
    user = pwd.getpwnam(args.flood_user)
    if user.pw_uid == os.geteuid():
        parser.error("--flood-user must not be the victim's uid")

    with scratch_dir("authd-bench-fair-", keep=args.keep) as root:
        stack = PamStack.create(root / "pam", {USER: PASSWORD}, kind=args.stack)
        print(f"authd fairness benchmark: {stack.description}; {args.workers} workers; {args.seconds:g} s per phase; "
              f"victim uid {os.geteuid()}, flooder {user.pw_name} (uid {user.pw_uid}); {os.cpu_count()} CPUs")
        root.chmod(0o711)  # the flooder's uid must reach the sockets below
        phases = []
        for i, flood in enumerate([None, *floods]):  # a fresh daemon each: no flood outlives its phase
            home = root / f"daemon{i}"
            home.mkdir()
            with Authd(home, stack, args.workers, args.max_queued) as authd:
                phases.append(measure("idle", authd, args.seconds) if flood is None
                              else under_flood(authd, stack, args, user, *flood))
        report(phases)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        sys.exit(flood_child(sys.argv[2], *(int(arg) for arg in sys.argv[3:7]), *sys.argv[7:9]))
    sys.exit(main())
