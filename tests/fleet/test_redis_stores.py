"""The Redis backend's decisions, two "hosts" (two links) on one real redis-server, in process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from authd.lockout import Attempt, Locked, Lockout, LockoutConfig
from authd.stores import StoreUnavailable
from authd.stores.config import StoreConfig
from authd.stores.redis.cachedrops import FleetCacheDrops
from authd.stores.redis.link import Link
from authd.stores.redis.lockout import FleetAttempt, FleetLockout
from authd.stores.redis.sessions import RedisSessions

from ..clock import ManualClock
from ..core.harness import run
from .redisserver import RedisServer

SECRET = os.urandom(32)


def lockout_config(**user: object) -> LockoutConfig:
    import msgspec

    return msgspec.convert({"user": {"max_failures": 5, **user}, "rhost": {"max_failures": 0}}, LockoutConfig)


class Host:
    def __init__(self, server: RedisServer, prefix: str, tmp: Path, name: str, **store: object) -> None:
        self.clock = ManualClock()
        self.store = StoreConfig(backend="redis", url=server.url, prefix=prefix, timeout=1.0, **store)  # type: ignore[arg-type]
        self.link = Link(self.store, clock=self.clock)
        self.sessions = RedisSessions(self.link, near_cache=self.store.near_cache, clock=self.clock)
        self.local = Lockout(lockout_config(), tmp / f"{name}-lockout.db")
        self.lockout = FleetLockout(self.link, self.store, lockout_config(), SECRET, self.local)

    async def close(self) -> None:
        await self.lockout.close()


@asynccontextmanager
async def hosts(server: RedisServer, prefix: str, tmp: Path, **store: object) -> AsyncIterator[tuple[Host, Host]]:
    a, b = Host(server, prefix, tmp, "a", **store), Host(server, prefix, tmp, "b", **store)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def open_session(host: Host, user: str = "alice", ttl: float = 3600.0) -> str:
    _, token = await host.sessions.create(user=user, groups=["staff"], service="login", rhost="192.0.2.1", ttl=ttl,
                                          idle_timeout=0.0)
    return token


@run
async def test_a_token_from_a_works_on_b_and_a_logout_on_b_counts_on_a(redis_server: RedisServer, prefix: str, tmp_path: Path) -> None:
    async with hosts(redis_server, prefix, tmp_path) as (a, b):
        token = await open_session(a)
        found = await b.sessions.lookup(token)
        assert found is not None and found.user == "alice" and found.groups == ("staff",) and found.rhost == "192.0.2.1"
        assert [s.id for s in await b.sessions.list("alice")] == [found.id]
        assert (await b.sessions.remove_token(token)).id == found.id  # type: ignore[union-attr]
        assert await a.sessions.lookup(token) is None
        assert await b.sessions.remove_token(token) is None  # a second logout finds nothing


@run
async def test_revoke_by_user_anywhere_ends_every_session_once(redis_server: RedisServer, prefix: str, tmp_path: Path) -> None:
    async with hosts(redis_server, prefix, tmp_path) as (a, b):
        tokens = [await open_session(a), await open_session(b), await open_session(a, user="bob")]
        gone = await b.sessions.revoke(user="alice")
        assert len(gone) == 2 and await a.sessions.revoke(user="alice") == []
        assert [await a.sessions.lookup(t) is None for t in tokens] == [True, True, False]


@run
async def test_the_near_cache_honours_local_revocation_at_once_and_remote_within_its_bound(
        redis_server: RedisServer, prefix: str, tmp_path: Path) -> None:
    async with hosts(redis_server, prefix, tmp_path, near_cache=2.0) as (a, b):
        token = await open_session(a)
        assert await a.sessions.lookup(token) is not None  # cached on A now
        await b.sessions.remove_token(token)
        assert await a.sessions.lookup(token) is not None  # B's logout: A may not know for 2 s
        a.clock.advance(2.0)
        assert await a.sessions.lookup(token) is None
        other = await open_session(a)
        assert await a.sessions.lookup(other) is not None
        await a.sessions.revoke(user="alice")
        assert await a.sessions.lookup(other) is None  # revoked here: never served from the cache


@run
async def test_each_expired_session_is_swept_by_exactly_one_host(redis_server: RedisServer, prefix: str, tmp_path: Path) -> None:
    async with hosts(redis_server, prefix, tmp_path) as (a, b):
        ids = set()
        for i in range(20):
            ids.add((await a.sessions.create(user=f"u{i}", groups=[], service="login", rhost=None, ttl=0.01,
                                             idle_timeout=0.0))[0].id)
        seen: list[str] = []
        while len(seen) < len(ids):  # Redis's clock decides expiry: sweep until all 20 are reported
            for swept in await asyncio.gather(a.sessions.sweep(0), b.sessions.sweep(0)):
                seen += [s.id for s in swept]
        assert sorted(seen) == sorted(ids)
        assert await a.sessions.sweep(0) == [] and await b.sessions.sweep(0) == []


async def guess(lockout: FleetLockout, pam_calls: list[str], password: str, gate: asyncio.Event) -> Attempt | Locked:
    attempt = await lockout.begin("alice", None, password)
    if isinstance(attempt, Locked):
        return attempt
    pam_calls.append(password)
    await gate.wait()  # every admitted guess is "in PAM" at once
    await lockout.finish(attempt, success=False)
    return attempt


@run
async def test_100_concurrent_distinct_guesses_over_two_hosts_let_exactly_max_failures_reach_pam(
        redis_server: RedisServer, prefix: str, tmp_path: Path) -> None:
    async with hosts(redis_server, prefix, tmp_path) as (a, b):
        calls: list[str] = []
        gate = asyncio.Event()
        tasks = [asyncio.create_task(guess((a if i % 2 else b).lockout, calls, f"wrong-{i}", gate)) for i in range(100)]
        while len(calls) < 5:
            await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert len(calls) == 5
        assert sum(isinstance(r, Locked) for r in results) == 95
        refusal = await b.lockout.begin("alice", None, "yet another")
        assert isinstance(refusal, Locked) and refusal.retry_after is not None and refusal.retry_after > 500
        [info] = await a.lockout.lockouts()
        assert info.locked and info.lock_count == 1
        assert await b.lockout.unlock("alice") and isinstance(await a.lockout.begin("alice", None, "x"), FleetAttempt)


@run
async def test_the_same_typo_on_two_hosts_counts_once(redis_server: RedisServer, prefix: str, tmp_path: Path) -> None:
    async with hosts(redis_server, prefix, tmp_path) as (a, b):
        for host in (a, b, a):
            attempt = await host.lockout.begin("alice", None, "typo")
            assert isinstance(attempt, FleetAttempt)
            await host.lockout.finish(attempt, success=False)
        [info] = await b.lockout.lockouts()
        assert info.failures == 1


@run
async def test_a_success_clears_the_users_failures_fleet_wide(redis_server: RedisServer, prefix: str, tmp_path: Path) -> None:
    async with hosts(redis_server, prefix, tmp_path) as (a, b):
        for i in range(3):
            await a.lockout.finish(await a.lockout.begin("alice", None, f"w{i}"), success=False)  # type: ignore[arg-type]
        await b.lockout.finish(await b.lockout.begin("alice", None, "right"), success=True)  # type: ignore[arg-type]
        assert await a.lockout.lockouts() == []


@run
async def test_a_dead_hosts_slot_frees_when_its_lease_ends(redis_server: RedisServer, prefix: str, tmp_path: Path) -> None:
    async with hosts(redis_server, prefix, tmp_path, lease=0.05) as (a, b):
        a.lockout.configure(lockout_config(max_failures=1))
        b.lockout.configure(lockout_config(max_failures=1))
        held = await a.lockout.begin("alice", None, "first")  # host A "dies" holding the only slot
        assert isinstance(held, FleetAttempt)
        waiting = asyncio.create_task(b.lockout.begin("alice", None, "second"))
        assert isinstance(await asyncio.wait_for(waiting, 5.0), FleetAttempt)


@run
async def test_redis_down_falls_back_to_the_local_engine_or_refuses_when_closed(private_redis: RedisServer, tmp_path: Path) -> None:
    import signal

    async with hosts(private_redis, "f:", tmp_path) as (a, _):
        token = await open_session(a)
        private_redis.signal(signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable):
                await a.sessions.lookup(token)  # never "no such session"
            attempt = await a.lockout.begin("alice", None, "guess")
            assert isinstance(attempt, Attempt) and not isinstance(attempt, FleetAttempt)
            await a.lockout.finish(attempt, success=False)
            assert a.lockout.stats()["fallbacks"] == 1 and a.lockout.storage_error is not None
            with pytest.raises(StoreUnavailable):
                await a.sessions.revoke(user="alice")  # loudly: nothing was revoked
            closed = FleetLockout(a.link, StoreConfig(backend="redis", on_store_error="closed"), lockout_config(), SECRET,
                                  Lockout(lockout_config(), tmp_path / "closed.db"))
            with pytest.raises(StoreUnavailable):
                await closed.begin("alice", None, "guess")
        finally:
            private_redis.signal(signal.SIGCONT)
        a.clock.advance(a.store.retry_interval)
        assert await a.sessions.lookup(token) is not None  # recovered
        assert a.sessions.state()["state"] == "ok"


@run
async def test_cache_drops_made_on_one_host_change_the_mark_every_host_reads(redis_server: RedisServer, prefix: str,
                                                                           tmp_path: Path) -> None:
    async with hosts(redis_server, prefix, tmp_path) as (a, b):
        here, there = FleetCacheDrops(a.link), FleetCacheDrops(b.link)
        alice, bob = await here.mark("alice"), await here.mark("bob")
        assert alice[:2] == bob[:2] and alice[2] == bob[2] == 0, "one server, one generation, no drops yet"
        await there.drop("Alice")  # `revoke --user Alice` on b; cache keys fold case
        assert (await here.mark("ALICE"), await here.mark("bob")) == ((*alice[:2], 1), bob)
        await there.drop(None)  # `cache flush` on b: a new generation for everyone
        after = await here.mark("alice")
        assert after[1] != alice[1] and await here.mark("bob") == after
        assert await a.link.client.ttl(f"{prefix}cd") == -1, "no TTL: nothing expires back to an old mark"


@run
async def test_no_loss_of_the_cache_drops_brings_an_old_mark_back(private_redis: RedisServer, tmp_path: Path) -> None:
    """A drop made after the last snapshot is lost when Redis restarts from it (or fails over
    to a replica that missed it): entries stored before the drop must miss, not vouch again."""
    async with hosts(private_redis, "s:", tmp_path) as (a, b):
        drops = FleetCacheDrops(a.link)
        before = await drops.mark("alice")
        await a.link.client.save()
        await FleetCacheDrops(b.link).drop("alice")
        private_redis.kill()
        private_redis.start()  # from the snapshot: the hash as it was before the drop
        with pytest.raises(StoreUnavailable):
            await drops.mark("alice")  # the old connection fails: the link is down for retry_interval
        a.clock.advance(a.store.retry_interval)
        assert await a.link.client.hget("s:cd", "u:alice") is None, "the drop itself is lost"
        assert await drops.mark("alice") != before
        await a.link.client.delete("s:cd")  # lost outright (evicted, no persistence)
        assert (await drops.mark("alice"))[1] != before[1]


@run
async def test_past_max_users_a_drop_starts_a_new_generation(redis_server: RedisServer, prefix: str,
                                                              tmp_path: Path) -> None:
    """Locks of names sprayed at the lockout count drops too: the hash stays bounded."""
    async with hosts(redis_server, prefix, tmp_path) as (a, _):
        drops = FleetCacheDrops(a.link, max_users=3)
        first = await drops.mark("u0")
        for i in range(3):
            await drops.drop(f"u{i}")
        assert (await drops.mark("u0"))[1:] == (first[1], 1) and await a.link.client.hlen(f"{prefix}cd") == 4
        await drops.drop("u3")
        assert (await drops.mark("u0"))[1:] != (first[1], 1) and await a.link.client.hlen(f"{prefix}cd") == 1
