"""Client library for authd's native protocol, sync and asyncio; `authctl` is built on it.

    with Client() as c:
        session = c.auth("alice", password, service="login")["session"]

    async with AsyncClient() as c:          # concurrent calls share one pipelined connection
        a, b = await asyncio.gather(c.hello(), c.auth("bob", pw, service="imap"))

    for event in Client().subscribe(events=["auth.*"]):   # a stream; AsyncClient: `async for`
        print(event.name, event.user)

A reply with `"ok": false` raises `ReplyError` (its `code` is the protocol's error code); a
stream that ends raises `StreamEnded`, whose `resume_after` is where to subscribe again.
Replies are dicts; with `typed=True` each op returns the server's own reply Struct instead
(`authd.protocol.AuthReply`, `StatusReply`, ...).
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import os
import socket
from pathlib import Path
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec

from .events.model import Event
from .protocol import REPLY_TYPES

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(dict[str, Any])
MAX_REPLY = 16 * 1024 * 1024
DEFAULT_SERVICE = "login"  # what `auth` asks for when the caller names no service (authctl too)


def default_socket() -> str:
    """$AUTHD_SOCKET, else ./authd.sock when it exists (a checkout), else the systemd path."""
    if env := os.environ.get("AUTHD_SOCKET"):
        return env
    return "authd.sock" if Path("authd.sock").exists() else "/run/authd/authd.sock"


class ClientError(Exception):
    """Could not talk to authd (no socket, connection lost, garbled reply)."""


class ReplyError(ClientError):
    def __init__(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.code: str = reply.get("error", "unknown")
        super().__init__(f"{self.code}: {reply.get('message', '')}")


class StreamEnded(ReplyError):
    """authd ended a subscription (`too_slow`, `shutting_down`); resume after `resume_after`."""

    @property
    def resume_after(self) -> str | None:
        return self.reply.get("resume_after")


def _streamed(reply: dict[str, Any]) -> Event | None:
    """An event of a subscription, None for its confirmation; raises at its end."""
    if not reply.get("ok"):
        raise StreamEnded(reply) if "resume_after" in reply or reply.get("error") == "shutting_down" else ReplyError(reply)
    return msgspec.convert(reply["event"], Event) if "event" in reply else None


def _subscribe_fields(after: str, events: list[str] | None, services: list[str] | None) -> dict[str, Any]:
    return {"after": after, "events": events, "services": services}


def _request(request_id: int, op: str, fields: dict[str, Any]) -> bytes:
    return _encoder.encode({"id": request_id, "op": op, **{k: v for k, v in fields.items() if v is not None}}) + b"\n"


def _result(op: str, reply: dict[str, Any], typed: bool) -> Any:
    if not reply.get("ok"):
        raise ReplyError(reply)
    if typed and op in REPLY_TYPES:
        try:
            return msgspec.convert(reply, REPLY_TYPES[op])
        except msgspec.ValidationError as exc:
            raise ClientError(f"unexpected `{op}` reply: {exc}") from None
    return reply


class _Ops(abc.ABC):
    """The protocol's ops as methods over `call` (which is a coroutine in AsyncClient)."""

    @abc.abstractmethod
    def call(self, op: str, **fields: Any) -> Any: ...

    def hello(self) -> Any:
        return self.call("hello")

    def auth(self, user: str, password: str, service: str = DEFAULT_SERVICE, *, rhost: str | None = None,
             ruser: str | None = None, open_session: bool = True) -> Any:
        return self.call("auth", user=user, password=password, service=service, rhost=rhost, ruser=ruser,
                         open_session=open_session)

    def session(self, token: str) -> Any:
        return self.call("session", token=token)

    def logout(self, token: str) -> Any:
        return self.call("logout", token=token)

    def sessions(self, user: str | None = None) -> Any:
        return self.call("sessions", user=user)

    def revoke(self, *, session_id: str | None = None, user: str | None = None) -> Any:
        return self.call("revoke", session_id=session_id, user=user)

    def status(self) -> Any:
        return self.call("status")

    def reload(self) -> Any:
        return self.call("reload")

    def metrics(self) -> Any:
        return self.call("metrics")

    def lockouts(self) -> Any:
        return self.call("lockouts")

    def unlock(self, key: str, scope: str | None = None) -> Any:
        return self.call("unlock", key=key, scope=scope)

    def lastlog(self, user: str) -> Any:
        return self.call("lastlog", user=user)

    def cache_flush(self, user: str | None = None) -> Any:
        return self.call("cache_flush", user=user)


