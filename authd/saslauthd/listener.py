"""The saslauthd socket: one request per connection, answered by the shared auth decision.

A thin layer around `codec`: the Server's accept path, limits, drain and linger apply as on
the native socket. The request's service is mapped to a [[service]] (`[saslauthd] services`),
its client address becomes the rhost (lockout, logs, fail2ban), and with `append_realm` the
realm is appended to the login as saslauthd -r does.
"""

from __future__ import annotations


import structlog

from ..authflow import AuthCore
from ..config import Limits
from ..connection import Connection
from ..outcome import MESSAGES, AuthRequest, Denied
from ..server import Server
from . import codec

log = structlog.get_logger("authd.saslauthd")


class Saslauthd:
    name = "saslauthd"
    busy = codec.no("too many connections")
    forbidden = codec.no("this uid/gid may not use authd")

    def __init__(self, core: AuthCore) -> None:
        self.core = core

    def connection(self, server: Server) -> Connection:
        return SaslauthdConnection(server, self)


class SaslauthdConnection(Connection):
    """One request per connection, as saslauthd: the request is unfinished (`request_timeout`
    runs) from the first read until it is complete, and nothing after it is read."""

    def __init__(self, server: Server, front: Saslauthd) -> None:
        super().__init__(server, front)
        self.core = front.core

    timed_from_connect = True

    def make_decoder(self, limits: Limits) -> codec.Decoder:
        return codec.Decoder()

    def received(self, data: bytes) -> list[codec.Request | codec.Malformed]:
        item = self.decoder.feed(data)
        if item is None and self.decoder.waiting_for_fifth:
            # Every client writes its whole request with one writev, which a Unix socket
            # delivers whole: 4 fields and nothing after them is a 4-field request (libsasl
            # 2.1.28, what Postfix and Cyrus use). Waiting for a 5th would add that wait to
            # every login of theirs (20 ms did: 8 connections could not pass 400 logins/s).
            item = self.decoder.finish()
        return [] if item is None else [item]

    def unfinished(self, data: bytes) -> bool:
        return True

    def at_eof(self) -> list[codec.Request | codec.Malformed]:
        item = self.decoder.finish()  # a client that half-closed after 4 fields still gets its answer
        return [] if item is None else [item]

    def handle(self, item: codec.Request | codec.Malformed) -> None:
        self._closing = True  # the one request: read nothing after it
        counters = self.rt.counters
        if isinstance(item, codec.Malformed):
            counters["saslauthd:malformed"] += 1
            if self.server.sometimes("saslauthd_malformed"):
                log.warning("malformed saslauthd request", reason=item.reason, **self.peer.log_fields())
            self.send(codec.no(item.reason))
        elif self.forbidden():
            self.send(codec.no("this uid/gid may not use authd"))
        elif self.admit() is not None:
            self.send(codec.no("authd is shutting down; retry"))
        else:
            counters["op:saslauthd"] += 1
            self.spawn(self._serve(item))

    async def _serve(self, req: codec.Request) -> None:
        config = self.rt.policy.config.saslauthd
        user = f"{req.login}@{req.realm}" if config.append_realm and req.realm else req.login
        request = AuthRequest(user=user, password=req.password, service=config.services.get(req.service, req.service),
                              rhost=req.rhost, protocol="saslauthd")
        out = await self.decide(self.core, request)
        self.send(codec.no(MESSAGES.get(out.code, out.code)) if isinstance(out, Denied) else codec.ok())
