"""Django: an authentication backend that logs users in through authd and answers `has_perm`
from authd's roles.

    AUTHENTICATION_BACKENDS = ["authd.integrations.django.AuthdBackend"]
    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "authd.integrations.django.AuthdMiddleware",     # after AuthenticationMiddleware
        ...,
    ]
    AUTHD = {"SOCKET": None, "SERVICE": "web", "MIRROR_GROUPS": True}   # all optional

`authenticate()` asks authd (PAM, lockout, the service's allow/deny lists), then creates or
updates the Django user (with an unusable Django password) and, with MIRROR_GROUPS, sets its
Django groups to its Unix groups as captured at login. Django's own `login()` and `logout()`
do the rest, so `user_logged_in`, `user_logged_out` and `user_login_failed` fire as usual;
this module's receivers keep the authd token in the Django session and end the authd session
on logout. `user.has_perm("blog.add_post")` and `@permission_required` are `check`s against
authd's roles (Django permission names are already dotted lowercase names).

The middleware asks authd about the token on every request: a session that expired, was
revoked (`authctl revoke`) or ended elsewhere logs the user out of Django too.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib import auth
from django.contrib.auth.backends import BaseBackend
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, Group
from django.contrib.auth.signals import user_logged_in, user_logged_out
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse

from ..client import ClientError, ReplyError
from ..roles import is_permission
from . import DEFAULT_SERVICE, ThreadClients

log = logging.getLogger(__name__)  # Django apps configure stdlib logging
TOKEN_KEY = "_authd_token"  # in request.session, next to Django's own _auth_user_id
_request_token: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar("authd_token", default=(None, None))
_clients: dict[Any, ThreadClients] = {}


def _setting(name: str, default: Any) -> Any:
    return getattr(settings, "AUTHD", {}).get(name, default)


def clients() -> ThreadClients:
    socket = _setting("SOCKET", None)
    if socket not in _clients:
        _clients[socket] = ThreadClients(socket)
    return _clients[socket]


class AuthdBackend(BaseBackend):
    def authenticate(self, request: HttpRequest | None, username: str | None = None, password: str | None = None,
                     **kwargs: Any) -> AbstractBaseUser | None:
        if username is None or password is None:
            return None
        rhost = request.META.get("REMOTE_ADDR") if request is not None else None
        service = _setting("SERVICE", DEFAULT_SERVICE)
        try:
            reply = clients().run(lambda c: c.auth(username, password, service, rhost=rhost))
        except ReplyError as exc:
            if exc.code == "locked_out":
                raise PermissionDenied("locked out") from None  # no other backend may try a locked account
            return None
        except ClientError as exc:
            log.error("authd unreachable; login refused: %s", exc)
            return None
        user = _synced_user(reply["user"], reply["groups"])
        token = reply["session"]["token"]
        if not user.is_active:  # disabled in Django: authd's yes is not enough
            _end(token)
            return None
        user.authd_token = token  # type: ignore[attr-defined]  # for has_perm now and user_logged_in below
        return user

    def get_user(self, user_id: Any) -> AbstractBaseUser | None:
        model = auth.get_user_model()
        try:
            return model._default_manager.get(pk=user_id)
        except model.DoesNotExist:
            return None

    def has_perm(self, user_obj: AbstractBaseUser | AnonymousUser, perm: str, obj: Any = None) -> bool:
        """authd's `check` for this user's session; False without one, for objects, or inactive users."""
        if obj is not None or not user_obj.is_active or not is_permission(perm):
            return False
        token = _token_of(user_obj)
        if token is None:
            return False
        cache: dict[str, bool] = user_obj.__dict__.setdefault("_authd_perms", {})
        if perm not in cache:
            try:
                cache[perm] = bool(clients().run(lambda c: c.check(token, perm))["allowed"])
            except ClientError:  # invalid session or authd unreachable: no
                return False
        return cache[perm]


class AuthdMiddleware:
    """Makes the request's authd token known to `has_perm`; logs out when authd ended the session."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        token = request.session.get(TOKEN_KEY)
        if token is not None:
            try:
                clients().run(lambda c: c.session(token))
            except ReplyError:
                auth.logout(request)  # sends user_logged_out and flushes the session
                token = None
            except ClientError as exc:
                log.error("authd unreachable; permissions refused for this request: %s", exc)
        bound = _request_token.set((request.session.get(auth.SESSION_KEY), token))
        try:
            return self.get_response(request)
        finally:
            _request_token.reset(bound)


@receiver(user_logged_in, dispatch_uid="authd-remember-token")
def _remember_token(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    token = getattr(user, "authd_token", None)
    if token is not None and request is not None:
        request.session[TOKEN_KEY] = token


@receiver(user_logged_out, dispatch_uid="authd-end-session")
def _end_session(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    token = request.session.get(TOKEN_KEY) if request is not None else None
    if token is not None:
        _end(token)


def _end(token: str) -> None:
    try:
        clients().run(lambda c: c.logout(token))
    except ClientError:
        pass  # already ended, or authd unreachable (the session then idles out)


def _token_of(user: Any) -> str | None:
    """The token of the session this user object came from: set at login, or this request's."""
    if (token := getattr(user, "authd_token", None)) is not None:
        return str(token)
    user_id, token = _request_token.get()
    return token if user_id is not None and str(user.pk) == str(user_id) else None


def _synced_user(name: str, groups: list[str]) -> Any:
    model = auth.get_user_model()
    user, created = model._default_manager.get_or_create(**{model.USERNAME_FIELD: name})
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    if _setting("MIRROR_GROUPS", True):
        user.groups.set([Group.objects.get_or_create(name=group)[0] for group in groups])
    return user
