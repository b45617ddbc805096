"""Flask: log in through authd, keep its token in a secure cookie, gate views on authd's roles.

    app = Flask(__name__)
    authd = Authd(app)                       # or Authd().init_app(app)

    @app.post("/login")
    def do_login():
        try:
            login(request.form["username"], request.form["password"])
        except LoginError as exc:
            return render_template("login.html", error=str(exc)), 401
        return redirect("/")

    @app.get("/reports")
    @permission_required("reports.read")
    def reports(): ...

Settings (app.config): AUTHD_SOCKET (default $AUTHD_SOCKET, then authd's own default),
AUTHD_SERVICE (the authd `[[service]]`, default "web"), AUTHD_COOKIE_NAME ("authd_session"),
AUTHD_COOKIE_SECURE (True: the cookie only travels over HTTPS), AUTHD_COOKIE_SAMESITE ("Lax"),
AUTHD_LOGIN_VIEW (an endpoint to redirect anonymous users to; without it they get a 401).

Signals (`authd.integrations.signals`, re-exported here) are sent with the app as sender, like
Flask's own: `logged_in` (user=User), `logged_out` (user=User or None), `login_failed`
(username=str, reason=the authd error code).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Flask, Response, abort, current_app, g, redirect, request, url_for

from ..client import ClientError, ReplyError
from ..roles import is_permission
from . import COOKIE, DEFAULT_SERVICE, LoginError, ThreadClients, User, bearer_token
from .signals import logged_in, logged_out, login_failed

__all__ = ["Authd", "current_user", "has_permission", "logged_in", "logged_out", "login", "login_failed", "login_required",
           "logout", "permission_required"]

F = TypeVar("F", bound=Callable[..., Any])
CHALLENGE = 'Bearer realm="authd"'

class Authd:
    """The extension: settings, one authd connection per thread, and the cookie hook."""

    def __init__(self, app: Flask | None = None) -> None:
        self.clients: ThreadClients | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        app.config.setdefault("AUTHD_SOCKET", None)
        app.config.setdefault("AUTHD_SERVICE", DEFAULT_SERVICE)
        app.config.setdefault("AUTHD_COOKIE_NAME", COOKIE)
        app.config.setdefault("AUTHD_COOKIE_SECURE", True)
        app.config.setdefault("AUTHD_COOKIE_SAMESITE", "Lax")
        app.config.setdefault("AUTHD_LOGIN_VIEW", None)
        self.clients = ThreadClients(app.config["AUTHD_SOCKET"])
        app.extensions["authd"] = self
        app.after_request(_write_cookie)


def _clients() -> ThreadClients:
    clients = cast(Authd, current_app.extensions["authd"]).clients
    assert clients is not None
    return clients


def _request_token() -> str | None:
    return bearer_token(request.headers.get("Authorization")) or request.cookies.get(current_app.config["AUTHD_COOKIE_NAME"])


def login(username: str, password: str) -> User:
    """Authenticate through authd and open a session; the response carries its cookie.

    Raises `LoginError` (after sending `login_failed`); on success sends `logged_in`.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        reply = _clients().run(lambda c: c.auth(username, password, app.config["AUTHD_SERVICE"], rhost=request.remote_addr))
    except ClientError as exc:
        error = LoginError.from_reply(exc)
        login_failed.send(app, username=username, reason=error.code)
        raise error from None
    session = reply["session"]
    user = User(name=reply["user"], groups=tuple(reply["groups"]), service=app.config["AUTHD_SERVICE"],
                session_id=session["id"], expires_at=session["expires_at"])
    g.authd_user, g.authd_cookie = user, session["token"]
    logged_in.send(app, user=user)
    return user


def logout() -> None:
    """End the authd session of this request (if any), drop the cookie, send `logged_out`."""
    token = _request_token()
    user = current_user() if token is not None else None
    if token is not None:
        try:
            _clients().run(lambda c: c.logout(token))
        except ClientError:
            pass  # already gone, or authd unreachable (then the session idles out)
    g.authd_user, g.authd_cookie = None, ""
    logged_out.send(current_app._get_current_object(), user=user)  # type: ignore[attr-defined]


def current_user() -> User | None:
    """The user of this request's authd session, asked once per request (which keeps it alive)."""
    if "authd_user" in g:
        return cast(User | None, g.authd_user)
    token = _request_token()
    user = None
    if token is not None:
        try:
            user = User.from_session(_clients().run(lambda c: c.session(token))["session"])
        except ReplyError:
            g.authd_cookie = ""  # expired or revoked: forget it
        except ClientError:
            abort(503)
    g.authd_user = user
    return user


def has_permission(permission: str) -> bool:
    """Whether this request's session may do `permission` (False without a session)."""
    cache: dict[str, bool] = g.setdefault("authd_checks", {})
    if permission not in cache:
        token = _request_token() if current_user() is not None else None
        try:
            cache[permission] = token is not None and _clients().run(lambda c: c.check(token, permission))["allowed"]
        except ReplyError:
            cache[permission] = False
        except ClientError:
            abort(503)
    return cache[permission]


def login_required(view: F) -> F:
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if current_user() is None:
            return _anonymous()
        return view(*args, **kwargs)

    return cast(F, wrapper)


def permission_required(permission: str) -> Callable[[F], F]:
    """401 (or the login view) without a session, 403 when authd's roles refuse `permission`."""
    if not is_permission(permission):
        raise ValueError("permission_required: not a valid authd permission name")

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if current_user() is None:
                return _anonymous()
            if not has_permission(permission):
                abort(403)
            return view(*args, **kwargs)

        return cast(F, wrapper)

    return decorate


def _anonymous() -> Any:
    login_view = current_app.config["AUTHD_LOGIN_VIEW"]
    if login_view:
        return redirect(url_for(login_view, next=request.full_path))
    return Response("Login required.\n", 401, {"WWW-Authenticate": CHALLENGE}, mimetype="text/plain")


def _write_cookie(response: Response) -> Response:
    """Set the cookie a login made, or delete one that logout or expiry ended."""
    token = g.get("authd_cookie")
    if token is None:
        return response
    config = current_app.config
    if token:
        response.set_cookie(config["AUTHD_COOKIE_NAME"], token, secure=config["AUTHD_COOKIE_SECURE"], httponly=True,
                            samesite=config["AUTHD_COOKIE_SAMESITE"])
    elif config["AUTHD_COOKIE_NAME"] in request.cookies:
        response.delete_cookie(config["AUTHD_COOKIE_NAME"], secure=config["AUTHD_COOKIE_SECURE"], httponly=True,
                               samesite=config["AUTHD_COOKIE_SAMESITE"])
    return response
