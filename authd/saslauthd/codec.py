"""saslauthd's protocol as pure functions of bytes: counted strings in, one request out.

A request is 4 counted strings (u16 big-endian length, then the bytes, no NUL): login,
password, service, realm. Newer libsasl (cyrus-sasl master) sends a 5th, the client address
`ip;port`; released clients (2.1.27/2.1.28) do not, and wait for the reply. Both write the
whole request at once, so after the 4th field the decoder parses a 5th only if bytes for it
are already buffered; with nothing buffered it says `waiting_for_fifth`, and the listener
calls `finish()` at once (a request is never split between reads). The reply is one counted string, `OK`
or `NO <text>`; clients test only its first two bytes. One request per connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_FIELD = 256  # saslauthd's MAX_REQ_LEN: a longer field is answered `NO` and the connection closed
_LENGTH = struct.Struct(">H")
_NAMES = ("login", "password", "service", "realm", "client address")


@dataclass(frozen=True, slots=True)
class Request:
    login: str
    password: str
    service: str
    realm: str
    client_addr: str | None = None

    def __repr__(self) -> str:  # the password must not reach a log or traceback via repr
        return f"Request(login={self.login!r}, service={self.service!r}, realm={self.realm!r}, client_addr={self.client_addr!r})"

    @property
    def rhost(self) -> str | None:
        """The client's address without its port (`ip;port`, as libsasl and Postfix send it)."""
        if not self.client_addr:
            return None
        return self.client_addr.rpartition(";")[0] or self.client_addr


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request that cannot be served; `reason` goes into the `NO` reply, never a value."""

    reason: str


class Decoder:
    """Collects one request's fields; `feed` returns it (or why not) once complete."""

    def __init__(self, max_field: int = MAX_FIELD) -> None:
        self.max_field = max_field
        self._buffer = bytearray()
        self._fields: list[bytes] = []
        self.done = False

    @property
    def waiting_for_fifth(self) -> bool:
        """Four fields are in and nothing more is buffered: a 4-field client waits for us now."""
        return not self.done and len(self._fields) == 4 and not self._buffer

    def feed(self, data: bytes) -> Request | Malformed | None:
        if self.done:
            return None  # one request per connection: anything after it is ignored
        self._buffer += data
        while len(self._fields) < 5:
            if len(self._buffer) < _LENGTH.size:
                return None
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > self.max_field:
                return self._end(Malformed(f"{_NAMES[len(self._fields)]} longer than {self.max_field} bytes"))
            if len(self._buffer) < _LENGTH.size + size:
                return None
            self._fields.append(bytes(self._buffer[_LENGTH.size : _LENGTH.size + size]))
            del self._buffer[: _LENGTH.size + size]
            if len(self._fields) == 4 and not self._buffer:
                return None  # maybe a 5th is on its way: see `waiting_for_fifth`
        return self._end(_request(self._fields))

    def finish(self) -> Request | Malformed | None:
        """No 5th field came: the request is the 4 fields (None if those are not all in)."""
        if self.done or len(self._fields) != 4:
            return None
        return self._end(_request(self._fields))

    def _end(self, result: Request | Malformed) -> Request | Malformed:
        self.done = True
        self._buffer.clear()
        self._fields.clear()
        return result


def _request(fields: list[bytes]) -> Request | Malformed:
    try:
        texts = [field.decode("utf-8") for field in fields]
    except UnicodeDecodeError:
        return Malformed("fields must be UTF-8")
    if any("\0" in text for text in texts):
        return Malformed("NUL byte in a field")
    if not texts[0]:
        return Malformed("NULL login received")  # saslauthd's own words
    if not texts[1]:
        return Malformed("NULL password received")
    return Request(*texts[:4], client_addr=texts[4] if len(texts) == 5 else None)


def encode_request(login: str, password: str, service: str, realm: str = "", client_addr: str | None = None) -> bytes:
    """What a client sends (for tests and the benchmark's reference)."""
    fields = [login, password, service, realm] + ([client_addr] if client_addr is not None else [])
    return b"".join(_counted(field.encode()) for field in fields)


def ok() -> bytes:
    return _counted(b"OK")


def no(text: str) -> bytes:
    return _counted(b"NO " + text.encode("ascii", "replace")[:1000])


def _counted(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data
