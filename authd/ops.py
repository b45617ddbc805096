"""Every op but `auth`: one small coroutine each, found by request type.

`dispatch` is the only entry: it applies the client and admin gates once, so an op
cannot forget them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from . import PROTOCOL_VERSION, __version__, protocol as p
from .authflow import authenticate
from .errors import ConfigError
from .events import lastlog_lookup, model as events
from .metrics.collector import render
from .peer import Peer
from .runtime import Runtime
from .sessions import Session

Op = Callable[[Runtime, Peer, Any], Awaitable[bytes]]
R = TypeVar("R", bound=p.Request)
OPS: dict[type[p.Request], Op] = {p.Auth: authenticate}


def op(request_type: type[R]) -> Callable[[Callable[[Runtime, Peer, R], Awaitable[bytes]]], Op]:
    def register(fn: Callable[[Runtime, Peer, R], Awaitable[bytes]]) -> Op:
        OPS[request_type] = fn
        if request_type not in p.REQUEST_TYPES:
            p.register(request_type)
        return fn

    return register


async def dispatch(rt: Runtime, peer: Peer, req: p.Request) -> bytes:
    policy = rt.policy
    if not policy.is_client(peer):
        rt.counters["client_forbidden"] += 1
        return p.error(req.id, p.CLIENT_FORBIDDEN, "this uid/gid may not use authd")
    if req.admin and not policy.is_admin(peer):
        rt.counters["admin_forbidden"] += 1
        return p.error(req.id, p.FORBIDDEN, f"`{type(req).__name__.lower()}` is an admin op")
    return await OPS[type(req)](rt, peer, req)


@op(p.Hello)
async def hello(rt: Runtime, peer: Peer, req: p.Hello) -> bytes:
    return p.reply(req.id, server="authd", version=__version__, protocol=PROTOCOL_VERSION, generation=rt.policy.generation)


@op(p.SessionInfo)
async def session(rt: Runtime, peer: Peer, req: p.SessionInfo) -> bytes:
    found = rt.sessions.lookup(req.token)
    if found is None:
        return p.error(req.id, p.INVALID_SESSION, "no such session, or it expired")
    return p.reply(req.id, session=found.public())


@op(p.Logout)
async def logout(rt: Runtime, peer: Peer, req: p.Logout) -> bytes:
    found = rt.sessions.remove_token(req.token)
    if found is None:
        return p.error(req.id, p.INVALID_SESSION, "no such session, or it expired")
    closed(rt, [found], "logout", peer)
    return p.reply(req.id, session_id=found.id)


@op(p.Sessions)
async def sessions(rt: Runtime, peer: Peer, req: p.Sessions) -> bytes:
    return p.reply(req.id, sessions=[s.public() for s in rt.sessions.list(req.user)])


@op(p.Revoke)
async def revoke(rt: Runtime, peer: Peer, req: p.Revoke) -> bytes:
    if req.session_id is None and req.user is None:
        return p.error(req.id, p.BAD_REQUEST, "revoke needs `session_id` or `user`")
    gone = rt.sessions.revoke(session_id=req.session_id, user=req.user)
    closed(rt, gone, "revoked", peer)
    return p.reply(req.id, revoked=[s.id for s in gone])


@op(p.Status)
async def status(rt: Runtime, peer: Peer, req: p.Status) -> bytes:
    return p.reply(req.id, **rt.status())


@op(p.Reload)
async def reload(rt: Runtime, peer: Peer, req: p.Reload) -> bytes:
    try:
        new = await rt.lifecycle.reload()
    except ConfigError as exc:
        return p.error(req.id, p.RELOAD_FAILED, str(exc))
    return p.reply(req.id, generation=new.generation, restart_required=rt.restart_required)


@op(p.Metrics)
async def metrics(rt: Runtime, peer: Peer, req: p.Metrics) -> bytes:
    return p.reply(req.id, text=render(rt)[0].decode())


@op(p.Lockouts)
async def lockouts(rt: Runtime, peer: Peer, req: p.Lockouts) -> bytes:
    rows = msgspec.to_builtins(rt.lockout.lockouts())
    return p.reply(req.id, lockouts=rows, storage_error=rt.lockout.storage_error)


@op(p.Unlock)
async def unlock(rt: Runtime, peer: Peer, req: p.Unlock) -> bytes:
    if not rt.lockout.unlock(req.key, req.scope):
        return p.error(req.id, p.NOT_FOUND, "nothing recorded for that user or rhost")
    return p.reply(req.id, unlocked=req.key)


@op(p.Lastlog)
async def lastlog(rt: Runtime, peer: Peer, req: p.Lastlog) -> bytes:
    row = await asyncio.to_thread(lastlog_lookup, rt.boot_policy.state_dir, req.user)
    if row is None:
        return p.error(req.id, p.NOT_FOUND, "no login recorded for that user (is a lastlog handler configured?)")
    return p.reply(req.id, lastlog=row)


def closed(rt: Runtime, gone: list[Session], reason: str, peer: Peer | None = None) -> None:
    """Emit `session.closed` for sessions that ended (logout, revoke, the expiry sweeper)."""
    who = {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid} if peer else {}
    if gone:
        rt.counters[f"sessions_closed:{reason}"] += len(gone)
    for s in gone:
        rt.emit(events.SESSION_CLOSED, user=s.user, service=s.service, rhost=s.rhost, session_id=s.id, reason=reason, **who)
