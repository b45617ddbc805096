"""What the auth decision takes and gives, in no protocol's terms.

Every front end (native JSON lines, saslauthd, Dovecot) turns its bytes into an `AuthRequest`
and the decision's `Granted` or `Denied` back into its own bytes, so a rule changes in one
place and each wire format is encoded exactly once.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Protocol = Literal["native", "saslauthd", "dovecot"]


class AuthRequest(msgspec.Struct, frozen=True, kw_only=True):
    user: str
    password: str
    service: str
    rhost: str | None = None
    ruser: str | None = None
    open_session: bool = False
    protocol: Protocol = "native"

    def __repr__(self) -> str:  # the password must not reach a log or traceback via repr
        return f"AuthRequest(user={self.user!r}, service={self.service!r}, rhost={self.rhost!r}, protocol={self.protocol!r})"


class SessionGrant(msgspec.Struct, frozen=True, kw_only=True):
    """A session opened by a successful login; the token is shown once, here."""

    id: str
    token: str
    expires_at: float

    def __repr__(self) -> str:
        return f"SessionGrant(id={self.id!r}, expires_at={self.expires_at!r})"


class Granted(msgspec.Struct, frozen=True, kw_only=True):
    user: str
    groups: tuple[str, ...]
    session: SessionGrant | None = None
    cached: bool = False


class Denied(msgspec.Struct, frozen=True, kw_only=True):
    """`code` is one of the native protocol's error codes (`auth_failed`, `locked_out`, ...)."""

    code: str
    retry_after: int | None = None


Outcome = Granted | Denied

# What a client is told for each `Denied.code`: plain ASCII, the same whether the user is
# unknown or the password wrong (both are `auth_failed`).
MESSAGES = {
    "auth_failed": "authentication failed",
    "account_expired": "account expired",
    "password_expired": "password expired; change it before logging in",
    "not_authorized": "not authorized for this service",
    "locked_out": "too many failed logins; try again later",
    "unavailable": "authentication is unavailable; try again later",
    "busy": "too many logins from this uid waiting; try again later",
    "session_limit": "too many sessions for this user and service; log out of one first",
}
