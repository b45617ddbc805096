"""The Dovecot auth-client socket: the handshake at connect, then pipelined AUTH requests.

A thin layer around `codec` on the Server's shared connection machinery (limits, linger,
drain, reading in turns). Each complete login goes to the shared auth decision as its own
task, so a failed login waiting out its delay holds up no other request on the connection.
`rip` becomes the rhost (lockout, logs, fail2ban); `[dovecot] services` maps the request's
`service=` to a [[service]].
"""

from __future__ import annotations

import itertools
import os
import secrets

import structlog

from ..authflow import AuthCore
from ..config import Limits
from ..connection import Connection
from ..outcome import MESSAGES, AuthRequest, Denied
from ..server import Server
from . import codec

log = structlog.get_logger("authd.dovecot")

# Dovecot's FAIL codes for what a client may act on; others (auth_failed, locked_out) carry none.
_CODES = {"unavailable": "temp_fail", "busy": "temp_fail", "account_expired": "user_disabled", "password_expired": "pass_expired",
          "not_authorized": "authz_fail"}


class Dovecot:
    name = "dovecot"
    busy = b""  # a refused client sees the connection close, as with a Dovecot at its limit
    forbidden = b""  # nothing to answer before a request: the connection closes

    def __init__(self, core: AuthCore) -> None:
        self.core = core
        self.cookie = secrets.token_hex(16)
        self.cuids = itertools.count(1)

    def connection(self, server: Server) -> Connection:
        return DovecotConnection(server, self)


class DovecotConnection(Connection):
    def __init__(self, server: Server, front: Dovecot) -> None:
        super().__init__(server, front)
        self.core = front.core
        self.dovecot = front

    def opened(self) -> None:
        self.send(codec.handshake(os.getpid(), next(self.dovecot.cuids), self.dovecot.cookie))

    def make_decoder(self, limits: Limits) -> codec.Decoder:
        return codec.Decoder(require_secured=self.rt.policy.config.dovecot.require_secured)

    def handle(self, event: codec.Event) -> None:
        counters = self.rt.counters
        if isinstance(event, codec.Send):
            if event.data.startswith(b"FAIL"):
                counters["dovecot:refused"] += 1
            self.send(event.data)
        elif isinstance(event, codec.Close):
            counters["dovecot:protocol_error"] += 1
            if self.server.sometimes("dovecot_protocol"):
                log.warning("dovecot client broke the protocol; closing", reason=event.reason, **self.peer.log_fields())
            self._closing = True
        elif self.forbidden():
            self._answer(event, codec.fail(event.id, "this uid/gid may not use authd"))
        elif self.admit() is not None:
            self._answer(event, codec.fail(event.id, "authd is busy or shutting down", code="temp_fail"))
        else:
            counters["op:dovecot"] += 1
            self.spawn(self._serve(event))

    def _answer(self, event: codec.Authenticate, data: bytes) -> None:
        self.decoder.forget(event.id)
        self.send(data)

    async def _serve(self, req: codec.Authenticate) -> None:
        services = self.rt.policy.config.dovecot.services
        request = AuthRequest(user=req.user, password=req.password, service=services.get(req.service, req.service),
                              rhost=req.rip, protocol="dovecot")
        out = await self.decide(self.core, request)
        if isinstance(out, Denied):
            reason = MESSAGES.get(out.code, out.code).split(";")[0]  # fail2ban's postfix-sasl filter wants plain words
            reply = codec.fail(req.id, reason, code=_CODES.get(out.code), user=req.user)
        else:
            reply = codec.ok(req.id, out.user)
        self._answer(req, reply)
