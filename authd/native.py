"""authd's own protocol as a front end: the JSON-lines codec (`authd.protocol`) on a connection."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from . import protocol as p
from .config import Limits
from .connection import Connection
from .eventops import Subscribe, serve_subscription
from .ops import INSTANT, Context, dispatch

if TYPE_CHECKING:
    from .server import Server

log = structlog.get_logger("authd.server")


class Native:
    """authd's own protocol: JSON lines, many requests per connection, pipelined."""

    name = "native"
    busy = p.error(None, p.BUSY, "too many connections")
    forbidden = p.error(None, p.CLIENT_FORBIDDEN, "this uid/gid may not use authd")

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def connection(self, server: Server) -> Connection:
        return NativeConnection(server, self)


class NativeConnection(Connection):
    def __init__(self, server: Server, front: Native) -> None:
        super().__init__(server, front)
        self.ctx = front.ctx

    def make_decoder(self, limits: Limits) -> p.Decoder:
        return p.Decoder(limits.max_line)

    def timed_out(self, limits: Limits) -> bytes:
        return p.error(None, p.BAD_REQUEST, f"request not completed within {limits.request_timeout:g}s")

    def malformed(self) -> bytes:
        return p.error(None, p.BAD_REQUEST, "malformed request")

    def handle(self, item: p.Request | p.ProtocolError) -> None:
        if isinstance(item, p.ProtocolError):
            self.rt.counters[f"protocol:{item.error}"] += 1
            self.send(p.error(item.id, item.error, item.message))
            return
        refused = self.admit()
        if refused == "refused_shutting_down":
            self.send(p.error(item.id, p.SHUTTING_DOWN, "authd is shutting down; retry"))
        elif refused is not None:
            self.send(p.error(item.id, p.BUSY, "too many requests in flight on this connection"))
        else:
            self.rt.counters[f"op:{item.__struct_config__.tag}"] += 1
            if isinstance(item, Subscribe):
                self.spawn(self._subscribe(item))
            else:
                self.spawn(self._serve(item), at_once=type(item) in INSTANT and self.rt.sessions.in_memory)

    async def _serve(self, req: p.Request) -> None:
        structlog.contextvars.bind_contextvars(request_id=req.id, **self.peer.log_fields())
        try:
            out = p.encode(req.id, await dispatch(self.ctx, self.peer, req))
        except Exception:
            self.rt.counters["internal_errors"] += 1
            log.exception("request failed", op=req.__struct_config__.tag)
            out = p.error(req.id, p.UNAVAILABLE, "internal error")
        self.send(out)

    async def _subscribe(self, req: Subscribe) -> None:
        """A stream of events on this connection, beside its other requests (`authd.eventops`)."""
        structlog.contextvars.bind_contextvars(request_id=req.id, **self.peer.log_fields())
        if self.forbidden():
            self.send(p.error(req.id, p.CLIENT_FORBIDDEN, "this uid/gid may not use authd"))
            return
        last = await serve_subscription(self.ctx, self.peer, req, self.transport, self.drained, self.read_closed)
        if last is not None:
            self.transport.write(last)  # past the write_buffer check: the last word of a slow stream
