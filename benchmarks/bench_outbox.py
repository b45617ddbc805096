"""What the durable event log costs a login: auth p99 with `event_log` on against off.

    python -m benchmarks.bench_outbox [--clients N] [--rate R] [--seconds S] [--rounds R]

Two real daemons side by side (pam_wrapper + pam_matrix, as the tests set it up), identical but
for `[daemon] event_log`: `on` (the default: every event committed to SQLite before the reply
that caused it leaves) and `off` (events only in memory, as before the outbox). Both have an
audit handler, so each login's events are written and delivered. N clients log in with a
session (two events each) at R logins per second in all, in rounds of S seconds alternating
between the two daemons; the figure is p99(on) / p99(off) over the pooled rounds, and the
median of the per-round ratios (goal: <= 1.05). It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from tests.pamenv import PamEnv

from .bench_handlers import PAM_SERVICE, SERVICE, load
from .harness import AuthdProcess, CpuMeter, cpu_note, ms, percentile, policy, report_errors, scratch_dir
from .pamstack import REPO

AUDIT = '\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n'


class Authd(AuthdProcess):
    def __init__(self, root: Path, users: dict[str, str], workers: int, event_log: bool) -> None:
        pam = PamEnv.create(root / "pam")
        pam.add_service(PAM_SERVICE)
        for user, password in users.items():
            pam.add_user(user, password, PAM_SERVICE)
        super().__init__(root, {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **pam.env()}, grace=30.0)
        self.config.write_text(policy(socket=self.socket, workers=workers, service=SERVICE, pam_service=PAM_SERVICE,
                                      daemon=f"event_log = {str(event_log).lower()}\n") + AUDIT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_outbox", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, one user each (default 8)")
    parser.add_argument("--rate", type=float, default=200.0, help="logins per second in all; 0 = max (default 200)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one round (default 3)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per daemon, interleaved (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="PAM workers (default 2)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.workers < 1 or args.seconds <= 0 or args.rate < 0:
        parser.error("--clients, --rounds and --workers must be >= 1, --seconds > 0 and --rate >= 0")
    users = {f"bench{i}": f"bench-pass-{i}" for i in range(1, args.clients + 1)}
    with ExitStack() as stack:
        daemons = {
            name: stack.enter_context(Authd(stack.enter_context(scratch_dir(f"authd-bo-{name}-")), users, args.workers, on))
            for name, on in (("on", True), ("off", False))
        }
        print(f"pam_matrix via pam_wrapper, workers={args.workers}, clients={args.clients}, "
              f"rate={f'{args.rate:g}/s' if args.rate else 'max'}, {args.rounds} x {args.seconds:g} s per daemon, "
              "open_session=true, an audit handler", flush=True)
        pooled: dict[str, list[float]] = {name: [] for name in daemons}
        p99s: dict[str, list[float]] = {name: [] for name in daemons}
        errors: Counter[str] = Counter()
        for authd in daemons.values():
            asyncio.run(load(authd.socket, users, 1.0, args.rate))  # warm-up
        for round_no in range(1, args.rounds + 1):
            for name, authd in daemons.items():
                meter = CpuMeter()
                latencies, errs = asyncio.run(load(authd.socket, users, args.seconds, args.rate))
                pooled[name] += latencies
                p99s[name].append(percentile(latencies, 99))
                errors.update(errs)
                print(f"  round {round_no} event_log={name:<3} {len(latencies) / args.seconds:7.0f} auth/s"
                      f"  p50 {ms(percentile(latencies, 50))}  p99 {ms(percentile(latencies, 99))}"
                      f"   ({cpu_note(meter.cores())})", flush=True)
        print("pooled:")
        for name, latencies in pooled.items():
            print(f"  event_log={name:<3} n={len(latencies):<7} {len(latencies) / (args.rounds * args.seconds):7.0f} auth/s"
                  f"  p50 {ms(percentile(latencies, 50))}  p99 {ms(percentile(latencies, 99))}")
        ratio = percentile(pooled["on"], 99) / percentile(pooled["off"], 99)
        paired = sorted(on / off for on, off in zip(p99s["on"], p99s["off"]))
        print(f"p99 with the event log / without: {ratio:.3f} pooled, {statistics.median(paired):.3f} median of the"
              f" rounds (range {paired[0]:.2f} .. {paired[-1]:.2f}); goal <= 1.05")
        report_errors(errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
