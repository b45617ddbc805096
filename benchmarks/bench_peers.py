"""authd beside Cyrus saslauthd and Dovecot auth: same PAM stacks, same load client, same cores.

    python -m benchmarks.bench_peers [--seconds S] [--rounds R] [--conns N] [--workers W]
                                     [--stacks permit,unix,cache,ops] [--keep]

Needs root and changes the machine while it runs (temporary /etc/pam.d/authd-bench-* files
and a temporary local user, see peers.py): run it on a throwaway machine. Needs gcc,
sasl2-bin and dovecot-core.

One compiled client (loadgen.c, built here with gcc) drives every daemon with N connections
(a new one per request for the saslauthd protocol, as libsasl does; persistent for Dovecot's
and authd's own). For each stack, R rounds of S-second windows, one per target, interleaved
so that a noisy neighbour hits every target alike:

- ``permit``: pam_permit, i.e. the daemons' own cost per request; ``unix``: Debian's
  common-auth/common-account around pam_unix with a yescrypt hash. Targets: the raw PAM loop
  (one process per CPU calling pam_authenticate+pam_acct_mgmt back to back), saslauthd ``-a pam -n 5``,
  authd's saslauthd socket, Dovecot auth (``passdb pam``), authd's Dovecot socket, authd's
  native protocol.
- ``cache``: the pam_unix stack with saslauthd ``-c`` against authd with ``[cache]`` on
  (``account_check = "cached"``: like saslauthd's cache, a hit skips PAM entirely), beside
  floors for a connection per request: ``benchmarks.bareloop`` answering each saslauthd
  request `OK` through asyncio's transports, and by hand on raw sockets; each in one
  event-loop process and in two sharing the socket.
- ``ops``: authd's cheapest ops, ``session``, ``check`` (allowed) and ``hello``, on the native socket, beside
  ``benchmarks.bareloop``: a bare asyncio server answering ``hello`` lines with nothing else,
  the floor one Python event loop sets.

Printed per target: requests/s (median of the rounds, and the range), p50/p99 of the median
round, the serving processes' CPU per request, and the cores other processes used meanwhile;
then the ratios. It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from authd.client import Client
from authd.runtime import default_workers

from .harness import NOISY, AuthdProcess, CpuMeter, percentile, policy, scratch_dir, tree_cpu_seconds
from .pamstack import UNIX_LINES, PamStack, raw_loop
from .peers import PERMIT_LINES, BareLoop, Dovecot, Saslauthd, local_user, system_pam_services

USER = "authd-peer"
PASSWORD = "peer-bench-pass-1"
SERVICES = {"permit": "authd-bench-permit", "unix": "authd-bench-unix"}
PERMISSION = "mail.read"  # what `check` asks; the bench user's role allows it
HERE = Path(__file__).resolve().parent
STACKS = ("permit", "unix", "cache", "ops")


@dataclass(frozen=True)
class Window:
    ok: int
    failed: int
    errors: int
    seconds: float
    p50: float  # seconds
    p99: float
    cpu: float  # core-seconds the serving processes spent (NaN: not measured)
    others: float  # cores used by everything not ours

    @property
    def rate(self) -> float:
        return self.ok / self.seconds


@dataclass(frozen=True)
class Target:
    label: str
    run: Callable[[float], Window]


def build_loadgen(root: Path) -> Path:
    if shutil.which("gcc") is None:
        raise SystemExit("gcc is needed to build the load client: apt-get install build-essential")
    binary = root / "loadgen"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(HERE / "loadgen.c")], check=True)
    return binary


class Load:
    """Runs loadgen windows against one server process tree, with CPU accounting."""

    def __init__(self, binary: Path, conns: int, roots: list[int]) -> None:
        self.binary = binary
        self.conns = conns
        self.roots = roots  # detached daemons counted as ours, not as others

    def window(self, server_pid: int, mode: str, socket: Path, *args: str) -> Callable[[float], Window]:
        def run(seconds: float) -> Window:
            meter = CpuMeter(self.roots)
            before = tree_cpu_seconds(server_pid)
            out = subprocess.run(
                [str(self.binary), mode, str(socket), str(self.conns), str(seconds), *args],
                check=True, capture_output=True, text=True, timeout=seconds + 60,
            ).stdout.split()
            spent = tree_cpu_seconds(server_pid) - before
            fields = dict(zip(out[::2], out[1::2], strict=True))
            return Window(
                ok=int(fields["ok"]), failed=int(fields["failed"]), errors=int(fields["errors"]), seconds=seconds,
                p50=float(fields["p50_us"]) / 1e6, p99=float(fields["p99_us"]) / 1e6, cpu=spent,
                others=meter.cores()[1],
            )
        return run


def raw_target(root: Path, service: str, processes: int, roots: list[int]) -> Target:
    stack = PamStack(kind="unix", root=root, service=service, env={}, description="the system's PAM")

    def run(seconds: float) -> Window:
        meter = CpuMeter(roots)
        result = raw_loop(stack, USER, PASSWORD, processes=processes, seconds=seconds)
        ours, others = meter.cores()
        return Window(
            ok=result.count, failed=result.failures, errors=0, seconds=seconds,
            p50=percentile(result.latencies, 50), p99=percentile(result.latencies, 99),
            cpu=float("nan"), others=others,
        )
    return Target(f"raw PAM loop ({processes} processes)", run)


class Authd(AuthdProcess):
    """authd with both services, its saslauthd and Dovecot sockets, optionally the cache."""

    def __init__(self, root: Path, workers: int, *, cache: bool) -> None:
        root.mkdir(parents=True, exist_ok=True)
        env = PamStack(kind="unix", root=root, service="", env={}, description="").subprocess_env()
        super().__init__(root, env)
        self.mux = root / "mux"
        self.dovecot = root / "dovecot"
        text = policy(socket=self.socket, workers=workers, service=SERVICES["permit"],
                      pam_service=SERVICES["permit"])
        text += f'\n[[service]]\nname = "{SERVICES["unix"]}"\npam_service = "{SERVICES["unix"]}"\nfailure_delay = 0.0\n'
        text += f'\n[saslauthd]\nsocket = "{self.mux}"\n\n[dovecot]\nsocket = "{self.dovecot}"\n'
        if cache:
            text += '\n[cache]\nenabled = true\naccount_check = "cached"\n'
        text += f'\n[roles.reader]\nusers = ["{USER}"]\npermissions = ["{PERMISSION}"]\n'  # for `check`
        self.config.write_text(text)


def run_stack(stack: str, targets: list[Target], rounds: int, seconds: float) -> dict[str, list[Window]]:
    results: dict[str, list[Window]] = {t.label: [] for t in targets}
    for number in range(rounds):
        # rotate the order each round so no target always follows the same neighbour
        order = targets[number % len(targets):] + targets[:number % len(targets)]
        for target in order:
            window = target.run(seconds)
            results[target.label].append(window)
            print(f"  [{stack} round {number + 1}] {target.label}: {window.rate:,.0f}/s", file=sys.stderr, flush=True)
    return results


def median_window(windows: list[Window]) -> Window:
    return sorted(windows, key=lambda w: w.rate)[len(windows) // 2]


def report(stack: str, results: dict[str, list[Window]], ratios: list[tuple[str, str]]) -> None:
    width = max([34, *map(len, results)])
    print(f"\n== {stack}")
    print(f"  {'target':<{width}} {'req/s':>9} {'range':>17} {'p50':>9} {'p99':>9} {'CPU/req':>9} {'others':>7}")
    for label, windows in results.items():
        mid = median_window(windows)
        rates = [w.rate for w in windows]
        cpu = sum(w.cpu for w in windows) / max(1, sum(w.ok for w in windows)) * 1e3
        others = statistics.mean(w.others for w in windows)
        flag = " !" if others > NOISY else ""
        per_request = "—" if math.isnan(cpu) else f"{cpu:.3f}ms"
        print(
            f"  {label:<{width}} {mid.rate:>9,.0f} {min(rates):>8,.0f}–{max(rates):<8,.0f} {mid.p50 * 1e3:>7.2f}ms "
            f"{mid.p99 * 1e3:>7.2f}ms {per_request:>9} {others:>6.2f}{flag}"
        )
        bad = sum(w.failed for w in windows), sum(w.errors for w in windows)
        if any(bad):
            print(f"  !! {label}: {bad[0]} refused, {bad[1]} connection errors")
    for mine, theirs in ratios:
        if mine in results and theirs in results:
            a = statistics.median(w.rate for w in results[mine])
            b = statistics.median(w.rate for w in results[theirs])
            print(f"  {mine} / {theirs}: {a / b:.2f}x" if b else f"  {theirs}: no requests")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="authd's PAM workers (default: authd's own, two per CPU, 4 to 16)")
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    stacks = args.stacks.split(",")
    if unknown := set(stacks) - set(STACKS):
        parser.error(f"unknown stacks: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        raise SystemExit("run as root on a throwaway machine: saslauthd and Dovecot use /etc/pam.d and real users")
    for program in ("saslauthd", "dovecot"):
        if shutil.which(program) is None:
            raise SystemExit(f"{program} is missing: apt-get install sasl2-bin dovecot-core")
    pam = {SERVICES["permit"]: PERMIT_LINES, SERVICES["unix"]: UNIX_LINES}
    with scratch_dir("authd-peers-", keep=args.keep) as root, system_pam_services(pam), local_user(USER, PASSWORD):
        os.chmod(root, 0o755)
        binary = build_loadgen(root)
        print(f"{args.conns} connections, {args.rounds} rounds of {args.seconds:g} s, authd workers = {args.workers or default_workers(os.cpu_count())}, "
              f"saslauthd -n 5; CPU/req = the serving processes' CPU; others = cores used by other processes")
        with Saslauthd(root / "sasl") as sasl, Dovecot(root / "dovecot") as dovecot, \
                Authd(root / "authd", args.workers, cache=False) as authd:
            load = Load(binary, args.conns, [sasl.pid])
            for stack in ("permit", "unix"):
                if stack not in stacks:
                    continue
                service = SERVICES[stack]
                cred = (USER, PASSWORD, service)
                targets = [
                    raw_target(root, service, os.cpu_count() or 2, [sasl.pid]),
                    Target("saslauthd -a pam -n 5", load.window(sasl.pid, "sasl", sasl.socket, *cred)),
                    Target("authd saslauthd socket", load.window(authd.pid, "sasl", authd.mux, *cred)),
                    Target("Dovecot auth (passdb pam)", load.window(dovecot.pid, "dovecot", dovecot.socket, *cred)),
                    Target("authd Dovecot socket", load.window(authd.pid, "dovecot", authd.dovecot, *cred)),
                    Target("authd native", load.window(authd.pid, "native", authd.socket, *cred)),
                ]
                results = run_stack(stack, targets, args.rounds, args.seconds)
                raw = targets[0].label
                report(f"{stack}: PAM service {service}", results, [
                    ("authd saslauthd socket", "saslauthd -a pam -n 5"),
                    ("authd Dovecot socket", "Dovecot auth (passdb pam)"),
                    ("authd native", "saslauthd -a pam -n 5"),
                    ("authd native", "Dovecot auth (passdb pam)"),
                    ("saslauthd -a pam -n 5", raw), ("Dovecot auth (passdb pam)", raw),
                    ("authd saslauthd socket", raw), ("authd Dovecot socket", raw), ("authd native", raw),
                ])
            if "ops" in stacks:
                with Client(authd.socket) as client:
                    token = client.auth(USER, PASSWORD, SERVICES["permit"], open_session=True)["session"]["token"]
                floor = "bare asyncio server, hello"
                with BareLoop(root / "bare") as bare:
                    targets = [
                        Target("authd session", load.window(authd.pid, "session", authd.socket, token)),
                        Target("authd check", load.window(authd.pid, "check", authd.socket, token, PERMISSION)),
                        Target("authd hello", load.window(authd.pid, "hello", authd.socket)),
                        Target(floor, load.window(bare.pid, "hello", bare.socket)),
                    ]
                    results = run_stack("ops", targets, args.rounds, args.seconds)
                report("ops: native protocol", results, [("authd hello", floor), ("authd session", floor),
                                                         ("authd check", floor)])
        if "cache" in stacks:
            service = SERVICES["unix"]
            cred = (USER, PASSWORD, service)
            peer, floor, raw = "saslauthd -a pam -n 5 -c", "bare asyncio server, saslauthd OK", "bare raw sockets, saslauthd OK"
            floor2, raw2 = f"{floor}, 2 loops", f"{raw}, 2 loops"
            with Saslauthd(root / "sasl-c", cache=True) as sasl, Authd(root / "authd-c", args.workers, cache=True) as authd, \
                    BareLoop(root / "bare", "saslauthd") as bare, BareLoop(root / "bare", "saslauthd-raw") as bare_raw, \
                    BareLoop(root / "bare", "saslauthd", 2) as bare2, BareLoop(root / "bare", "saslauthd-raw", 2) as bare_raw2:
                load = Load(binary, args.conns, [sasl.pid])
                targets = [
                    Target(peer, load.window(sasl.pid, "sasl", sasl.socket, *cred)),
                    Target("authd [cache] saslauthd socket", load.window(authd.pid, "sasl", authd.mux, *cred)),
                    Target("authd [cache] Dovecot socket", load.window(authd.pid, "dovecot", authd.dovecot, *cred)),
                    Target("authd [cache] native", load.window(authd.pid, "native", authd.socket, *cred)),
                    Target(floor, load.window(bare.pid, "sasl", bare.socket, *cred)),
                    Target(raw, load.window(bare_raw.pid, "sasl", bare_raw.socket, *cred)),
                    Target(floor2, load.window(bare2.pid, "sasl", bare2.socket, *cred)),
                    Target(raw2, load.window(bare_raw2.pid, "sasl", bare_raw2.socket, *cred)),
                ]
                results = run_stack("cache", targets, args.rounds, args.seconds)
                report(f"cache hits: PAM service {service}", results, [
                    ("authd [cache] saslauthd socket", peer), ("authd [cache] native", peer),
                    (floor, peer), (raw, peer), (floor2, peer), (raw2, peer), ("authd [cache] saslauthd socket", floor),
                ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
