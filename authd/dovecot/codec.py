"""Dovecot's auth-client protocol as pure functions of bytes: lines in, events out.

LF-terminated lines of TAB-separated fields (`\\001` escapes a TAB, LF, CR, NUL or itself).
The server sends its whole handshake at connect (`VERSION`, one `MECH` per mechanism, `SPID`,
`CUID`, `COOKIE`, `DONE`): Exim reads to `DONE` before it writes. The client answers
`VERSION 1 x` and `CPID`, then any number of `AUTH <id> <mech> service=... [rip= lip= secured]
[resp=<base64>]`, and `CONT <id> <base64>` to answer a challenge. Requests are independent and
pipelined. A `Decoder` holds one connection's conversation state: `feed` returns `Send` (a
challenge or a refusal to write now), `Authenticate` (a complete login for the auth decision)
and `Close` (the client broke the protocol); `ok` and `fail` encode the verdicts.

Mechanisms: PLAIN (`authzid NUL authcid NUL password`; a non-empty authzid other than the
authcid is refused) and LOGIN (challenges "Username:" then "Password:"). Base64 is decoded
strictly. Failure reasons are plain ASCII and never tell an unknown user from a wrong password.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

MAX_LINE = 16384  # Dovecot's AUTH_CLIENT_MAX_LINE_LENGTH
MAX_USER = 256
MAX_PASSWORD = 4096
MECHANISMS = ("PLAIN", "LOGIN")
_USERNAME, _PASSWORD = "VXNlcm5hbWU6", "UGFzc3dvcmQ6"  # base64 of "Username:" and "Password:"
_ESCAPES = {"\001": "\0011", "\t": "\001t", "\n": "\001n", "\r": "\001r", "\0": "\0010"}
_UNESCAPES = {"1": "\001", "t": "\t", "n": "\n", "r": "\r", "0": "\0"}
PLAINTEXT_REFUSED = "Plaintext authentication disallowed on non-secure connections"


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The client broke the protocol; `reason` is for the log, never a client value."""

    reason: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    id: int
    user: str
    password: str
    service: str
    rip: str | None
    secured: bool

    def __repr__(self) -> str:  # the password must not reach a log or traceback via repr
        return f"Authenticate(id={self.id}, user={self.user!r}, service={self.service!r}, rip={self.rip!r})"


Event = Send | Close | Authenticate


@dataclass(slots=True)
class _Pending:
    """An AUTH waiting for the client's CONT: what it has said so far."""

    mech: str
    service: str
    rip: str | None
    secured: bool
    user: str | None = None
    deciding: bool = False  # handed to the auth decision; no more CONT for it


def handshake(pid: int, cuid: int, cookie: str) -> bytes:
    mechs = "".join(f"MECH\t{mech}\tplaintext\n" for mech in MECHANISMS)
    return f"VERSION\t1\t2\n{mechs}SPID\t{pid}\nCUID\t{cuid}\nCOOKIE\t{cookie}\nDONE\n".encode()


def ok(request_id: int, user: str) -> bytes:
    return _line("OK", str(request_id), f"user={user}")


def fail(request_id: int, reason: str, *, code: str | None = None, user: str | None = None) -> bytes:
    fields = [f"user={user}"] if user else []
    fields += [f"code={code}"] if code else []
    return _line("FAIL", str(request_id), *fields, f"reason={reason}")


def _cont(request_id: int, challenge: str) -> bytes:
    return _line("CONT", str(request_id), challenge)  # the TAB stays even before an empty challenge


def _line(*fields: str) -> bytes:
    return "\t".join(escape(field) for field in fields).encode("utf-8", "surrogateescape") + b"\n"


def escape(value: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in value)


def unescape(value: str) -> str:
    if "\001" not in value:
        return value
    out, chars = [], iter(value)
    for c in chars:
        out.append(_UNESCAPES.get(next(chars, ""), "") if c == "\001" else c)
    return "".join(out)


