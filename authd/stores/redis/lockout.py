"""The fleet lockout: every host reserves from the same budgets in Redis, so at most
`max_failures` distinct guesses reach PAM however the attempts are spread over hosts.

Reservation and verdict are one Lua script each (`scripts.RESERVE`, `scripts.FINISH`). A slot
is held under a lease (`[store] lease`, longer than pam_timeout) so a host that dies mid-PAM
frees its slots when the lease runs out. Guesses are named by an HMAC under the fleet key
(`secret_file`), so one typo made on two hosts counts once.

When Redis is down or slow, `on_store_error = "local"` (the default) hands the attempt to
this host's own engine: still race-free per host, but the fleet's limit degrades to hosts x
max_failures until Redis returns; `"closed"` refuses with `unavailable` instead. An attempt
begun in Redis whose verdict cannot be recorded loses that one failure (its slot's lease ends).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from ...lockout import Attempt, LockInfo, Locked, Lockout, LockoutConfig
from ...lockout import scopes
from ...lockout.config import Exemptions, Limit, user_key
from ...lockout.table import Scope
from .. import StoreUnavailable
from ..config import StoreConfig
from . import scripts
from .link import Link

log = structlog.get_logger("authd.lockout")
POLL = (0.005, 0.015)  # while the budget is held by attempts in flight (anywhere), retry this often

Budget = tuple[Scope, str, Limit]


class FleetAttempt(Attempt):
    __slots__ = ("budgets", "held")

    def __init__(self, user: str, fingerprint: bytes, budgets: list[Budget], held: list[bool]) -> None:
        super().__init__(user, fingerprint, [])
        self.budgets = budgets
        self.held = held


class FleetLockout:
    def __init__(self, link: Link, config: StoreConfig, lockout: LockoutConfig, secret: bytes, local: Lockout, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._link = link
        self._store = config
        self._secret = secret
        self._local = local
        self._sleep = sleep
        self._reserve = link.script(scripts.RESERVE)
        self._finish = link.script(scripts.FINISH)
        self._inspect = link.script(scripts.INSPECT)
        self.fallbacks = 0
        self.configure(lockout)

    @property
    def config(self) -> LockoutConfig:
        return self._config

    @property
    def storage_error(self) -> str | None:
        return None if self._link.up else f"redis: {self._link.error}"

    def stats(self) -> dict[str, Any]:
        local = self._local.stats()
        return {"backend": "redis", "store": "ok" if self._link.up else "down", "on_store_error": self._store.on_store_error,
                "fallbacks": self.fallbacks, "evicted": local["evicted"], "refused_full": local["refused_full"], "local": local}

    def census(self) -> dict[Scope, tuple[int, int]]:
        """The fleet's keys live in Redis; this host counts those of its fallback engine."""
        return self._local.census()

    @property
    def locks_imposed(self) -> Mapping[Scope, int]:
        return self._local.locks_imposed

    def configure(self, config: LockoutConfig) -> None:
        self._config = config
        self._exempt = Exemptions(config)
        self._local.configure(config)

    async def begin(self, user: str, rhost: str | None, password: str) -> Attempt | Locked:
        ukey = user_key(user)
        fingerprint = scopes.fingerprint(self._secret, ukey, password)
        budgets = scopes.enforced(self._config, self._exempt, ukey, rhost)
        if not budgets:
            return FleetAttempt(ukey, fingerprint, [], [])
        keys = [self._key(scope, name) for scope, name, _ in budgets]
        args = [fingerprint.hex(), self._store.lease, *self._limits(budgets, None)]
        try:
            while True:
                reply = await self._link.run(lambda: self._reserve(keys=keys, args=args))
                verdict = reply[0].decode()
                if verdict == "ok":
                    return FleetAttempt(ukey, fingerprint, budgets, [flag == b"1" for flag in reply[1:]])
                if verdict == "locked":
                    scope = budgets[int(reply[1]) - 1][0]
                    return _locked(scope, budgets[int(reply[1]) - 1][1], *reply[2:], now=time.time())
                await self._sleep(random.uniform(*POLL))
        except StoreUnavailable:
            if self._store.on_store_error == "closed":
                raise
            self.fallbacks += 1
            return await self._local.begin(user, rhost, password)

    def untouched(self, user: str, rhost: str | None) -> bool:
        """The fleet's budgets are in Redis: only a round trip knows, so never said here."""
        return False

    async def finish(self, attempt: Attempt, success: bool) -> tuple[Locked, ...]:
        if not isinstance(attempt, FleetAttempt):
            return self._local.finish(attempt, success)
        return await self._end(attempt, "ok" if success else "fail")

    async def cancel(self, attempt: Attempt) -> None:
        if not isinstance(attempt, FleetAttempt):
            self._local.cancel(attempt)
            return
        await self._end(attempt, "cancel")

    async def _end(self, attempt: FleetAttempt, verdict: str) -> tuple[Locked, ...]:
        if attempt._done or not attempt.budgets:
            return ()
        attempt._done = True
        keys = [self._key(scope, name) for scope, name, _ in attempt.budgets]
        args = [attempt._fingerprint.hex(), verdict, *self._limits(attempt.budgets, attempt.held)]
        try:
            rows = await self._link.run(lambda: self._finish(keys=keys, args=args))
        except StoreUnavailable:
            log.error("lockout verdict not recorded in redis; its slot frees when the lease ends", verdict=verdict)
            return ()
        locks = []
        for index, since, until, strikes in rows:
            scope, name, _ = attempt.budgets[int(index) - 1]
            locks.append(_locked(scope, name, since, until, strikes, now=float(since)))
        return tuple(locks)

    async def lockouts(self) -> list[LockInfo]:
        rows = []
        async for raw in self._link.client.scan_iter(match=f"{self._link.prefix}lo:*:l", count=1000):
            scope, _, name = raw.decode()[len(self._link.prefix) + 4 : -3].partition(":")
            if scope in scopes.SCOPES:
                rows.append(await self._info(scope, name))  # type: ignore[arg-type]
        async for raw in self._link.client.scan_iter(match=f"{self._link.prefix}lo:*:f", count=1000):
            scope, _, name = raw.decode()[len(self._link.prefix) + 4 : -3].partition(":")
            if scope in scopes.SCOPES and not any(r.scope == scope and r.key == name for r in rows):
                rows.append(await self._info(scope, name))  # type: ignore[arg-type]
        return sorted((r for r in rows if r.failures or r.locked), key=lambda r: (r.scope, r.key))

    async def unlock(self, name: str, scope: Scope | None = None) -> bool:
        cleared = False
        for each in (scope,) if scope else scopes.SCOPES:
            key = user_key(name) if each == "user" else scopes.listed_rhost(name, self._config.ipv6_prefix)
            base = self._key(each, key)
            if await self._link.run(lambda: self._link.client.delete(base + "f", base + "l")):
                log.info("lockout cleared", scope=each, key=key)
                cleared = True
        return self._local.unlock(name, scope) or cleared

    async def close(self) -> None:
        self._local.close()
        await self._link.close()

    async def _info(self, scope: Scope, name: str) -> LockInfo:
        base = self._key(scope, name)
        n, since, until, strikes, now = await self._link.run(
            lambda: self._inspect(keys=[base], args=[scopes.limit(self._config, scope).interval]))
        now = float(now)
        locked = bool(since) and (not until or float(until) > now)
        lock = _locked(scope, name, since, until, strikes, now=now) if locked else None
        return LockInfo(scope=scope, key=name, failures=int(n), locked=locked, locked_at=lock.locked_at if lock else None,
                        until=lock.until if lock else None, retry_after=lock.retry_after if lock else None,
                        lock_count=int(strikes))

    def _key(self, scope: Scope, name: str) -> str:
        return f"{self._link.prefix}lo:{{{scope}:{name}}}:"

    def _limits(self, budgets: list[Budget], held: list[bool] | None) -> list[Any]:
        config = self._config
        args: list[Any] = []
        for i, (scope, _, limit) in enumerate(budgets):
            args += [int(held[i]) if held else 0, limit.max_failures, limit.interval, limit.lock_time, int(limit.permanent),
                     int(config.progressive), config.max_lock_time, int(scope == "user")]
        return args


def _locked(scope: Scope, name: str, since: bytes | str, until: bytes | str, strikes: bytes | int, *, now: float) -> Locked:
    since_f = float(since)
    until_f = float(until) if until not in (b"", "") else None
    retry = None if until_f is None else max(1, math.ceil(until_f - now))
    return Locked(scope=scope, key=name, locked_at=since_f, until=until_f, retry_after=retry, lock_count=int(strikes))
