"""The daemon's services: the current policy and the components every request uses.

One `Runtime` per process, complete once constructed: nothing is attached to it later.
Requests read `runtime.policy` once and keep that snapshot, so a reload (which only the
lifecycle performs) that swaps it mid-request cannot mix two generations.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

from . import securefs
from .authflow import AuthCore
from .cache import CredentialCache
from .errors import ConfigError
from .config import Daemon
from .events import Event, EventBus
from .events.outbox import FILENAME as OUTBOX_FILE, Outbox
from .events.retention import Retention
from .metrics import Decisions
from .pam.pool import PamPool
from .policy import Policy
from .stores import build as build_stores


class Runtime:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.boot_policy = policy  # what the sockets, workers and state dir were built from
        self.counters: Counter[str] = Counter()
        daemon = policy.daemon
        prepare_state_dir(policy)
        self.pam = PamPool(size=daemon.workers or default_workers(os.cpu_count()), max_calls=daemon.worker_max_calls, timeout=daemon.pam_timeout,
                           keep_modules=daemon.pam_keep_modules)
        self.sessions, self.lockout, cache_drops = build_stores(policy)
        outbox = Outbox(policy.state_dir / OUTBOX_FILE if daemon.event_log else None, event_retention(daemon))
        self.bus = EventBus(outbox, queue_size=daemon.event_queue, handler_timeout=daemon.handler_timeout)
        self.cache = CredentialCache(policy.config.cache)
        self.decisions = Decisions()  # auth latency by service, protocol and result, for metrics
        self.draining = asyncio.Event()
        self.core = AuthCore(
            policy=lambda: self.policy, pam=self.pam, lockout=self.lockout, sessions=self.sessions,
            emit=self.bus.emit, counters=self.counters, delay=self.delay, cache=self.cache, decisions=self.decisions,
            cache_drops=cache_drops,
        )

    async def start(self) -> None:
        await self.sessions.start()
        await self.bus.start()
        self.bus.set_handlers(list(self.policy.handlers))
        await self.pam.start()

    def emit(self, name: str, **fields: Any) -> None:
        self.bus.emit(Event.create(name, **fields))

    async def delay(self, seconds: float) -> None:
        """A failed login's wait: only this client waits, and a drain cuts it short."""
        if seconds <= 0 or self.draining.is_set():
            return
        try:
            async with asyncio.timeout(seconds):
                await self.draining.wait()
        except TimeoutError:
            pass


def default_workers(cpus: int | None) -> int:
    """``[daemon] workers = 0``: two per CPU (``os.cpu_count()``, None if unknown), at least 4, at most 16.

    More workers than cores keep one ready whenever the event loop has a login to hand out, so a
    cheap stack (pam_permit, a warm pam_sss) is not held to the loop's and a worker's turns
    alternating: on 2 cores, 4 workers served ~15% more pam_permit logins than 2 (bench_peers).
    They also mean more PAM calls at once: more load on a remote back end (LDAP, sssd, a KDC),
    ~10 MB each, and for a memory-hard hash (yescrypt) a few percent lost to hashes competing
    for the CPU caches (pam_unix: 0.95x the raw loop with 4 workers on 2 cores, 0.96-0.98x with
    2). Set `workers` to the CPU count where only such a stack is used.
    """
    return min(16, max(4, 2 * (cpus or 1)))


def event_retention(daemon: Daemon) -> Retention:
    return Retention(max_age=daemon.event_log_max_age, max_events=daemon.event_log_max_events)


def prepare_state_dir(policy: Policy) -> None:
    """Create the state dir 0700; refuse one that another user owns or may write (a planted DB)."""
    try:
        securefs.make_dir(policy.state_dir, "daemon.state_dir")
    except OSError as exc:
        raise ConfigError(f"daemon.state_dir: cannot use {policy.state_dir}: {exc.strerror}") from None
