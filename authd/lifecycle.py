"""Signals and the daemon's states: the one place that turns intent into action.

Signal handlers only record what was asked ("at least once since you last looked") and wake
the lifecycle task; that task reloads, dumps, reports or drains, one thing at a time. States:
starting -> ready <-> reloading -> draining -> stopped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import structlog

from . import logs, systemd
from .dump import dump_sessions
from .errors import ConfigError
from .events import model as events
from .ops import closed
from .policy import Policy
from .runtime import DRAINING, READY, RELOADING, STOPPED, Runtime
from .securefs import UnsafePath
from .server import Server
from .sessions import Session

log = structlog.get_logger("authd.lifecycle")

RELOAD, DUMP, STATUS, DRAIN = "reload", "dump", "status", "drain"
SWEEP_SLICE = 10_000  # sessions checked per event-loop turn by the expiry sweep
_INTENTS = {signal.SIGHUP: RELOAD, signal.SIGUSR1: DUMP, signal.SIGUSR2: STATUS, signal.SIGTERM: DRAIN, signal.SIGINT: DRAIN}


class Lifecycle:
    def __init__(self, rt: Runtime, server: Server) -> None:
        self.rt = rt
        self.server = server
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        rt.lifecycle = self

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in _INTENTS:
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        intent = _INTENTS[signum]
        if intent == DRAIN and (DRAIN in self._pending or self.rt.state == DRAINING):
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
                log.info("status", **self.rt.status())

    def _set_ready(self) -> None:
        self.rt.state = READY
        status = f"serving, policy generation {self.rt.policy.generation}"
        if self.rt.reload_error:
            status = f"reload failed: {self.rt.reload_error}"
        systemd.notify("READY=1", f"STATUS={status}")

    async def reload(self) -> Policy:
        """The one reload routine: SIGHUP and `authctl reload` both come here."""
        self.rt.state = RELOADING
        systemd.notify_reloading()
        try:
            return await self.rt.reload()
        finally:
            logs.stream.reopen()
            if self.rt.state == RELOADING:
                self._set_ready()

    async def dump(self) -> None:
        started = time.monotonic()
        state_dir = self.rt.boot_policy.state_dir
        try:
            path, by_service = await dump_sessions(self.rt.sessions.all(), state_dir, self.rt.policy.daemon.dump_keep, os.getpid())
        except (OSError, UnsafePath) as exc:
            log.error("session dump failed", error=str(exc))
            return
        log.info("sessions dumped", path=str(path), count=sum(by_service.values()), by_service=by_service,
                 seconds=round(time.monotonic() - started, 3))

    async def drain(self) -> int:
        """Stop accepting, answer what was received, flush events, persist; bounded by drain_timeout."""
        rt = self.rt
        rt.state = DRAINING
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
        rt.sessions.close()
        rt.lockout.close()
        rt.state = STOPPED
        log.info("stopped", forced=forced, undelivered_events=undelivered)
        return 1 if forced else 0

    async def _sweep_sessions(self) -> None:
        """Expire sessions in the background so `session.closed(expired)` is emitted on time.

        The table is checked a slice per loop turn: a million sessions take a quarter of a
        second to check, which in one go would stall every request for that long.
        """
        while True:
            await asyncio.sleep(self.rt.policy.daemon.sweep_interval)
            now = time.time()
            table = self.rt.sessions.all()
            due: list[Session] = []
            for start in range(0, len(table), SWEEP_SLICE):
                due += [s for s in table[start : start + SWEEP_SLICE] if s.expired(now)]
                await asyncio.sleep(0)
            closed(self.rt, self.rt.sessions.expire(now, due), "expired")

    async def _watchdog(self, interval: float) -> None:
        """Pinged from the loop itself: a wedged loop stops the pings and systemd restarts us."""
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
