"""The credential cache in the auth decision, in memory with a driven clock: each rule and
each invalidation trigger."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import pytest

from authd.cache import CacheConfig, CredentialCache
from authd.outcome import Denied, Granted
from authd.stores import StoreUnavailable

from ..clock import ManualClock
from .harness import PASSWORD, Harness, policy, run

CACHED = """
[[service]]
name = "login"
failure_delay = 0.0

[cache]
enabled = true
ttl = 100
max_entries = 3
watch = ["{watch}"]
"""


def cached(tmp: Path, extra: str = "") -> Harness:
    watch = tmp / "shadow"
    watch.write_text("v1")
    return Harness(tmp, CACHED.format(watch=watch) + extra)


@run
async def test_off_by_default(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.auth()
    await h.auth()
    assert h.pam.count("authenticate") == 2 and len(h.cache) == 0


@run
async def test_hit_skips_pam_authenticate_but_runs_the_account_check(tmp_path: Path) -> None:
    h = cached(tmp_path)
    first = await h.auth()
    second = await h.auth(protocol="saslauthd")
    assert isinstance(first, Granted) and not first.cached
    assert isinstance(second, Granted) and second.cached and second.groups == ()  # a mail reply has no groups
    assert (h.pam.count("authenticate"), h.pam.count("account")) == (1, 1)
    assert h.pam.group_lookups == [True, False]
    assert [e.cached for e in h.events] == [None, True]
    assert (h.counters["cache:miss"], h.counters["cache:hit"]) == (1, 1)


@run
async def test_account_check_on_a_hit_can_still_refuse(tmp_path: Path) -> None:
    h = cached(tmp_path)
    await h.auth()
    h.pam.account_result = "account_expired"
    assert await h.auth() == Denied(code="account_expired")


@run
async def test_account_check_cached_skips_pam_entirely(tmp_path: Path) -> None:
    h = cached(tmp_path, 'account_check = "cached"\n')
    await h.auth()
    assert isinstance(await h.auth(), Granted)
    assert (h.pam.count("authenticate"), h.pam.count("account")) == (1, 0)


@run
async def test_a_cached_hit_without_groups_is_not_served_to_a_request_that_needs_them(tmp_path: Path) -> None:
    h = cached(tmp_path, 'account_check = "cached"\n')
    await h.auth(protocol="dovecot")  # stored without groups: nothing asked for them
    assert isinstance(hit := await h.auth(protocol="saslauthd"), Granted) and hit.cached
    native = await h.auth()  # its reply carries groups: PAM again, which looks them up
    assert isinstance(native, Granted) and not native.cached and native.groups == ("staff",)
    again = await h.auth(protocol="native")
    assert isinstance(again, Granted) and again.cached and again.groups == ("staff",)
    assert h.pam.group_lookups == [False, True]
    assert (h.counters["cache:miss"], h.counters["cache:hit"]) == (2, 2)


@run
async def test_a_reload_that_adds_a_group_rule_sends_an_entry_without_groups_to_pam(tmp_path: Path) -> None:
    h = cached(tmp_path, 'account_check = "cached"\n')
    await h.auth(protocol="dovecot")  # stored without groups
    ruled = CACHED.format(watch=tmp_path / "shadow").replace('name = "login"', 'name = "login"\ndeny_groups = ["staff"]')
    h.policy = policy(ruled + 'account_check = "cached"\n', generation=2)  # what a reload swaps in
    assert await h.auth(protocol="dovecot") == Denied(code="not_authorized")
    assert h.pam.group_lookups == [False, True]


@run
async def test_pam_refusing_what_an_entry_vouched_for_drops_the_entry(tmp_path: Path) -> None:
    h = cached(tmp_path, 'account_check = "cached"\n')
    await h.auth(protocol="saslauthd")  # stored without groups
    h.pam.users["alice"] = "changed elsewhere"  # e.g. in LDAP: no watched file changes
    assert await h.auth() == Denied(code="auth_failed")  # native needs groups: PAM, which refuses
    assert await h.auth(protocol="saslauthd") == Denied(code="auth_failed")  # not from the cache
    assert h.pam.count("authenticate") == 3


@run
async def test_ttl_counts_from_the_last_pam_success_and_hits_do_not_extend_it(tmp_path: Path) -> None:
    h = cached(tmp_path)
    await h.auth()
    h.clock.advance(60)
    assert (await h.auth()).cached  # type: ignore[union-attr]
    h.clock.advance(39)
    assert (await h.auth()).cached  # type: ignore[union-attr]
    h.clock.advance(1)  # 100 s after the PAM success, whatever the hits
    assert not (await h.auth()).cached  # type: ignore[union-attr]
    assert h.pam.count("authenticate") == 2


@run
async def test_a_different_password_goes_to_pam_and_failures_are_not_cached(tmp_path: Path) -> None:
    h = cached(tmp_path)
    await h.auth()
    assert await h.auth(password="wrong") == Denied(code="auth_failed")
    assert await h.auth(password="wrong") == Denied(code="auth_failed")
    assert h.pam.count("authenticate") == 3 and h.counters["cache:mismatch"] == 2
    h.pam.users["alice"] = "new password"  # changed: the new one is checked by PAM and replaces the entry
    assert not (await h.auth(password="new password")).cached  # type: ignore[union-attr]
    assert (await h.auth(password="new password")).cached  # type: ignore[union-attr]
    assert await h.auth() == Denied(code="auth_failed"), "the old password is gone"


@run
async def test_lru_bound(tmp_path: Path) -> None:
    h = cached(tmp_path)
    for user in ("u1", "u2", "u3"):
        h.pam.users[user] = PASSWORD
        await h.auth(user)
    await h.auth("u1")  # u1 is now the most recently used
    h.pam.users["u4"] = PASSWORD
    await h.auth("u4")
    assert len(h.cache) == 3
    assert (await h.auth("u1")).cached and not (await h.auth("u2")).cached  # type: ignore[union-attr]


@run
async def test_lockout_comes_first_and_a_lock_flushes_the_user(tmp_path: Path) -> None:
    h = cached(tmp_path, "\n[lockout.user]\nmax_failures = 2\ninterval = 600\nlock_time = 60\n")
    await h.auth()
    await h.auth(password="one")
    await h.auth(password="two")
    out = await h.auth()
    assert isinstance(out, Denied) and out.code == "locked_out", "a cached password does not pass a lock"
    assert len(h.cache) == 0
    h.clock.advance(61)
    assert not (await h.auth()).cached  # type: ignore[union-attr]


NO_PAM_ON_A_HIT = 'account_check = "cached"\n\n[lockout.user]\nmax_failures = 2\ninterval = 600\nlock_time = 60\n'


@run
async def test_a_hit_with_nothing_held_by_the_lockout_is_decided_at_once(tmp_path: Path) -> None:
    h = cached(tmp_path, NO_PAM_ON_A_HIT)
    await h.auth(rhost="192.0.2.7")
    hit = await h.auth(rhost="192.0.2.7")
    assert isinstance(hit, Granted) and hit.cached and h.pam.count("authenticate") == 1
    assert [e.cached for e in h.events] == [None, True] and h.counters["cache:hit"] == 1
    assert h.lockout.untouched("alice", "192.0.2.7") and h.lockout.stats()["keys"] == 0


@run
async def test_a_hit_after_a_failure_goes_through_the_lockout_and_its_success_clears_it(tmp_path: Path) -> None:
    h = cached(tmp_path, NO_PAM_ON_A_HIT)
    await h.auth()
    await h.auth(password="one")  # one failure of two recorded
    assert (await h.auth()).cached  # type: ignore[union-attr]
    await h.auth(password="two")  # a first failure again, not a second
    again = await h.auth()
    assert isinstance(again, Granted) and again.cached


@run
async def test_a_hit_waits_behind_guesses_in_pam_and_is_refused_when_they_lock(tmp_path: Path) -> None:
    """No shortcut past a full budget: a correct password answered at once while guesses are
    still in PAM would tell an attacker which of many candidates is right."""
    h = cached(tmp_path, NO_PAM_ON_A_HIT)
    await h.auth()
    h.pam.hold = asyncio.Event()
    guesses = [asyncio.create_task(h.auth(password=guess)) for guess in ("one", "two")]
    while h.pam.count("authenticate") < 3:
        await asyncio.sleep(0)
    hit = asyncio.create_task(h.auth())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not hit.done(), "the cached password waits for the budget the guesses hold"
    h.pam.hold.set()
    await asyncio.gather(*guesses)
    out = await hit
    assert isinstance(out, Denied) and out.code == "locked_out"
    assert h.pam.count("authenticate") == 3


@run
async def test_a_hit_is_refused_like_any_login_when_the_lockout_table_is_full(tmp_path: Path) -> None:
    """A full table of locked keys refuses a name it does not track, cached password or not."""
    h = cached(tmp_path, 'account_check = "cached"\n\n[lockout]\nmax_keys = 1\n'
                         '[lockout.user]\nmax_failures = 1\nlock_time = 60\n[lockout.rhost]\nmax_failures = 0\n')
    await h.auth()
    assert isinstance(await h.auth("bob", "wrong"), Denied)  # bob is locked: the one key there is room for
    out = await h.auth()
    assert isinstance(out, Denied) and out.code == "locked_out"
    assert h.lockout.stats()["refused_full"] == 1


@run
async def test_a_change_of_a_watched_file_flushes_everything(tmp_path: Path) -> None:
    h = cached(tmp_path)
    await h.auth()
    shadow = tmp_path / "shadow"
    os.utime(shadow, ns=(0, shadow.stat().st_mtime_ns + 1_000_000_000))  # what `passwd` does to /etc/shadow
    assert not (await h.auth()).cached  # type: ignore[union-attr]
    assert (await h.auth()).cached  # type: ignore[union-attr]


@run
async def test_leaving_a_group_reaches_a_cached_login_through_the_default_watch(tmp_path: Path) -> None:
    """With account_check = "cached" a hit answers with the groups stored with its entry:
    `gpasswd -d` rewrites /etc/group, which the default watch covers, so the next login asks
    PAM again and sees the new membership."""
    assert "/etc/group" in CacheConfig().watch
    group = tmp_path / "group"
    group.write_text("staff:x:50:alice\n")
    text = CACHED.format(watch=tmp_path / "shadow").replace(f'watch = ["{tmp_path / "shadow"}"]', f'watch = ["{group}"]')
    h = Harness(tmp_path, text + 'account_check = "cached"\n')
    await h.auth()
    assert isinstance(hit := await h.auth(), Granted) and hit.cached and hit.groups == ("staff",)
    h.pam.groups = ()
    group.write_text("staff:x:50:\n")
    os.utime(group, ns=(0, group.stat().st_mtime_ns + 1_000_000_000))
    after = await h.auth()
    assert isinstance(after, Granted) and not after.cached and after.groups == ()


@pytest.mark.parametrize("drop", ["passwd", "revoke", "flush", "refused"])
@run
async def test_a_success_pam_began_before_the_cache_dropped_entries_is_not_stored(tmp_path: Path, drop: str) -> None:
    """A login whose PAM call was under way when `passwd` was seen (or a revoke, a flush, PAM
    refusing what an entry vouched for) may have been decided on what was dropped: its
    password must not go back into the cache, where no later change of the file would drop it."""
    h = cached(tmp_path, 'account_check = "cached"\n')
    await h.auth("bob")  # an entry: a lookup checks the watched files only when there are some
    h.pam.hold = asyncio.Event()
    old = asyncio.ensure_future(h.auth())  # in PAM with the old password
    await asyncio.sleep(0)
    if drop == "passwd":
        shadow = tmp_path / "shadow"
        os.utime(shadow, ns=(0, shadow.stat().st_mtime_ns + 1_000_000_000))
        bob = asyncio.ensure_future(h.auth("bob", "new"))  # its lookup sees the change first
        await asyncio.sleep(0)
        assert len(h.cache) == 0
    elif drop == "revoke":
        h.cache.flush("alice")
    elif drop == "flush":
        h.cache.flush()
    else:
        h.cache.forget("login", "alice", None)
    h.pam.hold.set()
    assert isinstance(await old, Granted)
    if drop == "passwd":
        assert isinstance(await bob, Denied)
    assert not (await h.auth()).cached, "PAM again: nothing was stored for the old login"  # type: ignore[union-attr]
    assert (await h.auth()).cached  # type: ignore[union-attr]


class FleetDrops:
    """`CacheDrops` as Redis keeps them for a fleet (a generation, a count per user), in memory."""

    shared = True

    def __init__(self) -> None:
        self.gen = 0
        self.counts: Counter[str] = Counter()
        self.down = False
        self.marks = 0

    async def mark(self, user: str) -> tuple[int, int]:
        if self.down:
            raise StoreUnavailable("redis: down")
        self.marks += 1
        return self.gen, self.counts[user.casefold()]

    async def drop(self, user: str | None) -> None:
        if self.down:
            raise StoreUnavailable("redis: down")
        if user is None:
            self.gen, self.counts = self.gen + 1, Counter()
        else:
            self.counts[user.casefold()] += 1


def fleet(tmp: Path, extra: str = "") -> tuple[Harness, FleetDrops]:
    drops = FleetDrops()
    (tmp / "shadow").write_text("v1")
    text = CACHED.format(watch=tmp / "shadow") + 'account_check = "cached"\n' + extra
    return Harness(tmp, text, cache_drops=drops), drops


@pytest.mark.parametrize("who", ["ALICE", None])
@run
async def test_a_drop_made_on_another_host_reaches_this_hosts_hits(tmp_path: Path, who: str | None) -> None:
    h, drops = fleet(tmp_path)
    await h.auth()
    assert (await h.auth()).cached  # type: ignore[union-attr]
    await drops.drop(who)  # `revoke --user alice` or `cache flush` on another host
    assert not (await h.auth()).cached, "PAM again"  # type: ignore[union-attr]
    assert (await h.auth()).cached  # type: ignore[union-attr]
    assert drops.marks == 4, "every login on a fleet reads the drops: none is decided from memory alone"


@run
async def test_a_drop_made_elsewhere_while_pam_ran_leaves_the_entry_vouching_for_nothing(tmp_path: Path) -> None:
    h, drops = fleet(tmp_path)
    h.pam.hold = asyncio.Event()
    login = asyncio.ensure_future(h.auth())
    await asyncio.sleep(0)
    await drops.drop("alice")
    h.pam.hold.set()
    assert isinstance(await login, Granted)
    assert not (await h.auth()).cached  # type: ignore[union-attr]
    assert (await h.auth()).cached  # type: ignore[union-attr]


@run
async def test_when_the_fleets_drops_cannot_be_read_pam_decides_and_nothing_is_stored(tmp_path: Path) -> None:
    h, drops = fleet(tmp_path)
    await h.auth()
    drops.down = True
    assert not (await h.auth()).cached  # type: ignore[union-attr]
    drops.down = False
    assert (await h.auth()).cached, "the entry from before, its drops unchanged"  # type: ignore[union-attr]
    assert h.pam.count("authenticate") == 2


@run
async def test_a_users_lock_drops_their_entries_on_every_host(tmp_path: Path) -> None:
    """A lock that ends by expiry must not leave other hosts' entries vouching again."""
    h, drops = fleet(tmp_path, "[lockout.user]\nmax_failures = 1\nlock_time = 60\n[lockout.rhost]\nmax_failures = 0\n")
    await h.auth()
    assert isinstance(await h.auth(password="wrong"), Denied)
    assert drops.counts["alice"] == 1 and len(h.cache) == 0


