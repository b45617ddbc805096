"""The event log over the native socket: `subscribe` streams it, admin ops inspect and repair it.

A subscription is a worker on the bus like a configured handler, but its handler writes to the
client's connection: one `{"id": ..., "ok": true, "event": {...}}` line per event, after a
first line that confirms the subscription. Its backlog spills to the log like any handler's, so
a slow reader costs disk, not memory; a client that leaves its replies unread for
`request_timeout` is cut off with `too_slow`. Every end of a stream (cut off, drain) names the
last event sent, `resume_after`, from which a new `subscribe` continues without a gap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

import msgspec

from . import protocol as p
from .events import Event, Handler
from .ops import Context, failure, op
from .peer import Peer

TOO_SLOW = "too_slow"
Patterns = Annotated[list[p.Name], msgspec.Meta(min_length=1, max_length=64)]
After = Annotated[str, msgspec.Meta(pattern="^(now|oldest|[0-9a-f]{32})$")]  # an event id, or where to start


class Subscribe(p.Request, tag="subscribe"):
    after: After = "now"
    events: Patterns | None = None
    services: Patterns | None = None


class Events(p.Request, tag="events"):
    admin = True


class EventsDead(p.Request, tag="events_dead"):
    admin = True
    handler: p.Name | None = None


class EventsReplay(p.Request, tag="events_replay"):
    admin = True
    handler: p.Name
    seqs: list[int] | None = None


class EventsDrop(p.Request, tag="events_drop"):
    admin = True
    handler: p.Name
    seqs: list[int] | None = None


class Subscribed(p.Reply):
    subscribed: bool
    after: str


class StreamedEvent(p.Reply):
    event: Event


class StreamEnd(p.Error, omit_defaults=True):
    resume_after: str | None = None


class EventsReply(p.Reply):
    handlers: dict[str, dict[str, Any]]
    log: dict[str, Any]
    subscribers: int


class DeadLettersReply(p.Reply):
    dead: list[dict[str, Any]]


class ReplayedReply(p.Reply):
    handler: str
    seqs: list[int]


# -- admin ops -------------------------------------------------------------------------------


@op(Events)
async def events(ctx: Context, peer: Peer, req: Events) -> p.Reply:
    stats = ctx.rt.bus.stats()
    dead = await ctx.rt.bus.outbox.dead_letters()
    handlers = {name: {**row, "dead_letters": sum(d["handler"] == name for d in dead)}
                for name, row in stats["handlers"].items()}
    return EventsReply(handlers=handlers, log=stats["log"], subscribers=stats["subscribers"])


@op(EventsDead)
async def events_dead(ctx: Context, peer: Peer, req: EventsDead) -> p.Reply:
    return DeadLettersReply(dead=await ctx.rt.bus.outbox.dead_letters(req.handler))


@op(EventsReplay)
async def events_replay(ctx: Context, peer: Peer, req: EventsReplay) -> p.Reply:
    worker = ctx.rt.bus.worker(req.handler)
    if worker is None:
        return failure(p.NOT_FOUND, "no configured handler by that name")
    taken = await ctx.rt.bus.outbox.take_dead(req.handler, req.seqs)
    worker.replay(taken)
    return ReplayedReply(handler=req.handler, seqs=[seq for seq, _ in taken])


@op(EventsDrop)
async def events_drop(ctx: Context, peer: Peer, req: EventsDrop) -> p.Reply:
    taken = await ctx.rt.bus.outbox.take_dead(req.handler, req.seqs)
    return ReplayedReply(handler=req.handler, seqs=[seq for seq, _ in taken])


# -- subscriptions -----------------------------------------------------------------------------


class _Stream(Handler):
    """Writes each event to the subscriber's connection, waiting (bounded) while it reads."""

    def __init__(self, name: str, request_id: p.RequestId, transport: asyncio.WriteTransport,
                 drained: Callable[[], Any], high_water: int, patience: float, **filters: Any) -> None:
        super().__init__(name=name, timeout=patience + 5.0, **filters)
        self.request_id = request_id
        self.transport = transport
        self.drained = drained
        self.high_water = high_water
        self.patience = patience
        self.last_sent: str | None = None
        self.ended = asyncio.Event()
        self.end_reason: str | None = None

    async def handle(self, event: Event) -> None:
        if self.ended.is_set() or self.transport.is_closing():
            self.end("closed")
            return
        self.transport.write(p.encode(self.request_id, StreamedEvent(event=event)))
        self.last_sent = event.id
        if self.transport.get_write_buffer_size() > self.high_water:
            try:
                async with asyncio.timeout(self.patience):
                    await self.drained()
            except (TimeoutError, ConnectionError):
                self.end(TOO_SLOW)

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()


async def serve_subscription(ctx: Context, peer: Peer, req: Subscribe, transport: asyncio.WriteTransport,
                             drained: Callable[[], Any], closed: asyncio.Event) -> bytes | None:
    """Stream events until the client goes, falls behind or the daemon drains; the last line."""
    rt = ctx.rt
    if not rt.policy.may_subscribe(peer):
        rt.counters["subscribe_forbidden"] += 1
        return p.encode(req.id, failure(p.FORBIDDEN, "this uid/gid may not subscribe (see [clients] subscribe_users)"))
    outbox = rt.bus.outbox
    if req.after == "now":
        after: int | None = None
    elif req.after == "oldest":
        after = max(0, await outbox.first_seq() - 1)
    elif (seq := await outbox.seq_of(req.after)) is not None:
        after = seq
    else:
        return p.encode(req.id, failure(p.NOT_FOUND, "that event is not in the log (pruned, or never logged)"))
    limits = rt.policy.daemon.limits
    stream = _Stream(f"subscriber:{peer.pid}:{req.id}", req.id, transport, drained, limits.write_buffer,
                     limits.request_timeout, events=req.events or ("*",), services=req.services)
    worker = rt.bus.subscribe(stream, after)
    rt.counters["subscriptions"] += 1
    transport.write(p.encode(req.id, Subscribed(subscribed=True, after=req.after)))
    waits = [asyncio.ensure_future(w) for w in (stream.ended.wait(), rt.draining.wait(), closed.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        rt.bus.unsubscribe(worker)
    if stream.end_reason == TOO_SLOW:
        rt.counters["subscriptions_cut_off"] += 1
        return p.encode(req.id, StreamEnd(error=TOO_SLOW, message="subscriber did not read its events in time; "
                                          "subscribe again after `resume_after`", resume_after=stream.last_sent))
    if rt.draining.is_set():
        return p.encode(req.id, StreamEnd(error=p.SHUTTING_DOWN, message="authd is shutting down; subscribe again "
                                          "after `resume_after`", resume_after=stream.last_sent))
    return None

p.register(Subscribe)  # streamed by the front end (`NativeConnection`), not dispatched as an op
