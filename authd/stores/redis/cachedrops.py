"""Credential-cache drops shared by a fleet: `revoke --user`, `unlock`, `cache flush` and a
user's lock on one host reach every host's cache.

Each host's credential cache is its own memory. The drops live in one Redis hash,
`{prefix}cd`, with no TTL: `gen`, a random value replaced by a drop of everyone, and a counter
per user (case-folded) counted up by a drop of that user. A login that may use the cache reads
its user's pair (`gen`, count) in one round trip before it looks up or stores an entry; an
entry keeps the pair it was stored under and vouches only while the pair is unchanged. So a
drop reaches every login that reads the pair after it, including one whose PAM call was
under way when the drop was made.

A hash that is lost (Redis restarted without persistence, evicted, a failover that missed it)
comes back with a new `gen`, created by whoever reads it first: every entry then misses, and
no drop is ever undone.
"""

from __future__ import annotations

import secrets

from .link import Link

Mark = tuple[str, int]


class FleetCacheDrops:
    shared = True

    def __init__(self, link: Link) -> None:
        self._link = link
        self._key = f"{link.prefix}cd"

    async def mark(self, user: str) -> Mark:
        async def read() -> list[bytes | None]:
            async with self._link.client.pipeline(transaction=True) as pipe:
                pipe.hsetnx(self._key, "gen", secrets.token_hex(16)).hmget(self._key, "gen", _field(user))
                return (await pipe.execute())[1]  # type: ignore[no-any-return]

        gen, count = await self._link.run(read)
        return (gen or b"").decode(), int(count or 0)

    async def drop(self, user: str | None) -> None:
        async def count() -> None:
            async with self._link.client.pipeline(transaction=True) as pipe:
                if user is None:  # everyone: a new generation, and the users' counts go with the old one
                    pipe.delete(self._key).hset(self._key, "gen", secrets.token_hex(16))
                else:
                    pipe.hsetnx(self._key, "gen", secrets.token_hex(16)).hincrby(self._key, _field(user), 1)
                await pipe.execute()

        await self._link.run(count)


def _field(user: str) -> str:
    return f"u:{user.casefold()}"
