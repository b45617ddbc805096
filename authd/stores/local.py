"""The single-host backend: the in-memory session table and lockout engine behind the async
protocols. Both answer from memory and write through to SQLite in the state dir, in a writer
thread; a change a reply reports (a session issued or ended, a failure counted, a lock lifted)
is on disk before the reply leaves. A touch is not waited for: it only moves an idle expiry."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from ..lockout import Attempt, LockInfo, Locked, Lockout, LockoutConfig
from ..lockout.table import Scope
from ..sessions import Session, SessionStore

SWEEP_SLICE = 10_000  # sessions checked per event-loop turn by the expiry sweep


class LocalSessions:
    in_memory = True

    def __init__(self, table: SessionStore) -> None:
        self.table = table

    @property
    def persist_error(self) -> str | None:
        return self.table.persist_error

    def __len__(self) -> int:
        return len(self.table)

    def state(self) -> dict[str, Any]:
        return {"backend": "sqlite", "state": "degraded" if self.table.persist_error else "ok",
                "error": self.table.persist_error}

    async def start(self) -> None:
        self.table.open()

    async def close(self) -> None:
        self.table.close()

    async def create(self, *, user: str, groups: Iterable[str], service: str, rhost: str | None, ttl: float,
                     idle_timeout: float) -> tuple[Session, str]:
        created = self.table.create(user=user, groups=groups, service=service, rhost=rhost, ttl=ttl, idle_timeout=idle_timeout)
        await self.table.durable()
        return created

    async def make_room(self, *, user: str, service: str, limit: int, evict_oldest: bool) -> list[Session]:
        return self.table.make_room(user=user, service=service, limit=limit, evict_oldest=evict_oldest)

    async def lookup(self, token: str, *, touch: bool = True) -> Session | None:
        return self.table.lookup(token, touch=touch)

    async def remove_token(self, token: str) -> Session | None:
        removed = self.table.remove_token(token)
        await self.table.durable()
        return removed

    async def revoke(self, *, session_id: str | None = None, user: str | None = None) -> list[Session]:
        revoked = self.table.revoke(session_id=session_id, user=user)
        await self.table.durable()
        return revoked

    async def list(self, user: str | None = None) -> list[Session]:
        return self.table.list(user)

    async def all(self) -> list[Session]:
        return self.table.all()

    async def sweep(self, now: float) -> list[Session]:
        """Checked a slice per loop turn: a million sessions in one go would stall every request."""
        table = self.table.all()
        due: list[Session] = []
        for start in range(0, len(table), SWEEP_SLICE):
            due += [s for s in table[start : start + SWEEP_SLICE] if s.expired(now)]
            await asyncio.sleep(0)
        return self.table.expire(now, due)


class LocalLockout:
    def __init__(self, engine: Lockout) -> None:
        self.engine = engine

    @property
    def config(self) -> LockoutConfig:
        return self.engine.config

    @property
    def storage_error(self) -> str | None:
        return self.engine.storage_error

    def stats(self) -> dict[str, Any]:
        census = self.engine.census().values()
        return {"locked": sum(locked for _, locked in census), "tracked": sum(keys for keys, _ in census),
                **self.engine.stats()}

    def census(self) -> dict[Scope, tuple[int, int]]:
        return self.engine.census()

    @property
    def locks_imposed(self) -> Mapping[Scope, int]:
        return self.engine.locks_imposed

    def configure(self, config: LockoutConfig) -> None:
        self.engine.configure(config)

    async def begin(self, user: str, rhost: str | None, password: str) -> Attempt | Locked:
        return await self.engine.begin(user, rhost, password)

    def untouched(self, user: str, rhost: str | None) -> bool:
        return self.engine.untouched(user, rhost)

    async def finish(self, attempt: Attempt, success: bool) -> tuple[Locked, ...]:
        locks = self.engine.finish(attempt, success)
        await self.engine.durable()
        return locks

    async def cancel(self, attempt: Attempt) -> None:
        self.engine.cancel(attempt)

    async def lockouts(self) -> list[LockInfo]:
        return self.engine.lockouts()

    async def unlock(self, name: str, scope: Scope | None = None) -> bool:
        cleared = self.engine.unlock(name, scope)
        await self.engine.durable()
        return cleared

    async def close(self) -> None:
        self.engine.close()


class LocalCacheDrops:
    """One host: its own cache is all there is, flushed in memory; nothing to share or read."""

    shared = False

    async def mark(self, user: str) -> None:
        return None

    async def drop(self, user: str | None) -> None:
        return None
