"""Signals and the daemon's states: the one place that turns intent into action.

Signal handlers only record what was asked ("at least once since you last looked") and wake
the lifecycle task; that task reloads, dumps, reports or drains, one thing at a time. States:
starting -> ready <-> reloading -> draining -> stopped. The reload itself (build the new
policy, swap it in, reconfigure the services) and `status` live here too, so the ops reach
them through this object (`ops.Control`) and the runtime holds no state machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import msgspec
import structlog

from . import PROTOCOL_VERSION, __version__, logs, policy as policy_mod, protocol as p, systemd
from .dump import dump_sessions
from .errors import ConfigError
from .events import model as events
from .ops import closed
from .policy import Policy
from .runtime import Runtime, event_retention
from .securefs import UnsafePath
from .server import Server
from .stores import StoreUnavailable

log = structlog.get_logger("authd.lifecycle")

STARTING, READY, RELOADING, DRAINING, STOPPED = "starting", "ready", "reloading", "draining", "stopped"
RELOAD, DUMP, STATUS, DRAIN = "reload", "dump", "status", "drain"
_INTENTS = {signal.SIGHUP: RELOAD, signal.SIGUSR1: DUMP, signal.SIGUSR2: STATUS, signal.SIGTERM: DRAIN, signal.SIGINT: DRAIN}


class Lifecycle:
    def __init__(self, rt: Runtime, server: Server) -> None:
        self.rt = rt
        self.server = server
        self.state = STARTING
        self.started_at = time.time()
        self.reload_error: str | None = None
        self.restart_required: list[str] = []
        self.last_reload: float | None = None
        self._reload_lock = asyncio.Lock()
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in _INTENTS:
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        intent = _INTENTS[signum]
        if intent == DRAIN and (DRAIN in self._pending or self.state == DRAINING):
            self._exit_now(signum)
        self._pending.add(intent)
        self._wake.set()

    def _exit_now(self, signum: int) -> None:
        """A second TERM/INT: the operator means it. Kill the workers and go."""
        log.warning("second stop signal; exiting immediately", signal=signal.Signals(signum).name)
        self.rt.pam.kill()
        logs.stream.flush()
        os._exit(128 + signum)

    async def run(self) -> int:
        """Mark the daemon ready, then act on intents until a drain finishes; returns exit code."""
        self._set_ready()
        self._tasks.append(asyncio.create_task(self._sweep_sessions()))
        if (interval := systemd.watchdog_interval()) is not None:
            self._tasks.append(asyncio.create_task(self._watchdog(interval)))
        while True:
            await self._wake.wait()
            self._wake.clear()
            intents, self._pending = self._pending, set()
            if DRAIN in intents:
                return await self.drain()
            if RELOAD in intents:
                try:
                    await self.reload()
                except ConfigError:
                    pass
            if DUMP in intents:
                await self.dump()
            if STATUS in intents:
                log.info("status", **msgspec.to_builtins(self.status()))

    def _set_ready(self) -> None:
        self.state = READY
        status = f"serving, policy generation {self.rt.policy.generation}"
        if self.reload_error:
            status = f"reload failed: {self.reload_error}"
        systemd.notify("READY=1", f"STATUS={status}")

    async def reload(self) -> Policy:
        """The one reload routine: SIGHUP and `authctl reload` both come here.

        Builds the whole new policy off the loop, then swaps it in at once. Raises ConfigError
        with the old policy still serving. Concurrent callers (a burst of SIGHUPs, `authctl
        reload`) queue on one lock; each reload reads the file afresh.
        """
        async with self._reload_lock:
            self.state = RELOADING
            systemd.notify_reloading()
            try:
                return await self._reload()
            finally:
                logs.stream.reopen()
                if self.state == RELOADING:
                    self._set_ready()

    async def _reload(self) -> Policy:
        rt = self.rt
        old = rt.policy
        try:
            new = await asyncio.to_thread(policy_mod.load, old.source, old.generation + 1, state_dir=rt.boot_policy.state_dir)
        except Exception as exc:
            if not isinstance(exc, ConfigError):  # a bug must cost the reload, never the daemon
                log.exception("reload crashed; previous policy kept")
                exc = ConfigError(f"{old.source}: reload failed unexpectedly ({exc.__class__.__name__}); see the log")
            rt.bus.reopen()  # the old handlers stay; SIGHUP still means "reopen your files"
            self.reload_error = str(exc)
            rt.counters["reloads_failed"] += 1
            log.error("reload failed; previous policy kept", error=str(exc), generation=old.generation)
            rt.emit(events.POLICY_RELOAD_FAILED, reason=str(exc), generation=old.generation)
            raise exc from None
        ignored = policy_mod.restart_only_changes(rt.boot_policy, new)
        rt.policy = new
        rt.lockout.configure(new.config.lockout)
        rt.cache.configure(new.config.cache)
        rt.bus.handler_timeout = new.daemon.handler_timeout  # read by the new handlers' workers
        rt.bus.queue_size = new.daemon.event_queue
        rt.bus.outbox.retention = event_retention(new.daemon)
        rt.bus.set_handlers(list(new.handlers), retire_within=new.daemon.drain_timeout)
        self.reload_error = None
        self.restart_required = ignored
        self.last_reload = time.time()
        rt.counters["reloads"] += 1
        log.info("policy reloaded", generation=new.generation, source=str(new.source), restart_required=ignored or None)
        rt.emit(events.POLICY_RELOADED, generation=new.generation, reason=_restart_note(ignored))
        return new

    def status(self) -> p.StatusReply:
        rt = self.rt
        return p.StatusReply(
            server="authd", version=__version__, protocol=PROTOCOL_VERSION, state=self.state, pid=os.getpid(),
            uptime=round(time.time() - self.started_at, 3), generation=rt.policy.generation,
            policy=str(rt.policy.source), last_reload=self.last_reload, last_reload_error=self.reload_error,
            restart_required=self.restart_required, counters=dict(sorted(rt.counters.items())),
            connections=self.server.stats(), sessions=len(rt.sessions), session_store_error=rt.sessions.persist_error,
            pam=rt.pam.stats(),
            lockout={**rt.lockout.stats(), "storage_error": rt.lockout.storage_error},
            events=rt.bus.stats(), store=rt.sessions.state(),
        )

    async def dump(self) -> None:
        started = time.monotonic()
        state_dir = self.rt.boot_policy.state_dir
        try:
            path, by_service = await dump_sessions(await self.rt.sessions.all(), state_dir, self.rt.policy.daemon.dump_keep, os.getpid())
        except (OSError, UnsafePath) as exc:
            log.error("session dump failed", error=str(exc))
            return
        log.info("sessions dumped", path=str(path), count=sum(by_service.values()), by_service=by_service,
                 seconds=round(time.monotonic() - started, 3))

    async def drain(self) -> int:
        """Stop accepting, answer what was received, flush events, persist; bounded by drain_timeout."""
        rt = self.rt
        self.state = DRAINING
        systemd.notify("STOPPING=1", "STATUS=draining")
        log.info("draining", connections=len(self.server.connections), timeout=rt.policy.daemon.drain_timeout)
        rt.emit(events.DAEMON_DRAINING)
        rt.draining.set()
        for task in self._tasks:
            task.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + rt.policy.daemon.drain_timeout
        forced = False
        try:
            async with asyncio.timeout_at(deadline):
                await self.server.drain()
        except TimeoutError:
            forced = True
            log.error("drain deadline passed; dropping connections and killing PAM workers",
                      connections=len(self.server.connections))
            self.server.abort()
        await rt.pam.close(max(0.0, deadline - loop.time()) if not forced else 0.0)
        rt.emit(events.DAEMON_STOPPED, reason="forced" if forced else "drained")
        undelivered = await rt.bus.close(max(0.5, deadline - loop.time()))
        await rt.sessions.close()
        await rt.lockout.close()
        self.state = STOPPED
        log.info("stopped", forced=forced, undelivered_events=undelivered)
        return 1 if forced else 0

    async def _sweep_sessions(self) -> None:
        """Expire sessions in the background so `session.closed(expired)` is emitted on time
        (by one host of a fleet: the store hands each expired session to one sweeper)."""
        while True:
            await asyncio.sleep(self.rt.policy.daemon.sweep_interval)
            try:
                closed(self.rt, await self.rt.sessions.sweep(time.time()), "expired")
            except StoreUnavailable:
                pass  # the store's state (and the fault) shows in `status`; the next sweep retries

    async def _watchdog(self, interval: float) -> None:
        """Pinged from the loop itself: a wedged loop stops the pings and systemd restarts us."""
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _restart_note(ignored: list[str]) -> str | None:
    return f"restart required to apply: {', '.join(ignored)}" if ignored else None
