"""What the Flask, FastAPI and Django integrations share: the user, the token, the connection.

Each framework module (`authd.integrations.flask`, `.fastapi`, `.django`) is imported only by
apps that use that framework, and needs its optional extra (`pip install authd[flask]`); this
module needs nothing beyond authd itself.

The authd session is the web session: its token is what the browser keeps (in an HttpOnly,
Secure cookie) or an API client sends (`Authorization: Bearer`), and every request asks authd
about it, so `authctl revoke`, an idle timeout or a policy reload take effect on the next
request, and each of those requests counts as activity for the idle timeout.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..client import AsyncClient, Client, ClientError, ReplyError

T = TypeVar("T")
COOKIE = "authd_session"
DEFAULT_SERVICE = "web"


@dataclass(frozen=True, slots=True)
class User:
    """The user behind a live authd session, as the `session` op reports it."""

    name: str
    groups: tuple[str, ...]
    service: str
    session_id: str
    expires_at: float

    @classmethod
    def from_session(cls, session: dict[str, Any]) -> User:
        return cls(name=session["user"], groups=tuple(session["groups"]), service=session["service"],
                   session_id=session["id"], expires_at=session["expires_at"])


class LoginError(Exception):
    """A login authd refused, with its protocol error code (`auth_failed`, `locked_out`, ...).

    The message is safe to show: it never says whether the user exists, and never repeats the
    password. `code` is `unavailable` when authd could not be reached.
    """

    MESSAGES = {"auth_failed": "Wrong user name or password.", "locked_out": "Too many failed logins; try again later.",
                "not_authorized": "You may not log in here.", "unavailable": "Login is unavailable; try again later."}

    def __init__(self, code: str, retry_after: float | None = None) -> None:
        self.code = code
        self.retry_after = retry_after
        super().__init__(self.MESSAGES.get(code, "Login failed."))

    @classmethod
    def from_reply(cls, exc: ClientError) -> LoginError:
        if isinstance(exc, ReplyError):
            return cls(exc.code, exc.reply.get("retry_after"))
        return cls("unavailable")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (RFC 6750), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class ThreadClients:
    """One blocking `Client` per thread (WSGI servers run a request per thread).

    A connection authd closed while it sat idle (`daemon.limits.idle_timeout`) is noticed on the
    next call, which is then made once more on a fresh connection.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None) -> None:
        self.socket = socket
        self._local = threading.local()

    def run(self, call: Callable[[Client], T]) -> T:
        for attempt in (1, 2):
            client = getattr(self._local, "client", None)
            if client is None:
                client = self._local.client = Client(self.socket, timeout=30.0)
            try:
                return call(client)
            except ReplyError:
                raise
            except ClientError:
                client.close()
                self._local.client = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class LoopClient:
    """One pipelined `AsyncClient` per event loop (so one per process under uvicorn), made on
    first use and retried once on a fresh connection like `ThreadClients`."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, max_inflight: int = 32) -> None:
        self.socket = socket
        self.max_inflight = max_inflight
        self._client: AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client, self._loop = AsyncClient(self.socket, max_inflight=self.max_inflight), loop
        return self._client

    async def run(self, call: Callable[[AsyncClient], Awaitable[T]]) -> T:
        for attempt in (1, 2):
            client = self.client()
            try:
                return await call(client)
            except ReplyError:
                raise
            except ClientError:
                await client.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
