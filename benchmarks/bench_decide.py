"""The event loop's share of one login, part by part: the auth decision in process.

    python -m benchmarks.bench_decide [--logins N] [--concurrency C] [--rounds R]

Builds a real `Runtime` (lockout, sessions, credential cache, the event bus with its on-disk
outbox, structlog writing JSON to a file) from a scratch authd.toml, and runs the
protocol-neutral decision (`AuthCore.decide`) with a PAM stand-in that answers at once, C
logins at a time, each followed by the wait for its events' commit (what a front end does
before it replies). Printed: the event-loop thread's CPU per login (`time.thread_time`; the
outbox writer's thread is not in it), first with everything, then with one part left out at a
time, so each difference is what that part costs the loop (medians of R interleaved rounds;
the parts overlap a little, e.g. fewer events also mean fewer hand-overs of the GIL):

- ``events``: the auth.succeeded event: built, appended to the outbox, and waited for;
- ``lockout``: reserving and settling the user's and the rhost's budgets;
- ``log line``: the ``auth succeeded`` line (log level ``warning`` leaves it out).

Not in these figures: reading and decoding the request, the worker round trip, encoding and
writing the reply (``bench_peers`` measures the whole). It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from authd import logs, policy as policy_mod
from authd.authflow import AuthCore
from authd.outcome import AuthRequest
from authd.pam.binding import PamResult
from authd.peer import Peer
from authd.runtime import Runtime

GRANTED = PamResult(outcome="ok", pam_code=0, stage="acct_mgmt", groups=("staff",))
PEER = Peer(pid=4242, uid=1000, gid=1000, groups=frozenset())
REQUEST = AuthRequest(user="alice", password="not-a-real-password", service="bench", rhost="192.0.2.17")


class InstantPam:
    """Grants every call at once: the worker round trip is not what is measured here."""

    async def authenticate(self, *args: Any, **kwargs: Any) -> PamResult:
        return GRANTED

    async def account(self, *args: Any, **kwargs: Any) -> PamResult:
        return GRANTED


class AdmitAll:
    """A lockout that reserves nothing and never refuses: the decision without its budgets."""

    async def begin(self, user: str, rhost: str | None, password: str) -> object:
        return object()

    async def finish(self, attempt: object, success: bool) -> tuple[()]:
        return ()

    async def cancel(self, attempt: object) -> None:
        return None


async def measure(root: Path, part: str, logins: int, concurrency: int) -> float:
    """Loop-thread CPU seconds per login with `part` left out ("" for none)."""
    root.mkdir()
    (root / "authd.toml").write_text(
        f'[daemon]\nsocket = "{root}/authd.sock"\nstate_dir = "state"\n'
        f'log_level = "{"warning" if part == "log line" else "info"}"\n'
        '[[service]]\nname = "bench"\npam_service = "other"\nfailure_delay = 0.0\n'
    )
    policy = policy_mod.load(root / "authd.toml", 1)
    logs.configure(level=policy.daemon.log_level, fmt="json", path=str(root / "authd.log"))
    rt = Runtime(policy)
    await rt.sessions.start()
    await rt.bus.start()
    core = AuthCore(
        policy=lambda: rt.policy, pam=InstantPam(), lockout=AdmitAll() if part == "lockout" else rt.lockout,  # type: ignore[arg-type]
        sessions=rt.sessions, emit=(lambda event: None) if part == "events" else rt.bus.emit, counters=rt.counters,
        delay=rt.delay, cache=rt.cache,
    )

    async def client(count: int) -> None:
        for _ in range(count):
            await core.decide(PEER, REQUEST)
            await rt.bus.durable()

    await client(200)  # warm up
    started = time.thread_time()
    await asyncio.gather(*(client(logins // concurrency) for _ in range(concurrency)))
    spent = time.thread_time() - started
    await rt.bus.close(5.0)
    await rt.lockout.close()
    await rt.sessions.close()
    return spent / (logins // concurrency * concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logins", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    parts = ("", "events", "lockout", "log line")
    spent: dict[str, list[float]] = {part: [] for part in parts}
    with TemporaryDirectory(prefix="authd-decide-") as tmp:
        for number in range(args.rounds):  # interleaved, rotated: a noisy minute hits every variant
            for part in parts[number % len(parts):] + parts[:number % len(parts)]:
                root = Path(tmp) / f"{number}-{part.replace(' ', '-') or 'full'}"
                spent[part].append(asyncio.run(measure(root, part, args.logins, args.concurrency)))
    full = statistics.median(spent[""])
    print(f"AuthCore.decide + the wait for its events, {args.concurrency} at a time; median of {args.rounds} rounds "
          f"of {args.logins} logins")
    print(f"  {'everything':<22} {full * 1e6:7.1f} us of loop CPU per login "
          f"(rounds {min(spent['']) * 1e6:.0f}-{max(spent['']) * 1e6:.0f})")
    for part in parts[1:]:
        without = statistics.median(spent[part])
        print(f"  {'without ' + part:<22} {without * 1e6:7.1f} us   (so {part}: {(full - without) * 1e6:5.1f} us)")


if __name__ == "__main__":
    main()
