"""Sessions in Redis, shared by every host: a token from one works on all, a logout anywhere
counts everywhere.

The near-cache (`[store] near_cache` seconds, off by default) answers a repeated check of
the same token from memory for up to that long, so the hot path need not pay a round trip.
The bound: a logout or revoke made on *this* host drops its entries at once; one made on
another host is seen here at most `near_cache` seconds later. A cached answer is never served
past the session's own expiry, and idle expiry is pushed out only on the checks that reach
Redis (at most `near_cache` seconds apart), so set it well below `idle_timeout`.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from ...sessions import Session, SessionLimitReached, hash_token, new_session_id, new_token
from . import scripts
from .link import Link

GRACE = 3600.0  # a session's keys outlive its expiry so the sweep can still say whose it was
SWEEP_BATCH = 1000


class RedisSessions:
    persist_error: str | None = None  # Redis holds the state; its health is `state()`
    in_memory = False  # a lookup may ask Redis, under `asyncio.timeout`: it needs a task

    def __init__(self, link: Link, *, near_cache: float = 0.0, near_cache_size: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._link = link
        self._p = link.prefix
        self._near = near_cache
        self._near_size = near_cache_size
        self._cache: OrderedDict[bytes, tuple[Session, float]] = OrderedDict()
        self._clock = clock
        self._count = 0
        self._host = socket.gethostname()
        self._create = link.script(scripts.CREATE)
        self._touch = link.script(scripts.TOUCH)
        self._logout = link.script(scripts.LOGOUT)
        self._revoke = link.script(scripts.REVOKE)
        self._sweep = link.script(scripts.SWEEP)
        self._list = link.script(scripts.LIST)

    def __len__(self) -> int:
        """Sessions in Redis (fleet-wide) as of the last sweep."""
        return self._count

    def state(self) -> dict[str, Any]:
        return {**self._link.state(), "near_cache": self._near, "near_cached": len(self._cache)}

    async def start(self) -> None:
        try:
            await self._link.run(self._link.client.ping)
        except Exception:
            pass  # served as `unavailable` until Redis answers; `status` shows why

    async def close(self) -> None:
        await self._link.close()

    async def create(self, *, user: str, groups: Iterable[str], service: str, rhost: str | None, ttl: float,
                     idle_timeout: float) -> tuple[Session, str]:
        token = new_token()
        th = hash_token(token)
        sid = new_session_id()
        groups = tuple(groups)
        args = [self._p, GRACE, th.hex(), sid, user, "\n".join(groups), service, _rhost(rhost), repr(float(ttl)),
                repr(float(idle_timeout)), self._host]
        created = float(await self._link.run(lambda: self._create(args=args)))
        return Session(sid, th, user, groups, service, rhost, created, created, float(ttl), float(idle_timeout)), token

    async def make_room(self, *, user: str, service: str, limit: int, evict_oldest: bool) -> list[Session]:
        """As the local store; across hosts two simultaneous logins may both find room (one over)."""
        live = [s for s in await self.list(user) if s.service == service]
        if len(live) < limit:
            return []
        if not evict_oldest:
            raise SessionLimitReached
        live.sort(key=lambda s: s.created)
        return await self._remove([s.id for s in live[: len(live) - limit + 1]], "")

    async def lookup(self, token: str, *, touch: bool = True) -> Session | None:
        th = hash_token(token)
        if self._near:
            cached = self._cache.get(th)
            if cached is not None:
                session, at = cached
                if self._clock() - at < self._near and not session.expired(time.time()):
                    return session
                del self._cache[th]
        row = await self._link.run(lambda: self._touch(args=[self._p, GRACE, th.hex(), int(touch)]))
        session = _session(row) if row else None
        if session is not None and self._near:
            self._cache[th] = (session, self._clock())
            if len(self._cache) > self._near_size:
                self._cache.popitem(last=False)
        return session

    async def remove_token(self, token: str) -> Session | None:
        th = hash_token(token)
        self._cache.pop(th, None)
        row = await self._link.run(lambda: self._logout(args=[self._p, th.hex()]))
        return _session(row) if row else None

    async def revoke(self, *, session_id: str | None = None, user: str | None = None) -> list[Session]:
        if session_id is not None:
            ids = [session_id]
        elif user is not None:
            ids = [m.decode() for m in await self._link.run(lambda: self._link.client.smembers(f"{self._p}u:{user}"))]
        else:
            ids = [s.id for s in await self.list()]
        return await self._remove(ids, user or "")

    async def list(self, user: str | None = None) -> list[Session]:
        rows = await self._link.run(lambda: self._list(args=[self._p, user or ""]))
        return [s for s in map(_session, rows) if s is not None]

    async def all(self) -> list[Session]:
        return await self.list()

    async def sweep(self, now: float) -> list[Session]:
        """Expired sessions this host removed; Redis's clock decides, `now` is not used."""
        gone: list[Session] = []
        while True:
            rows, self._count = await self._link.run(lambda: self._sweep(args=[self._p, SWEEP_BATCH]))
            gone += [s for s in map(_session, rows) if s is not None]
            self._forget(gone)
            if len(rows) < SWEEP_BATCH:
                return gone

    async def _remove(self, ids: list[str], user: str) -> list[Session]:
        if not ids:
            return []
        rows = await self._link.run(lambda: self._revoke(args=[self._p, user, *ids]))
        gone = [s for s in map(_session, rows) if s is not None]
        self._forget(gone)
        return gone

    def _forget(self, sessions: list[Session]) -> None:
        for s in sessions:
            self._cache.pop(s.token_hash, None)


def _rhost(rhost: str | None) -> str:
    return "" if rhost is None else "=" + rhost


def _session(row: list[bytes]) -> Session | None:
    """A script's packed session; None for a bare id (its hash expired before the sweep came)."""
    if len(row) < 10:
        return None
    sid, user, groups, service, rhost, created, last_seen, ttl, idle, th = (v.decode("utf-8", "surrogateescape") for v in row)
    return Session(sid, bytes.fromhex(th), user, tuple(filter(None, groups.split("\n"))), service,
                   rhost[1:] if rhost else None, float(created), float(last_seen), float(ttl), float(idle))
