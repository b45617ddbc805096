"""The `check` and `permissions` ops: authorization questions about a session, from memory.

Both read the policy once (the roles and the generation they report belong together) and the
session from the in-memory table; nothing here waits on PAM, so a check costs a token hash, a
few dict probes and the reply. Only refusals become events (`authz.denied`): allowed checks
are the normal traffic of a web app and would drown the event bus.

A `check` refreshes the session's idle expiry exactly as `session` does: a web app that gates
every request on a permission is using the session, and must not see it idle out under an
active user.
"""

from __future__ import annotations

from . import protocol as p, roles
from .events import model as events
from .ops import Context, failure, op
from .peer import Peer

BAD_PERMISSION = f"invalid permission name ({roles.PERMISSION_GRAMMAR}; no wildcards)"
NO_SESSION = "no such session, or it expired"


class Check(p.Request, tag="check"):
    token: p.Text
    permission: p.Text


class Permissions(p.Request, tag="permissions"):
    token: p.Text


class CheckReply(p.Reply):
    allowed: bool
    user: str
    permission: str
    rule: str
    generation: int


class PermissionsReply(p.Reply):
    user: str
    roles: tuple[str, ...]
    permissions: tuple[str, ...]
    deny: tuple[str, ...]
    generation: int


p.REPLY_TYPES.update(check=CheckReply, permissions=PermissionsReply)


@op(Check, instant=True)
async def check(ctx: Context, peer: Peer, req: Check) -> p.Reply:
    rt = ctx.rt
    policy = rt.policy
    if not roles.is_permission(req.permission):
        return failure(p.BAD_REQUEST, BAD_PERMISSION)
    session = await rt.sessions.lookup(req.token)
    if session is None:
        return failure(p.INVALID_SESSION, NO_SESSION)
    decision = policy.roles.decide(session.user, session.groups, session.service, req.permission)
    if decision.allowed:
        rt.counters["authz:allowed"] += 1
    else:
        rt.counters["authz:denied"] += 1
        rt.emit(events.AUTHZ_DENIED, user=session.user, service=session.service, rhost=session.rhost,
                session_id=session.id, permission=req.permission, reason=decision.rule, generation=policy.generation,
                pid=peer.pid, uid=peer.uid, gid=peer.gid)
    return CheckReply(allowed=decision.allowed, user=session.user, permission=req.permission, rule=decision.rule,
                      generation=policy.generation)


@op(Permissions, instant=True)
async def permissions(ctx: Context, peer: Peer, req: Permissions) -> p.Reply:
    policy = ctx.rt.policy
    session = await ctx.rt.sessions.lookup(req.token)
    if session is None:
        return failure(p.INVALID_SESSION, NO_SESSION)
    effective = policy.roles.effective(session.user, session.groups, session.service)
    return PermissionsReply(user=session.user, roles=effective.roles, permissions=effective.permissions,
                            deny=effective.deny, generation=policy.generation)
