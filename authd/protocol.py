"""The native protocol as pure functions of bytes: JSON lines in, typed requests out.

Sans-I/O in the style of h11: `Decoder.feed()` takes whatever bytes arrived and returns what
they complete; `encode()` turns a reply into a line. No sockets, no asyncio, so the codec is
fuzzed and unit-tested on its own and the server stays a thin loop around it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from . import rhost as rhosts
from .outcome import SessionGrant

RequestId = int | str | None
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]

# Error codes of docs/protocol.md, the only values `error` ever takes.
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
BUSY = "busy"
AUTH_FAILED = "auth_failed"
ACCOUNT_EXPIRED = "account_expired"
PASSWORD_EXPIRED = "password_expired"
NOT_AUTHORIZED = "not_authorized"
LOCKED_OUT = "locked_out"
CLIENT_FORBIDDEN = "client_forbidden"
UNAVAILABLE = "unavailable"
INVALID_SESSION = "invalid_session"
NOT_FOUND = "not_found"
FORBIDDEN = "forbidden"
SHUTTING_DOWN = "shutting_down"
RELOAD_FAILED = "reload_failed"
SESSION_LIMIT = "session_limit"


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="op"):
    """Base of every op; `admin` ops are refused to peers that are not admins."""

    id: int | str
    admin: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for field in self.__struct_fields__:
            value = getattr(self, field)
            if isinstance(value, str) and "\0" in value:
                raise ValueError(f"NUL byte in `{field}`")


class Hello(Request, tag="hello"):
    pass


class Auth(Request, tag="auth"):
    user: Name
    password: Annotated[str, msgspec.Meta(max_length=4096)]
    service: Name
    rhost: Name | None = None
    ruser: Name | None = None
    open_session: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rhost is not None:
            rhosts.parse(self.rhost)  # one spelling per host, or bad_request (authd.rhost says why)

    def __repr__(self) -> str:  # the password must not reach a log or traceback via repr
        return f"Auth(id={self.id!r}, user={self.user!r}, service={self.service!r}, rhost={self.rhost!r})"


class SessionInfo(Request, tag="session"):
    token: Text


class Logout(Request, tag="logout"):
    token: Text


class Sessions(Request, tag="sessions"):
    admin = True
    user: Name | None = None


class Revoke(Request, tag="revoke"):
    admin = True
    session_id: Name | None = None
    user: Name | None = None


class Status(Request, tag="status"):
    admin = True


class Reload(Request, tag="reload"):
    admin = True


class Metrics(Request, tag="metrics"):
    admin = True


class Lockouts(Request, tag="lockouts"):
    admin = True


class Unlock(Request, tag="unlock"):
    admin = True
    key: Name
    scope: Literal["user", "rhost"] | None = None


class Lastlog(Request, tag="lastlog"):
    admin = True
    user: Name


class CacheFlush(Request, tag="cache_flush"):
    admin = True
    user: Name | None = None


REQUEST_TYPES: list[type[Request]] = [Hello, Auth, SessionInfo, Logout, Sessions, Revoke, Status, Reload, Metrics, Lockouts, Unlock,
                                      Lastlog, CacheFlush]


def register(request_type: type[Request]) -> None:
    """Add an op (e.g. from the handlers or lockout modules); the decoder picks it up."""
    REQUEST_TYPES.append(request_type)
    _decoders.clear()


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A line that could not become a request; answered with this error, then serving goes on."""

    id: RequestId
    error: str
    message: str


class _IdOnly(msgspec.Struct):
    id: Any = None


_decoders: dict[int, msgspec.json.Decoder[Any]] = {}
_id_decoder = msgspec.json.Decoder(_IdOnly)
_encoder = msgspec.json.Encoder()


def _request_decoder() -> msgspec.json.Decoder[Any]:
    key = len(REQUEST_TYPES)
    if key not in _decoders:
        _decoders[key] = msgspec.json.Decoder(_union())
    return _decoders[key]


def _union() -> Any:
    union: Any = REQUEST_TYPES[0]
    for request_type in REQUEST_TYPES[1:]:
        union = union | request_type
    return union


def decode_line(line: bytes) -> Request | ProtocolError:
    """One line (without its newline) to a request, or to the error that answers it."""
    try:
        return _request_decoder().decode(line)
    except msgspec.ValidationError as exc:
        return ProtocolError(_salvage_id(line), BAD_REQUEST, _describe(exc))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # not UTF-8; nested too deep
        return ProtocolError(_salvage_id(line), BAD_REQUEST, "malformed JSON")


def _salvage_id(line: bytes) -> RequestId:
    try:
        request_id = _id_decoder.decode(line).id
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(request_id, bool) or not isinstance(request_id, (int, str)):
        return None
    if isinstance(request_id, str) and ("\0" in request_id or len(request_id) > 256):
        return None
    return request_id


# msgspec's own wording where it is made of the schema alone: types, bounds, JSON kinds.
_EXPECTED = re.compile(r"Expected `[\w |]+`(, got `(int|float|str|bool|null|array|object)`)?"
                       r"( of length [<>]= \d+| [<>]=? -?\d+(\.\d+)?)?")