class Decoder:
    """One client connection's side of the protocol."""

    def __init__(self, *, require_secured: bool = False, max_line: int = MAX_LINE) -> None:
        self.require_secured = require_secured
        self.max_line = max_line
        self._buffer = bytearray()
        self._versioned = False
        self._pending: dict[int, _Pending] = {}
        self._closed = False

    def feed(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        if self._closed:
            return out
        self._buffer += data
        while not self._closed:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line:
                    out.append(self._close(f"line longer than {self.max_line} bytes"))
                return out
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if end > self.max_line:
                out.append(self._close(f"line longer than {self.max_line} bytes"))
            else:
                out.extend(self._line(line))
        return out

    def forget(self, request_id: int) -> None:
        """The request is answered: its id may be used again."""
        self._pending.pop(request_id, None)

    def _close(self, reason: str) -> Close:
        self._closed = True
        self._buffer.clear()
        self._pending.clear()
        return Close(reason)

    def _line(self, raw: bytes) -> list[Event]:
        try:
            fields = raw.rstrip(b"\r").decode("utf-8").split("\t")
        except UnicodeDecodeError:
            return [self._close("line is not UTF-8")]
        command, args = fields[0], fields[1:]
        if command == "VERSION":
            if not args or args[0] != "1":
                return [self._close("unsupported protocol version")]
            self._versioned = True
            return []
        if not self._versioned:
            return [self._close("no VERSION before the first command")]
        if command == "AUTH":
            return self._auth(args)
        if command == "CONT":
            return self._cont(args)
        return []  # CPID, and whatever a newer client adds: nothing to answer

    def _auth(self, args: list[str]) -> list[Event]:
        if len(args) < 2 or (request_id := _id(args[0])) is None:
            return [self._close("AUTH without a valid id")]
        if request_id in self._pending:
            return [self._close("AUTH reuses an id still in use")]
        mech = args[1].upper()
        params: dict[str, str] = {}
        flags: set[str] = set()
        for arg in args[2:]:
            key, sep, value = arg.partition("=")
            if sep:
                params[key] = unescape(value)
            else:
                flags.add(key)
        if mech not in MECHANISMS:
            return [Send(fail(request_id, "Unsupported authentication mechanism"))]
        service = params.get("service", "")
        if not service:
            return [Send(fail(request_id, "No service given"))]
        secured = "secured" in flags
        if self.require_secured and not secured:
            return [Send(fail(request_id, PLAINTEXT_REFUSED))]
        state = _Pending(mech, service, params.get("rip") or None, secured)
        self._pending[request_id] = state
        if "resp" not in params:
            return [Send(_cont(request_id, "" if mech == "PLAIN" else _USERNAME))]
        return self._step(request_id, state, params["resp"])

    def _cont(self, args: list[str]) -> list[Event]:
        if not args or (request_id := _id(args[0])) is None or request_id not in self._pending:
            return [self._close("CONT for no pending AUTH")]
        if self._pending[request_id].deciding:
            return [self._close("CONT for an AUTH already complete")]
        return self._step(request_id, self._pending[request_id], args[1] if len(args) > 1 else "")

    def _step(self, request_id: int, state: _Pending, encoded: str) -> list[Event]:
        """The client's next response for `state`: a challenge, a login to decide, or FAIL."""
        try:
            data = binascii.a2b_base64(encoded.encode("ascii"), strict_mode=True) if encoded else b""
            text = data.decode("utf-8")
        except (binascii.Error, UnicodeError):
            return self._refuse(request_id, "Invalid base64 data")
        if state.mech == "PLAIN":
            parts = text.split("\0")
            if len(parts) != 3:
                return self._refuse(request_id, "Invalid PLAIN response")
            authzid, user, password = parts
            if authzid and authzid != user:
                return self._refuse(request_id, "Authorization identity differs from the login")
            return self._login(request_id, state, user, password)
        if state.user is None:
            state.user = text
            return [Send(_cont(request_id, _PASSWORD))]
        return self._login(request_id, state, state.user, text)

    def _login(self, request_id: int, state: _Pending, user: str, password: str) -> list[Event]:
        if not user or not password or "\0" in user + password:
            return self._refuse(request_id, "Empty or invalid login")
        if len(user) > MAX_USER or len(password) > MAX_PASSWORD:
            return self._refuse(request_id, "Login too long")
        state.deciding = True
        return [Authenticate(request_id, user, password, state.service, state.rip, state.secured)]

    def _refuse(self, request_id: int, reason: str) -> list[Event]:
        self._pending.pop(request_id, None)
        return [Send(fail(request_id, reason))]


def _id(text: str) -> int | None:
    """A request id: a nonzero unsigned 32-bit decimal."""
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        return None
    value = int(text)
    return value if 0 < value < 1 << 32 else None