class Client(_Ops):
    """Blocking client: one request at a time over one persistent connection."""

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout: float | None = 60.0, *,
                 typed: bool = False) -> None:
        self.path = os.fspath(path or default_socket())
        self.timeout = timeout
        self.typed = typed
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._ids = itertools.count(1)

    def connect(self) -> Client:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                raise ClientError(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
            self._sock = sock
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, **fields: Any) -> Any:
        sock = self.connect()._sock
        assert sock is not None
        request_id = next(self._ids)
        try:
            sock.sendall(_request(request_id, op, fields))
            while True:
                reply = self._read_line(sock)
                if reply.get("id") in (request_id, None):
                    return _result(op, reply, self.typed)
        except OSError as exc:
            self.close()
            raise ClientError(f"connection to {self.path} failed: {exc.strerror or exc}") from None

    def subscribe(self, after: str = "now", events: list[str] | None = None,
                  services: list[str] | None = None) -> Iterator[Event]:
        """Events as they happen, after event id `after` ("now", "oldest"); ends with StreamEnded.

        The stream has this connection to itself until it ends (close the client to stop).
        """
        sock = self.connect()._sock
        assert sock is not None
        request_id = next(self._ids)
        try:
            sock.sendall(_request(request_id, "subscribe", _subscribe_fields(after, events, services)))
            sock.settimeout(None)  # events come when they happen
            while True:
                reply = self._read_line(sock)
                if reply.get("id") in (request_id, None) and (event := _streamed(reply)) is not None:
                    yield event
        except OSError as exc:
            self.close()
            raise ClientError(f"connection to {self.path} failed: {exc.strerror or exc}") from None

    def _read_line(self, sock: socket.socket) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = sock.recv(65536)
            if not chunk:
                self.close()
                raise ClientError("authd closed the connection")
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY:
                raise ClientError("reply too large")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return _decoder.decode(line)
        except msgspec.DecodeError:
            raise ClientError("garbled reply") from None


class AsyncClient(_Ops):
    """asyncio client: concurrent calls are pipelined on one connection, matched by id."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, typed: bool = False) -> None:
        self.path = os.fspath(path or default_socket())
        self.typed = typed
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._streams: dict[int, asyncio.Queue[dict[str, Any] | ClientError]] = {}
        self._ids = itertools.count(1)

    async def connect(self) -> AsyncClient:
        if self._writer is None:
            try:
                reader, self._writer = await asyncio.open_unix_connection(self.path, limit=MAX_REPLY)
            except OSError as exc:
                raise ClientError(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
            self._reader_task = asyncio.create_task(self._read(reader))
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, op: str, **fields: Any) -> Any:
        await self.connect()
        assert self._writer is not None
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            self._writer.write(_request(request_id, op, fields))
            await self._writer.drain()
            return _result(op, await future, self.typed)
        finally:
            self._waiting.pop(request_id, None)

    async def subscribe(self, after: str = "now", events: list[str] | None = None,
                        services: list[str] | None = None) -> AsyncIterator[Event]:
        """Events as they happen (see `Client.subscribe`), beside this client's other calls."""
        await self.connect()
        assert self._writer is not None
        request_id = next(self._ids)
        queue: asyncio.Queue[dict[str, Any] | ClientError] = asyncio.Queue()
        self._streams[request_id] = queue
        try:
            self._writer.write(_request(request_id, "subscribe", _subscribe_fields(after, events, services)))
            await self._writer.drain()
            while True:
                item = await queue.get()
                if isinstance(item, ClientError):
                    raise item
                if (event := _streamed(item)) is not None:
                    yield event
        finally:
            self._streams.pop(request_id, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error: ClientError = ClientError("authd closed the connection")
        try:
            while line := await reader.readline():
                reply = _decoder.decode(line)
                if (stream := self._streams.get(reply.get("id"))) is not None:  # type: ignore[arg-type]
                    stream.put_nowait(reply)
                    continue
                future = self._waiting.get(reply.get("id"))  # type: ignore[arg-type]
                if future is not None and not future.done():
                    future.set_result(reply)
                elif reply.get("id") is None:
                    error = ReplyError(reply)
                    break
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            error = ClientError(f"connection to {self.path} failed: {exc}")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        for stream in self._streams.values():
            stream.put_nowait(error)
        self._writer = None
