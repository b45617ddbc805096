"""FastAPI: dependencies that ask authd who is calling and what they may do.

    authd = Authd(service="web")             # one per app; socket from $AUTHD_SOCKET by default

    @app.get("/me")
    async def me(user: User = Depends(authd.current_user)): ...

    @app.post("/posts", dependencies=[Depends(authd.require("blog.add_post"))])
    async def add_post(): ...

Every dependency goes through one pipelined `AsyncClient` per process (per event loop), so
200 concurrent requests share one connection to authd instead of opening 200.

The token comes from `Authorization: Bearer <token>`, else from the `authd_session` cookie
(`authd.set_cookie` writes it after `authd.login`). Anonymous or expired: 401 with
`WWW-Authenticate: Bearer` (RFC 6750's `error="invalid_token"` when a token was sent);
refused by authd's roles: 403 (`error="insufficient_scope"`); authd unreachable: 503.

`login` and `logout` send the blinker signals of `authd.integrations.signals` (re-exported
here) with the `Authd` object as sender; receivers are plain functions run in the request.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request, Response

from ..client import ClientError, ReplyError
from ..roles import is_permission
from . import COOKIE, DEFAULT_SERVICE, LoginError, LoopClient, User, bearer_token
from .signals import logged_in, logged_out, login_failed

__all__ = ["Authd", "logged_in", "logged_out", "login_failed"]

REALM = 'Bearer realm="authd"'


class Authd:
    def __init__(self, socket: str | os.PathLike[str] | None = None, service: str = DEFAULT_SERVICE, *,
                 cookie_name: str = COOKIE, cookie_secure: bool = True, max_inflight: int = 32) -> None:
        self.service = service
        self.cookie_name = cookie_name
        self.cookie_secure = cookie_secure
        self.clients = LoopClient(socket, max_inflight=max_inflight)

    def token(self, request: Request) -> str | None:
        return bearer_token(request.headers.get("authorization")) or request.cookies.get(self.cookie_name)

    async def current_user(self, request: Request) -> User:
        """Dependency: the session's user; 401 without a live session. Cached per request."""
        if isinstance(cached := getattr(request.state, "authd_user", None), User):
            return cached
        token = self.token(request)
        if token is None:
            raise HTTPException(401, "Login required.", headers={"WWW-Authenticate": REALM})
        try:
            reply = await self.clients.run(lambda c: c.session(token))
        except ReplyError:
            raise HTTPException(401, "Session expired or invalid.",
                                headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'}) from None
        except ClientError:
            raise HTTPException(503, "authd is unavailable.") from None
        user = request.state.authd_user = User.from_session(reply["session"])
        return user

    def require(self, permission: str) -> Callable[[Request], Awaitable[User]]:
        """Dependency factory: the user, if authd's roles let the session do `permission`; else 403."""
        if not is_permission(permission):
            raise ValueError("require: not a valid authd permission name")

        async def dependency(request: Request) -> User:
            user = await self.current_user(request)
            token = self.token(request)
            assert token is not None
            try:
                allowed = (await self.clients.run(lambda c: c.check(token, permission)))["allowed"]
            except ReplyError:  # the session ended between the two questions
                raise HTTPException(401, "Session expired or invalid.",
                                    headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'}) from None
            except ClientError:
                raise HTTPException(503, "authd is unavailable.") from None
            if not allowed:
                raise HTTPException(403, "Permission denied.",
                                    headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{permission}"'})
            return user

        dependency.__name__ = f"require_{permission.replace('.', '_').replace('-', '_')}"
        return dependency

    async def login(self, username: str, password: str, request: Request | None = None) -> tuple[User, str]:
        """Authenticate through authd and open a session: the user and the token to hand out
        (as a cookie with `set_cookie`, or in a JSON body for API clients). Raises `LoginError`."""
        rhost = request.client.host if request is not None and request.client is not None else None
        try:
            reply = await self.clients.run(lambda c: c.auth(username, password, self.service, rhost=rhost))
        except ClientError as exc:
            error = LoginError.from_reply(exc)
            login_failed.send(self, username=username, reason=error.code)
            raise error from None
        session = reply["session"]
        user = User(name=reply["user"], groups=tuple(reply["groups"]), service=self.service, session_id=session["id"],
                    expires_at=session["expires_at"])
        logged_in.send(self, user=user)
        return user, session["token"]

    async def logout(self, request: Request, response: Response) -> None:
        """End the request's authd session (if any), delete the cookie, send `logged_out`."""
        token = self.token(request)
        user = None
        if token is not None:
            try:
                user = User.from_session((await self.clients.run(lambda c: c.session(token)))["session"])
                await self.clients.run(lambda c: c.logout(token))
            except ClientError:
                pass  # already gone, or authd unreachable (then the session idles out)
        response.delete_cookie(self.cookie_name, secure=self.cookie_secure, httponly=True, samesite="lax")
        logged_out.send(self, user=user)

    def set_cookie(self, response: Response, token: str) -> None:
        response.set_cookie(self.cookie_name, token, secure=self.cookie_secure, httponly=True, samesite="lax")

    async def close(self) -> None:
        """Close this process's connection (from the app's lifespan shutdown)."""
        await self.clients.close()
