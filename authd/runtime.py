"""The daemon's live state: the current policy and the components every request uses.

One `Runtime` per process. Requests read `runtime.policy` once and keep that snapshot, so a
reload that swaps it mid-request cannot mix two generations.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from . import PROTOCOL_VERSION, __version__, policy as policy_mod
from .errors import ConfigError
from .events import Event, EventBus, model as events
from .lockout import Lockout
from .metrics import Decisions
from .pam.pool import PamPool
from .policy import Policy
from .sessions import SessionStore

if TYPE_CHECKING:
    from .lifecycle import Lifecycle

log = structlog.get_logger("authd.runtime")

STARTING, READY, RELOADING, DRAINING, STOPPED = "starting", "ready", "reloading", "draining", "stopped"


class Runtime:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.boot_policy = policy  # what the sockets, workers and state dir were built from
        self.state = STARTING
        self.started_at = time.time()
        self.counters: Counter[str] = Counter()
        self.reload_error: str | None = None
        self.restart_required: list[str] = []
        self.last_reload: float | None = None
        daemon = policy.daemon
        prepare_state_dir(policy)
        self.pam = PamPool(size=daemon.workers or (os.cpu_count() or 1), max_calls=daemon.worker_max_calls, timeout=daemon.pam_timeout)
        self.sessions = SessionStore(policy.state_dir / "sessions.db")
        self.lockout = Lockout(policy.config.lockout, policy.state_dir / "lockout.db")
        self.bus = EventBus(queue_size=daemon.event_queue, handler_timeout=daemon.handler_timeout)
        self.decisions = Decisions()  # auth latency by service and result, for metrics
        self.draining = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.lifecycle: Lifecycle | None = None  # set by Lifecycle; ops use it for `reload`
        self.connection_stats: Callable[[], dict[str, int]] = dict  # set by the Server

    async def start(self) -> None:
        self.sessions.open()
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

    async def reload(self) -> Policy:
        """Build the whole new policy off the loop, then swap it in at once.

        Raises ConfigError with the old policy still serving. Concurrent callers (a burst of
        SIGHUPs, `authctl reload`) queue on one lock; each reload reads the file afresh.
        """
        async with self._reload_lock:
            old = self.policy
            try:
                new = await asyncio.to_thread(policy_mod.load, old.source, old.generation + 1)
            except Exception as exc:
                if not isinstance(exc, ConfigError):  # a bug must cost the reload, never the daemon
                    log.exception("reload crashed; previous policy kept")
                    exc = ConfigError(f"{old.source}: reload failed unexpectedly ({exc.__class__.__name__}); see the log")
                self.bus.reopen()  # the old handlers stay; SIGHUP still means "reopen your files"
                self.reload_error = str(exc)
                self.counters["reloads_failed"] += 1
                log.error("reload failed; previous policy kept", error=str(exc), generation=old.generation)
                self.emit(events.POLICY_RELOAD_FAILED, reason=str(exc), generation=old.generation)
                raise exc from None
            ignored = policy_mod.restart_only_changes(self.boot_policy, new)
            self.policy = new
            self.lockout.configure(new.config.lockout)
            self.bus.handler_timeout = new.daemon.handler_timeout  # read by the new handlers' workers
            self.bus.queue_size = new.daemon.event_queue
            self.bus.set_handlers(list(new.handlers), retire_within=new.daemon.drain_timeout)
            self.reload_error = None
            self.restart_required = ignored
            self.last_reload = time.time()
            self.counters["reloads"] += 1
            log.info("policy reloaded", generation=new.generation, source=str(new.source), restart_required=ignored or None)
            self.emit(events.POLICY_RELOADED, generation=new.generation, reason=_restart_note(ignored))
            return new

    def status(self) -> dict[str, Any]:
        return {
            "server": "authd",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "state": self.state,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "generation": self.policy.generation,
            "policy": str(self.policy.source),
            "last_reload": self.last_reload,
            "last_reload_error": self.reload_error,
            "restart_required": self.restart_required,
            "counters": dict(sorted(self.counters.items())),
            "connections": self.connection_stats(),
            "sessions": len(self.sessions),
            "session_store_error": self.sessions.persist_error,
            "pam": self.pam.stats(),
            "lockout": self._lockout_summary(),
            "events": self.bus.stats(),
        }

    def _lockout_summary(self) -> dict[str, Any]:
        rows = self.lockout.lockouts()
        return {"locked": sum(r.locked for r in rows), "tracked": len(rows), "storage_error": self.lockout.storage_error}


def prepare_state_dir(policy: Policy) -> None:
    """Create the state dir 0700; refuse one that others may write (they could plant a DB)."""
    path = policy.state_dir
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode
    if mode & 0o022:
        raise ConfigError(f"daemon.state_dir: {path} is writable by group or others (mode {mode & 0o777:o}); chmod 700 it")


def _restart_note(ignored: list[str]) -> str | None:
    return f"restart required to apply: {', '.join(ignored)}" if ignored else None