_FIELD_NAMED = re.compile(r"(Object missing required field|Object contains unknown field|NUL byte in) `([^`]*)`")
_AT = re.compile(r" - at `\$(\.[^`]*)?`$")
_OWN_MESSAGES = frozenset({rhosts.INVALID})  # fixed texts our own validators raise: they quote nothing


def _describe(exc: msgspec.ValidationError) -> str:
    """The path and the kind of error, never a value: the message goes to any peer, admin or not.

    msgspec quotes what it was given ("Invalid enum value 'x'", "unknown field `x`"), so its
    message is rebuilt here from a closed set of kinds; a name is kept only when it is one of
    our own field names, whatever the client put in its place.
    """
    text = str(exc)
    at = _AT.search(text)
    kind, path = (text[: at.start()], (at.group(1) or "")[1:]) if at else (text, "")
    fields = _field_names()
    if path == "op" or "`op`" in kind:
        return "unknown or missing op"
    if named := _FIELD_NAMED.fullmatch(kind):
        label, name = named.groups()
        if label == "Object contains unknown field":
            return f"unknown field `{name}`" if name in fields else "unknown field"
        kind = f"{label} `{name}`" if name in fields else label
    elif not _EXPECTED.fullmatch(kind) and kind not in _OWN_MESSAGES:
        kind = "Invalid value"
    return f"{kind} - at `$.{path}`" if path in fields else kind


def _field_names() -> frozenset[str]:
    return frozenset(name for request_type in REQUEST_TYPES for name in request_type.__struct_fields__)


class Decoder:
    """Splits a byte stream into requests; an over-long line is answered, skipped, not fatal."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._skipping = False

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held so far (0 while skipping an over-long one)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Request | ProtocolError]:
        out: list[Request | ProtocolError] = []
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line and not self._skipping:
                    out.append(ProtocolError(None, TOO_LARGE, f"line longer than {self.max_line} bytes"))
                    self._skipping = True
                if self._skipping:
                    self._buffer.clear()
                return out
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > self.max_line:
                out.append(ProtocolError(_salvage_id(line), TOO_LARGE, f"line longer than {self.max_line} bytes"))
                continue
            if line.strip():
                out.append(decode_line(line))


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every op's typed reply: the fields after `id` and `ok`. The client decodes into
    the same Structs (`Client(typed=True)`)."""


class Error(Reply, omit_defaults=True):
    error: str
    message: str
    retry_after: int | None = None


class HelloReply(Reply):
    server: str
    version: str
    protocol: int
    generation: int


class AuthReply(Reply, omit_defaults=True):
    user: str
    groups: tuple[str, ...]
    session: SessionGrant | None = None


class PublicSession(msgspec.Struct, frozen=True, gc=False):
    """What clients, dumps and logs may see of a session: never the token or its hash."""

    id: str
    user: str
    groups: tuple[str, ...]
    service: str
    rhost: str | None
    created: float
    last_seen: float
    expires_at: float


class SessionReply(Reply):
    session: PublicSession


class LogoutReply(Reply):
    session_id: str


class SessionsReply(Reply):
    sessions: list[PublicSession]


class RevokeReply(Reply):
    revoked: list[str]


class StatusReply(Reply):
    server: str
    version: str
    protocol: int
    state: str
    pid: int
    uptime: float
    generation: int
    policy: str
    last_reload: float | None
    last_reload_error: str | None
    restart_required: list[str]
    counters: dict[str, int]
    connections: dict[str, int]
    sessions: int
    session_store_error: str | None
    pam: dict[str, int]
    lockout: dict[str, Any]
    events: dict[str, Any]
    store: dict[str, Any] | None = None  # the session/lockout backend and its state


class ReloadReply(Reply):
    generation: int
    restart_required: list[str]


class MetricsReply(Reply):
    text: str


class LockoutsReply(Reply):
    lockouts: list[dict[str, Any]]
    storage_error: str | None


class UnlockReply(Reply):
    unlocked: str


class LastlogReply(Reply):
    lastlog: dict[str, Any]


class CacheFlushReply(Reply):
    flushed: int


REPLY_TYPES: dict[str, type[Reply]] = {
    "hello": HelloReply, "auth": AuthReply, "session": SessionReply, "logout": LogoutReply,
    "sessions": SessionsReply, "revoke": RevokeReply, "status": StatusReply, "reload": ReloadReply,
    "metrics": MetricsReply, "lockouts": LockoutsReply, "unlock": UnlockReply, "lastlog": LastlogReply, "cache_flush": CacheFlushReply,
}  # fmt: skip


def encode(request_id: RequestId, out: Reply) -> bytes:
    """One reply line: `{"id": ..., "ok": ..., <the reply's fields>}`."""
    body = _encoder.encode(out)
    head = b'{"id":' + _encoder.encode(request_id) + (b',"ok":false' if isinstance(out, Error) else b',"ok":true')
    return head + (b"," + body[1:] if len(body) > 2 else b"}") + b"\n"


def error(request_id: RequestId, code: str, message: str, retry_after: int | None = None) -> bytes:
    return encode(request_id, Error(error=code, message=message, retry_after=retry_after))
