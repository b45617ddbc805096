"""The auth decision: lockout, PAM in a worker, policy, session, events, and the failure delay.

Protocol-neutral: it takes an `AuthRequest` and returns `Granted` or `Denied`; each front end
encodes that in its own bytes. Authenticate first, authorize second: `not_authorized` is only
said to someone who proved the password, so policy cannot be probed. Wrong password and
unknown user are one outcome. Everything it uses is handed in, so tests run it in memory with
a stand-in PAM pool and a clock they drive.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from .cache import CredentialCache
from .events import model as events
from .events.model import Event
from .lockout import Locked
from .metrics import Decisions
from .outcome import AuthRequest, Denied, Granted, Outcome, SessionGrant
from .pam.binding import PamResult
from .peer import Peer
from .policy import Policy, reads_groups
from .protocol import AUTH_FAILED, BUSY, LOCKED_OUT, NOT_AUTHORIZED, SESSION_LIMIT, UNAVAILABLE
from .sessions import SessionLimitReached
from .stores import CacheDrops, LockoutStore, SessionStore, StoreUnavailable
from .stores.local import LocalCacheDrops

log = structlog.get_logger("authd.auth")


class Pam(Protocol):
    """What the decision needs from the PAM pool (`authd.pam.pool.PamPool`): calls wait in the
    peer uid's queue, at most `max_queued` of them (outcome `busy` beyond); a success carries
    the user's groups only if `groups` asked for them."""

    async def authenticate(self, service: str, user: str, password: str, rhost: str | None = None,
                           ruser: str | None = None, *, uid: int, max_queued: int, groups: bool = True) -> PamResult: ...

    async def account(self, service: str, user: str, rhost: str | None = None, ruser: str | None = None, *,
                      uid: int, max_queued: int, groups: bool = True) -> PamResult: ...


class AuthCore:
    def __init__(
        self,
        *,
        policy: Callable[[], Policy],
        pam: Pam,
        lockout: LockoutStore,
        sessions: SessionStore,
        emit: Callable[[Event], None],
        counters: Counter[str],
        delay: Callable[[float], Awaitable[None]],
        cache: CredentialCache,
        cache_drops: CacheDrops | None = None,
        decisions: Decisions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._pam = pam
        self._lockout = lockout
        self._sessions = sessions
        self._emit = emit
        self._counters = counters
        self._delay = delay
        self._cache = cache
        self._drops = cache_drops or LocalCacheDrops()
        self._decisions = decisions or Decisions()
        self._clock = clock

    async def decide(self, peer: Peer, req: AuthRequest) -> Outcome:
        policy = self._policy()
        started = self._clock()
        who = {"user": req.user, "service": req.service, "rhost": req.rhost, "pid": peer.pid, "uid": peer.uid,
               "gid": peer.gid, "protocol": req.protocol}

        def emit(name: str, **fields: object) -> None:
            self._emit(Event.create(name, **who, **fields))

        def decided(result: str) -> float:
            """The one place an outcome is counted and timed (for metrics), before any failure delay.
            Labelled by the policy's service name, never the client's string for a service it lacks."""
            latency = self._clock() - started
            self._counters[f"auth:{result}"] += 1
            self._decisions.observe(req.service if req.service in policy.services else "", req.protocol, result, latency)
            return latency

        def failed(code: str, retry_after: int | None = None) -> Denied:
            latency = decided(code)
            log.warning("auth failed", user=req.user, service=req.service, rhost=req.rhost or "-", error=code,
                        protocol=req.protocol)
            emit(events.AUTH_FAILED, reason=code, latency=latency, generation=policy.generation)
            return Denied(code=code, retry_after=retry_after)

        service = policy.services.get(req.service)
        if service is None:
            return failed(NOT_AUTHORIZED)

        # NSS group lookups cost more than a cheap PAM stack: only when something reads them
        wants_groups = req.protocol == "native" or req.open_session or reads_groups(service)
        known = self._known_now(service.name, req, wants_groups)
        if known is not None:  # vouched for by the cache, nothing reserved or recorded to settle
            result, cached = known, True
        else:
            try:
                attempt = await self._lockout.begin(req.user, req.rhost, req.password)
            except StoreUnavailable:  # [store] on_store_error = "closed": no budget, no PAM
                return failed(UNAVAILABLE)
            if isinstance(attempt, Locked):
                denied = failed(LOCKED_OUT, attempt.retry_after)
                await self._delay(service.failure_delay)
                return denied
            try:
                limit = policy.daemon.limits.max_queued_per_uid
                result, cached = await self._verify(service.name, service.pam_name, req, peer.uid, limit, wants_groups)
            except BaseException:
                await self._lockout.cancel(attempt)
                raise
            if result.outcome == BUSY:  # this uid has max_queued_per_uid calls waiting for PAM: nothing was tried
                await self._lockout.cancel(attempt)
                self._counters["auth:busy"] += 1
                return Denied(code=BUSY)
            if result.outcome == UNAVAILABLE:
                await self._lockout.cancel(attempt)
                log.error("pam unavailable", service=service.pam_name, stage=result.stage, detail=result.detail)
                return failed(UNAVAILABLE)
            for locked in await self._lockout.finish(attempt, success=result.outcome != AUTH_FAILED):
                if locked.scope == "user":
                    await self.drop_cached(req.user)
                log.warning("lockout", scope=locked.scope, user=req.user, rhost=req.rhost or "-",
                            retry_after=locked.retry_after)
                emit(events.AUTH_LOCKED_OUT, reason=f"{locked.scope} locked")
            if result.outcome == AUTH_FAILED:
                denied = failed(AUTH_FAILED)
                await self._delay(max(result.fail_delay, service.failure_delay))
                return denied
        if result.outcome != "ok":
            return failed(result.outcome)

        groups = result.groups if wants_groups else None  # None: not looked up
        if not policy.permits(service, req.user, groups):
            return failed(NOT_AUTHORIZED)
        listed = groups or ()  # what the reply and a session carry
        if req.open_session:  # max_sessions_per_user: after the password, like any authorization
            try:
                evicted = await self._sessions.make_room(user=req.user, service=service.name,
                                                   limit=service.max_sessions_per_user,
                                                   evict_oldest=service.session_limit == "evict_oldest")
            except SessionLimitReached:
                return failed(SESSION_LIMIT)
            except StoreUnavailable:
                return failed(UNAVAILABLE)
            for old in evicted:
                self._emit(Event.create(events.SESSION_CLOSED, **{**who, "rhost": old.rhost}, session_id=old.id,
                                        reason="evicted"))

        latency = decided("ok")
        log.info("auth succeeded", user=req.user, service=req.service, rhost=req.rhost or "-", protocol=req.protocol,
                 cached=cached or None)
        if not req.open_session:
            emit(events.AUTH_SUCCEEDED, latency=latency, generation=policy.generation, cached=cached or None)
            return Granted(user=req.user, groups=listed, cached=cached)
        try:
            session, token = await self._sessions.create(
                user=req.user, groups=listed, service=service.name, rhost=req.rhost,
                ttl=service.session_ttl, idle_timeout=service.idle_timeout,
            )
        except StoreUnavailable:
            return failed(UNAVAILABLE)
        emit(events.AUTH_SUCCEEDED, latency=latency, session_id=session.id, generation=policy.generation,
             cached=cached or None)
        emit(events.SESSION_OPENED, session_id=session.id)
        grant = SessionGrant(id=session.id, token=token, expires_at=session.expires_at)
        return Granted(user=req.user, groups=listed, session=grant, cached=cached)

    async def drop_cached(self, user: str | None, *, or_fail: bool = False) -> int:
        """`user`'s credential-cache entries (None: everyone's) go here and, on a fleet, on every
        host; returns how many went here. `or_fail` (an admin's revoke, unlock or flush):
        StoreUnavailable if the fleet cannot be told, before anything is dropped. Else (after a
        lock or a revoked session, changes already made) this host's go anyway, with a warning."""
        if self._drops.shared:
            try:
                await self._drops.drop(user)
            except StoreUnavailable:
                if or_fail:
                    raise
                log.warning("other hosts' credential caches could not be told to drop a user's entries", user=user)
        return self._cache.flush(user)

    def _known_now(self, service: str, req: AuthRequest, wants_groups: bool) -> PamResult | None:
        """A success decided without waiting: the cache vouches for the password and the account
        ([cache] account_check = "cached"), and the lockout holds nothing for this user or rhost
        (no failure, no lock, no guess in PAM, room to track them: `Lockout.untouched`), so
        there is no budget to reserve or reset. Else None, and the login takes the lockout's
        turn (`_verify` looks the cache up again there)."""
        cache = self._cache
        if not cache.enabled or cache.config.account_check != "cached" or self._drops.shared:
            return None
        if not self._lockout.untouched(req.user, req.rhost):
            return None
        found, known = cache.lookup(service, req.user, req.rhost, req.password)
        if found != "hit" or (wants_groups and known is None):
            return None
        self._counters["cache:hit"] += 1
        return _cached_success(known)

    async def _verify(self, service: str, pam_service: str, req: AuthRequest, uid: int,
                      max_queued: int, wants_groups: bool) -> tuple[PamResult, bool]:
        """PAM's verdict, and whether the cache vouched for the password instead of pam_authenticate.
        The PAM call waits in `uid`'s queue (`busy` if `max_queued` already wait there); a
        success carries the user's groups if `wants_groups`. On a fleet the cache is used only
        under the drops every host has made (`CacheDrops.mark`): if they cannot be read, PAM
        decides and nothing is stored."""
        vouched = False
        caching, mark = self._cache.enabled, None
        if caching and self._drops.shared:
            try:
                mark = await self._drops.mark(req.user)
            except StoreUnavailable:
                caching = False
        if caching:
            found, known = self._cache.lookup(service, req.user, req.rhost, req.password, mark)
            if found == "hit" and self._cache.config.account_check == "cached" and wants_groups and known is None:
                found, vouched = "miss", True  # stored without groups, asked with them: PAM looks them up
            self._counters[f"cache:{found}"] += 1
            if found == "hit":
                if self._cache.config.account_check == "cached":
                    return _cached_success(known), True
                return await self._pam.account(pam_service, req.user, req.rhost, req.ruser, uid=uid,
                                               max_queued=max_queued, groups=wants_groups), True
        epoch = self._cache.epoch
        result = await self._pam.authenticate(pam_service, req.user, req.password, req.rhost, req.ruser, uid=uid,
                                              max_queued=max_queued, groups=wants_groups)
        if result.ok and caching:
            self._cache.store(service, req.user, req.rhost, req.password, result.groups if wants_groups else None,
                              since=epoch, mark=mark)
        elif vouched and result.outcome not in (BUSY, UNAVAILABLE):
            self._cache.forget(service, req.user, req.rhost)  # PAM now refuses what the entry vouched for
        return result, False


def _cached_success(groups: tuple[str, ...] | None) -> PamResult:
    """What a hit answers in PAM's place with [cache] account_check = "cached"."""
    return PamResult(outcome="ok", pam_code=0, stage="acct_mgmt", groups=groups or ())
