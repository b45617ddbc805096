"""The saslauthd socket: one request per connection, answered by the shared auth decision.

A thin loop around `codec`: the Server's accept path, limits, drain and linger apply as on
the native socket. The request's service is mapped to a [[service]] (`[saslauthd] services`),
its client address becomes the rhost (lockout, logs, fail2ban), and with `append_realm` the
realm is appended to the login as saslauthd -r does.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from ..authflow import AuthCore
from ..config import Limits
from ..connection import Connection
from ..outcome import MESSAGES, AuthRequest, Denied
from ..peer import Peer
from ..server import Server
from . import codec

log = structlog.get_logger("authd.saslauthd")


class Saslauthd:
    name = "saslauthd"
    busy = codec.no("too many connections")
    forbidden = codec.no("this uid/gid may not use authd")

    def __init__(self, core: AuthCore) -> None:
        self.core = core

    def connection(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   peer: Peer) -> Connection:
        return SaslauthdConnection(server, reader, writer, peer, self.core)


class SaslauthdConnection(Connection):
    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer,
                 core: AuthCore) -> None:
        super().__init__(server, reader, writer, peer)
        self.core = core

    def make_decoder(self, limits: Limits) -> codec.Decoder:
        return codec.Decoder()

    async def _read_loop(self) -> None:
        """One request per connection, as saslauthd; `run` then waits for its answer and closes."""
        await self.take_turn()  # not read while this uid's PAM queue is full (authd.intake)
        try:
            item = await self._read_request()
            if item is not None:
                self.handle(item)
        finally:
            self.server.intake.room(self.peer.uid)

    async def _read_request(self) -> codec.Request | codec.Malformed | None:
        """Read until the request is complete; None if the client left or ran out of time."""
        deadline = time.monotonic() + self.rt.policy.daemon.limits.request_timeout
        while not self._closing:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    data = await self.reader.read(4096)
            except TimeoutError:
                self.rt.counters["connections_closed_slow_request"] += 1
                return None
            if not data:
                return self.decoder.finish()  # a client that half-closed after 4 fields still gets its answer
            if (item := self.decoder.feed(data)) is not None:
                return item
            if self.decoder.waiting_for_fifth:
                # Every client writes its whole request with one writev, which a Unix socket
                # delivers whole: 4 fields and nothing after them is a 4-field request (libsasl
                # 2.1.28, what Postfix and Cyrus use). Waiting for a 5th would add that wait to
                # every login of theirs (20 ms did: 8 connections could not pass 400 logins/s).
                return self.decoder.finish()
        return None

    def handle(self, item: codec.Request | codec.Malformed) -> None:
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
