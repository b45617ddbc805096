"""The credential cache: a recent PAM success vouches for the same password, for a while.

Off by default ([cache] enabled). Memory only: an entry is an HMAC-SHA256 of (service, user,
password) under a key drawn at start and never written anywhere, so neither the password nor
anything that could be brute-forced offline exists outside this process. The TTL counts from
the last real PAM success; hits never extend it. At most `max_entries`, least recently used
out first. Only successes are stored: the lockout already deduplicates repeated typos.

Dropped for a user on revoke, lock and unlock; for everyone on `authctl cache flush`, on a
reload that changes [cache], and when a watched file (/etc/shadow, /etc/passwd, /etc/group)
changes, which catches `passwd`, `passwd -l` and a change of group membership for local users
(a hit with account_check = "cached" answers with the groups stored with its entry). Other
backends are bounded by the TTL. On a fleet an entry also keeps the mark of the drops every
host shares (`authd.stores.redis.cachedrops`), so a revoke, unlock, lock or flush anywhere
reaches it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec

Lookup = Literal["hit", "miss", "mismatch"]
# passwd, passwd -l, usermod; and gpasswd -d, whose effect a hit's stored groups would outlive
DEFAULT_WATCH = ("/etc/shadow", "/etc/passwd", "/etc/group")
Key = tuple[str, str, str | None]


class CacheConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False
    ttl: Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)] = 600.0
    max_entries: Annotated[int, msgspec.Meta(gt=0, le=10_000_000)] = 10_000
    account_check: Literal["pam", "cached"] = "pam"  # "pam": pam_acct_mgmt still runs on a hit
    key_rhost: bool = False  # cache per client address too (when PAM decides by PAM_RHOST)
    watch: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_WATCH))


class _Entry(msgspec.Struct, gc=False):
    verifier: bytes
    expires: float
    groups: tuple[str, ...] | None  # None: the login that stored it did not look them up
    mark: Any  # the fleet's drops when it was stored (`authd.stores.CacheDrops.mark`); None on one host


class CredentialCache:
    def __init__(self, config: CacheConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._secret = os.urandom(32)
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self.epoch = 0  # counts drops: a success PAM began before one may be stale (`store`)
        self.config = config
        self._stamps = self._watched()

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def configure(self, config: CacheConfig) -> None:
        """A reload: a changed [cache] starts empty (a shorter TTL or a new key must apply now)."""
        if config != self.config:
            self.flush()
            self.config = config
            self._stamps = self._watched()

    def lookup(self, service: str, user: str, rhost: str | None, password: str,
               mark: Any = None) -> tuple[Lookup, tuple[str, ...] | None]:
        """`hit` (with the groups PAM gave, None if they were not asked for) only for the
        password PAM accepted, within the TTL, under the fleet's `mark` it was stored with."""
        self._check_watched()
        key = self._key(service, user, rhost)
        entry = self._entries.get(key)
        if entry is None:
            return "miss", None
        if self._clock() >= entry.expires or entry.mark != mark:
            del self._entries[key]
            return "miss", None
        if not hmac.compare_digest(entry.verifier, self._verifier(key, password)):
            return "mismatch", None
        self._entries.move_to_end(key)
        return "hit", entry.groups

    def store(self, service: str, user: str, rhost: str | None, password: str, groups: tuple[str, ...] | None, *,
              since: int, mark: Any = None) -> None:
        """After a real PAM success: (re)start the entry's TTL. `since` is the `epoch` when that
        PAM call began: if entries were dropped meanwhile (`passwd` seen in a watched file, a
        revoke, a lock, a flush), PAM may have read what they were dropped for, so nothing is
        stored; the next login asks PAM again. `mark`: the fleet's, read before that call (a
        drop elsewhere during it makes the entry vouch for nothing)."""
        if since != self.epoch:
            return
        key = self._key(service, user, rhost)
        self._entries[key] = _Entry(self._verifier(key, password), self._clock() + self.config.ttl, groups, mark)
        self._entries.move_to_end(key)
        while len(self._entries) > self.config.max_entries:
            self._entries.popitem(last=False)

    def forget(self, service: str, user: str, rhost: str | None) -> None:
        """Drop the one entry for this login (PAM refused what it vouched for)."""
        self.epoch += 1
        self._entries.pop(self._key(service, user, rhost), None)

    def flush(self, user: str | None = None) -> int:
        """Drop every entry, or those of `user`; returns how many went."""
        self.epoch += 1
        if user is None:
            count = len(self._entries)
            self._entries.clear()
            return count
        gone = [key for key in self._entries if key[1] == user.casefold()]
        for key in gone:
            del self._entries[key]
        return len(gone)

    def __len__(self) -> int:
        return len(self._entries)

    def _key(self, service: str, user: str, rhost: str | None) -> Key:
        return service, user.casefold(), rhost if self.config.key_rhost else None

    def _verifier(self, key: Key, password: str) -> bytes:
        data = "\0".join((key[0], key[1], password)).encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, data, hashlib.sha256).digest()

    def _check_watched(self) -> None:
        if not self._entries:
            return
        stamps = self._watched()
        if stamps != self._stamps:
            self._stamps = stamps
            self.flush()

    def _watched(self) -> tuple[tuple[int, int] | None, ...]:
        return tuple(_stamp(path) for path in self.config.watch)


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino
