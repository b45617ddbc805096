"""The `auth` op: lockout, PAM in a worker, policy, session, events, and the failure delay.

Authenticate first, authorize second: `not_authorized` is only said to someone who proved
the password, so policy cannot be probed. Wrong password and unknown user are one reply.
"""

from __future__ import annotations

import time

import structlog

from .events import model as events
from .lockout import Locked
from .peer import Peer
from .protocol import (
    ACCOUNT_EXPIRED, AUTH_FAILED, BUSY, LOCKED_OUT, NOT_AUTHORIZED, PASSWORD_EXPIRED, UNAVAILABLE, Auth, error, reply,
)
from .runtime import Runtime

log = structlog.get_logger("authd.auth")

_MESSAGES = {
    AUTH_FAILED: "authentication failed",
    ACCOUNT_EXPIRED: "account expired",
    PASSWORD_EXPIRED: "password expired; change it before logging in",
    NOT_AUTHORIZED: "not authorized for this service",
    LOCKED_OUT: "too many failed logins; try again later",
    UNAVAILABLE: "authentication is unavailable; try again later",
}


async def authenticate(rt: Runtime, peer: Peer, req: Auth) -> bytes:
    policy = rt.policy
    started = time.monotonic()
    who = {"user": req.user, "service": req.service, "rhost": req.rhost, "pid": peer.pid, "uid": peer.uid, "gid": peer.gid}

    def failed(code: str, **extra: object) -> bytes:
        latency = time.monotonic() - started
        rt.counters[f"auth:{code}"] += 1
        log.warning("auth failed", user=req.user, service=req.service, rhost=req.rhost or "-", error=code)
        rt.emit(events.AUTH_FAILED, reason=code, latency=latency, generation=policy.generation, **who)
        return error(req.id, code, _MESSAGES.get(code, code), **extra)

    service = policy.services.get(req.service)
    if service is None:
        return failed(NOT_AUTHORIZED)

    attempt = await rt.lockout.begin(req.user, req.rhost, req.password)
    if isinstance(attempt, Locked):
        reply_bytes = failed(LOCKED_OUT, retry_after=attempt.retry_after)
        await rt.delay(service.failure_delay)
        return reply_bytes
    try:
        result = await rt.pam.authenticate(service.pam_name, req.user, req.password, req.rhost, req.ruser,
                                           uid=peer.uid, max_queued=policy.daemon.limits.max_queued_per_uid)
    except BaseException:
        rt.lockout.cancel(attempt)
        raise
    if result.outcome == BUSY:  # this uid already has max_queued_per_uid logins waiting for PAM: nothing was tried
        rt.lockout.cancel(attempt)
        return error(req.id, BUSY, "too many logins from this uid waiting for PAM; retry later")
    if result.outcome == UNAVAILABLE:
        rt.lockout.cancel(attempt)
        log.error("pam unavailable", service=service.pam_name, stage=result.stage, detail=result.detail)
        return failed(UNAVAILABLE)
    for locked in rt.lockout.finish(attempt, success=result.outcome != AUTH_FAILED):
        log.warning("lockout", scope=locked.scope, user=req.user, rhost=req.rhost or "-", retry_after=locked.retry_after)
        rt.emit(events.AUTH_LOCKED_OUT, reason=f"{locked.scope} locked", **who)
    if result.outcome == AUTH_FAILED:
        reply_bytes = failed(AUTH_FAILED)
        await rt.delay(max(result.fail_delay, service.failure_delay))
        return reply_bytes
    if result.outcome != "ok":
        return failed(result.outcome)

    groups = result.groups
    if not policy.permits(service, req.user, groups):
        return failed(NOT_AUTHORIZED)

    rt.counters["auth:ok"] += 1
    latency = time.monotonic() - started
    log.info("auth succeeded", user=req.user, service=req.service, rhost=req.rhost or "-")
    if not req.open_session:
        rt.emit(events.AUTH_SUCCEEDED, latency=latency, generation=policy.generation, **who)
        return reply(req.id, user=req.user, groups=list(groups))
    session, token = rt.sessions.create(
        user=req.user, groups=groups, service=service.name, rhost=req.rhost,
        ttl=service.session_ttl, idle_timeout=service.idle_timeout,
    )
    rt.emit(events.AUTH_SUCCEEDED, latency=latency, session_id=session.id, generation=policy.generation, **who)
    rt.emit(events.SESSION_OPENED, session_id=session.id, **who)
    return reply(
        req.id, user=req.user, groups=list(groups),
        session={"id": session.id, "token": token, "expires_at": session.expires_at},
    )