@run
async def test_an_admins_drop_the_fleet_cannot_hear_changes_nothing_a_locks_still_drops_here(tmp_path: Path) -> None:
    h, drops = fleet(tmp_path)
    await h.auth()
    drops.down = True
    with pytest.raises(StoreUnavailable):
        await h.core.drop_cached("alice", or_fail=True)  # `revoke --user`, `unlock`, `cache flush`: `unavailable`
    assert len(h.cache) == 1, "nothing was dropped"
    assert await h.core.drop_cached("alice") == 1 and len(h.cache) == 0  # after a lock: this host's go anyway


def test_flush_by_user_and_all() -> None:
    cache = CredentialCache(CacheConfig(enabled=True, watch=[]), clock=ManualClock())
    cache.store("login", "Alice", None, "pw", (), since=cache.epoch)
    cache.store("imap", "alice", None, "pw", (), since=cache.epoch)
    cache.store("login", "bob", None, "pw", (), since=cache.epoch)
    assert cache.flush("ALICE") == 2 and len(cache) == 1
    assert cache.flush() == 1 and len(cache) == 0


def test_a_reload_that_changes_the_section_flushes() -> None:
    config = CacheConfig(enabled=True, watch=[])
    cache = CredentialCache(config, clock=ManualClock())
    cache.store("login", "alice", None, "pw", (), since=cache.epoch)
    cache.configure(CacheConfig(enabled=True, watch=[]))
    assert len(cache) == 1, "an unchanged [cache] keeps its entries"
    cache.configure(CacheConfig(enabled=True, watch=[], ttl=5))
    assert len(cache) == 0


def test_key_rhost_separates_client_addresses() -> None:
    cache = CredentialCache(CacheConfig(enabled=True, watch=[], key_rhost=True), clock=ManualClock())
    cache.store("login", "alice", "192.0.2.1", "pw", (), since=cache.epoch)
    assert cache.lookup("login", "alice", "192.0.2.1", "pw")[0] == "hit"
    assert cache.lookup("login", "alice", "192.0.2.2", "pw")[0] == "miss"


def test_nothing_derived_from_the_password_is_kept_in_clear() -> None:
    cache = CredentialCache(CacheConfig(enabled=True, watch=[]), clock=ManualClock())
    cache.store("login", "alice", None, PASSWORD, (), since=cache.epoch)
    assert PASSWORD not in repr(cache._entries) and PASSWORD.encode() not in repr(cache._entries).encode()
