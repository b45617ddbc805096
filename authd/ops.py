"""Every op of the native protocol: one small coroutine each, found by request type.

An op gets a `Context` (the runtime's services and the lifecycle's controls, handed in
explicitly) and returns its typed reply; the native front end encodes it. `dispatch` is the
only entry: it applies the client and admin gates once, so an op cannot forget them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol as Interface, TypeVar

import msgspec

from . import PROTOCOL_VERSION, __version__, protocol as p
from .errors import ConfigError
from .events import lastlog_lookup, model as events
from .metrics.collector import Observed, render
from .outcome import MESSAGES, AuthRequest, Denied
from .peer import Peer
from .policy import Policy
from .runtime import Runtime
from .sessions import Session
from .stores import StoreUnavailable


class Control(Observed, Interface):
    """What ops may ask of the lifecycle (`authd.lifecycle.Lifecycle`); `metrics` reads `Observed`."""

    async def reload(self) -> Policy: ...

    def status(self) -> p.StatusReply: ...


@dataclass(frozen=True)
class Context:
    rt: Runtime
    control: Control


Op = Callable[[Context, Peer, Any], Awaitable[p.Reply]]
R = TypeVar("R", bound=p.Request)
OPS: dict[type[p.Request], Op] = {}
INSTANT: set[type[p.Request]] = set()  # served at once, a task only if they wait (`authd.eager`)


def op(request_type: type[R], *, instant: bool = False) -> Callable[[Callable[[Context, Peer, R], Awaitable[p.Reply]]], Op]:
    """Register the op for `request_type`. `instant`: the hot read ops, whose first step needs
    no task of its own (nothing before their first wait enters `asyncio.timeout`)."""
    def register(fn: Callable[[Context, Peer, R], Awaitable[p.Reply]]) -> Op:
        OPS[request_type] = fn
        if instant:
            INSTANT.add(request_type)
        if request_type not in p.REQUEST_TYPES:
            p.register(request_type)
        return fn

    return register


async def dispatch(ctx: Context, peer: Peer, req: p.Request) -> p.Reply:
    rt = ctx.rt
    policy = rt.policy
    if not policy.is_client(peer):
        rt.counters["client_forbidden"] += 1
        return p.Error(error=p.CLIENT_FORBIDDEN, message="this uid/gid may not use authd")
    if req.admin and not policy.is_admin(peer):
        rt.counters["admin_forbidden"] += 1
        return p.Error(error=p.FORBIDDEN, message=f"`{type(req).__name__.lower()}` is an admin op")
    try:
        reply = await OPS[type(req)](ctx, peer, req)
    except StoreUnavailable:  # never "invalid_session": an app would log its user out
        rt.counters["store_unavailable"] += 1
        return p.Error(error=p.UNAVAILABLE, message="the session/lockout store is unavailable; nothing was read or changed")
    if not rt.bus.settled():  # the events this request caused are in the log before it is answered
        await rt.bus.durable()
    return reply


def failure(code: str, message: str) -> p.Error:
    return p.Error(error=code, message=message)


@op(p.Auth)
async def authenticate(ctx: Context, peer: Peer, req: p.Auth) -> p.Reply:
    request = AuthRequest(user=req.user, password=req.password, service=req.service, rhost=req.rhost,
                          ruser=req.ruser, open_session=req.open_session, protocol="native")
    out = await ctx.rt.core.decide(peer, request)
    if isinstance(out, Denied):
        return p.Error(error=out.code, message=MESSAGES.get(out.code, out.code), retry_after=out.retry_after)
    return p.AuthReply(user=out.user, groups=out.groups, session=out.session)


@op(p.Hello, instant=True)
async def hello(ctx: Context, peer: Peer, req: p.Hello) -> p.Reply:
    return p.HelloReply(server="authd", version=__version__, protocol=PROTOCOL_VERSION, generation=ctx.rt.policy.generation)


@op(p.SessionInfo, instant=True)
async def session(ctx: Context, peer: Peer, req: p.SessionInfo) -> p.Reply:
    found = await ctx.rt.sessions.lookup(req.token)
    if found is None:
        return failure(p.INVALID_SESSION, "no such session, or it expired")
    return p.SessionReply(session=found.public())


@op(p.Logout)
async def logout(ctx: Context, peer: Peer, req: p.Logout) -> p.Reply:
    found = await ctx.rt.sessions.remove_token(req.token)
    if found is None:
        return failure(p.INVALID_SESSION, "no such session, or it expired")
    closed(ctx.rt, [found], "logout", peer)
    return p.LogoutReply(session_id=found.id)


@op(p.Sessions)
async def sessions(ctx: Context, peer: Peer, req: p.Sessions) -> p.Reply:
    return p.SessionsReply(sessions=[s.public() for s in await ctx.rt.sessions.list(req.user)])


@op(p.Revoke)
async def revoke(ctx: Context, peer: Peer, req: p.Revoke) -> p.Reply:
    if req.session_id is None and req.user is None:
        return failure(p.BAD_REQUEST, "revoke needs `session_id` or `user`")
    if req.user is not None:  # first: if the fleet cannot hear it, nothing was changed
        await ctx.rt.core.drop_cached(req.user, or_fail=True)
    gone = await ctx.rt.sessions.revoke(session_id=req.session_id, user=req.user)
    for user in {s.user for s in gone} - {req.user}:
        await ctx.rt.core.drop_cached(user)
    closed(ctx.rt, gone, "revoked", peer)
    return p.RevokeReply(revoked=[s.id for s in gone])


@op(p.Status)
async def status(ctx: Context, peer: Peer, req: p.Status) -> p.Reply:
    return ctx.control.status()


@op(p.Reload)
async def reload(ctx: Context, peer: Peer, req: p.Reload) -> p.Reply:
    try:
        new = await ctx.control.reload()
    except ConfigError as exc:
        return failure(p.RELOAD_FAILED, str(exc))
    return p.ReloadReply(generation=new.generation, restart_required=ctx.control.restart_required)


@op(p.Metrics)
async def metrics(ctx: Context, peer: Peer, req: p.Metrics) -> p.Reply:
    return p.MetricsReply(text=render(ctx.rt, ctx.control)[0].decode())


@op(p.Lockouts)
async def lockouts(ctx: Context, peer: Peer, req: p.Lockouts) -> p.Reply:
    rows = msgspec.to_builtins(await ctx.rt.lockout.lockouts())
    return p.LockoutsReply(lockouts=rows, storage_error=ctx.rt.lockout.storage_error)


@op(p.Unlock)
async def unlock(ctx: Context, peer: Peer, req: p.Unlock) -> p.Reply:
    if req.scope != "rhost":
        await ctx.rt.core.drop_cached(req.key, or_fail=True)
    if not await ctx.rt.lockout.unlock(req.key, req.scope):
        return failure(p.NOT_FOUND, "nothing recorded for that user or rhost")
    return p.UnlockReply(unlocked=req.key)


@op(p.Lastlog)
async def lastlog(ctx: Context, peer: Peer, req: p.Lastlog) -> p.Reply:
    row = await asyncio.to_thread(lastlog_lookup, ctx.rt.boot_policy.state_dir, req.user)
    if row is None:
        return failure(p.NOT_FOUND, "no login recorded for that user (is a lastlog handler configured?)")
    return p.LastlogReply(lastlog=row)


@op(p.CacheFlush)
async def cache_flush(ctx: Context, peer: Peer, req: p.CacheFlush) -> p.Reply:
    return p.CacheFlushReply(flushed=await ctx.rt.core.drop_cached(req.user, or_fail=True))


def closed(rt: Runtime, gone: list[Session], reason: str, peer: Peer | None = None) -> None:
    """Emit `session.closed` for sessions that ended (logout, revoke, the expiry sweeper)."""
    who = {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid} if peer else {}
    if gone:
        rt.counters[f"sessions_closed:{reason}"] += len(gone)
    for s in gone:
        rt.emit(events.SESSION_CLOSED, user=s.user, service=s.service, rhost=s.rhost, session_id=s.id, reason=reason, **who)


from . import authz as _authz  # noqa: E402,F401  (registers `check` and `permissions`; it imports `op` from here)
