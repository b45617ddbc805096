"""The event record: what happened, to whom, from where — and by construction never a secret.

Events are built from explicit fields only: there is no field that could carry a password or a
session token, and unknown keyword arguments are rejected, so a careless
``Event.create(name, **request)`` fails loudly instead of leaking.
"""

from __future__ import annotations

import os
import time as _time
from typing import Any

import msgspec

AUTH_SUCCEEDED = "auth.succeeded"
AUTH_FAILED = "auth.failed"
AUTH_LOCKED_OUT = "auth.locked_out"
SESSION_OPENED = "session.opened"
SESSION_CLOSED = "session.closed"
AUTHZ_DENIED = "authz.denied"
POLICY_RELOADED = "policy.reloaded"
POLICY_RELOAD_FAILED = "policy.reload_failed"
DAEMON_STARTED = "daemon.started"
DAEMON_DRAINING = "daemon.draining"
DAEMON_STOPPED = "daemon.stopped"

EVENT_NAMES: tuple[str, ...] = (
    AUTH_SUCCEEDED,
    AUTH_FAILED,
    AUTH_LOCKED_OUT,
    SESSION_OPENED,
    SESSION_CLOSED,
    AUTHZ_DENIED,
    POLICY_RELOADED,
    POLICY_RELOAD_FAILED,
    DAEMON_STARTED,
    DAEMON_DRAINING,
    DAEMON_STOPPED,
)


def time_ordered_id(now: float) -> str:
    """A UUIDv7 (RFC 9562) as 32 hex digits: the Unix time in milliseconds, then 74 random bits.

    Unique like a random UUID, but in creation order: the event log's index on `id` (for
    `subscribe` from an id) grows at its end, where a random id would dirty a page anywhere
    in the index on every insert.
    """
    rand = int.from_bytes(os.urandom(10), "big")
    value = int(now * 1000) << 80 | 0x7 << 76 | (rand >> 68) << 64 | 0b10 << 62 | rand & (1 << 62) - 1
    return f"{value:032x}"


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One auth or lifecycle outcome; ``pid``/``uid``/``gid`` are the client's SO_PEERCRED."""

    name: str
    id: str
    time: float
    user: str | None = None
    service: str | None = None
    rhost: str | None = None
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    session_id: str | None = None
    reason: str | None = None  # why it failed; for authz.denied, the rule that refused
    permission: str | None = None  # authz.denied: the permission asked for
    latency: float | None = None
    generation: int | None = None
    protocol: str | None = None  # the front end a request came through: native, saslauthd, dovecot
    cached: bool | None = None  # a success the credential cache vouched for

    @classmethod
    def create(cls, name: str, **fields: Any) -> Event:
        """Build an event with a fresh id and the current time."""
        now = _time.time()
        return cls(name=name, id=time_ordered_id(now), time=now, **fields)

    @property
    def sender(self) -> str | None:
        """What blinker-style ``sender=`` filters compare against: the service."""
        return self.service

    def to_dict(self) -> dict[str, Any]:
        """The event as a plain dict for JSON, without the fields that are ``None``."""
        return {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not None}

    def to_json(self) -> bytes:
        """Compact JSON of :meth:`to_dict`, as handlers send and store it."""
        return msgspec.json.encode(self)
