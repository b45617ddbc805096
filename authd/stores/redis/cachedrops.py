"""Credential-cache drops shared by a fleet: `revoke --user`, `unlock`, `cache flush` and a
user's lock on one host reach every host's cache.

Each host's credential cache is its own memory. The drops live in one Redis hash,
`{prefix}cd`, with no TTL: `gen`, a random value replaced by a drop of everyone, and a count
per user (case-folded) counted up by a drop of that user. A login that may use the cache reads
its mark in one round trip before it looks up or stores an entry: the server's `run_id`,
`gen` and the user's count. An entry keeps the mark it was stored under and vouches only while
it is unchanged, so a drop reaches every login that reads the mark after it, including one
whose PAM call was under way when the drop was made.

No loss of drops brings an old mark back. A Redis restart or a failover changes `run_id`,
even when a snapshot or a replica restores the hash as it was before the latest drops; a hash
lost or evicted comes back with a new `gen`, made by whoever reads it first. Either way every
entry misses once and goes to PAM. Counts are kept for every user ever dropped (a lock of any
name typed counts too), so past `MAX_USERS` of them a drop starts a new generation instead.
"""

from __future__ import annotations

import secrets

from . import scripts
from .link import Link

MAX_USERS = 100_000
Mark = tuple[str, str, int]


class FleetCacheDrops:
    shared = True

    def __init__(self, link: Link, *, max_users: int = MAX_USERS) -> None:
        self._link = link
        self._max_users = max_users
        self._key = f"{link.prefix}cd"
        self._mark = link.script(scripts.MARK)

    async def mark(self, user: str) -> Mark:
        run, gen, count = await self._link.run(lambda: self._mark(keys=[self._key], args=[secrets.token_hex(16), _field(user)]))
        return run.decode(), gen.decode(), int(count)

    async def drop(self, user: str | None) -> None:
        async def count() -> int:
            async with self._link.client.pipeline(transaction=True) as pipe:
                if user is None:
                    pipe.unlink(self._key).hset(self._key, "gen", secrets.token_hex(16)).hlen(self._key)
                else:
                    pipe.hsetnx(self._key, "gen", secrets.token_hex(16)).hincrby(self._key, _field(user), 1).hlen(self._key)
                return (await pipe.execute())[-1]  # type: ignore[no-any-return]

        if await self._link.run(count) - 1 > self._max_users:  # the fields less `gen`
            await self.drop(None)  # everyone's entries miss once; the counts start over


def _field(user: str) -> str:
    return f"u:{user.casefold()}"
