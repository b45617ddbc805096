"""The Django integration through Django's own test client against a real authd.

Django is configured once for this process (an in-memory database, this module as URLconf);
each test points the `AUTHD` setting at its own daemon.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="test-only",
    ALLOWED_HOSTS=["testserver"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions"],
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "authd.integrations.django.AuthdMiddleware",
    ],
    AUTHENTICATION_BACKENDS=["authd.integrations.django.AuthdBackend"],
    ROOT_URLCONF=__name__,
    SESSION_COOKIE_SECURE=True,
    USE_TZ=True,
)
django.setup()

from django.contrib.auth import authenticate, get_user_model, login, logout  # noqa: E402
from django.contrib.auth.decorators import login_required, permission_required  # noqa: E402
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.test import Client, override_settings  # noqa: E402
from django.urls import path  # noqa: E402

from ..daemon import CANARY, PASSWORD, Daemon  # noqa: E402


def login_view(request: HttpRequest) -> JsonResponse:
    user = authenticate(request, username=request.POST["username"], password=request.POST["password"])
    if user is None:
        return JsonResponse({"error": "login failed"}, status=401)
    login(request, user)
    return JsonResponse({"user": user.get_username()})


def logout_view(request: HttpRequest) -> JsonResponse:
    logout(request)
    return JsonResponse({"ok": True})


@login_required(login_url="/login")
def me(request: HttpRequest) -> JsonResponse:
    user: Any = request.user
    return JsonResponse({"user": user.get_username(), "groups": sorted(g.name for g in user.groups.all()),
                         "can_add": user.has_perm("blog.add_post"), "can_delete": user.has_perm("blog.delete_post")})


@permission_required("blog.add_post", raise_exception=True)
def add_post(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


urlpatterns = [path("login", login_view), path("logout", logout_view), path("me", me), path("posts/add", add_post)]


@pytest.fixture(scope="module", autouse=True)
def database() -> None:
    call_command("migrate", verbosity=0)


@pytest.fixture
def client(shared_daemon: Daemon) -> Iterator[Client]:
    with override_settings(AUTHD={"SOCKET": str(shared_daemon.socket), "SERVICE": "login"}):
        yield Client()


@pytest.fixture
def signals() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    heard: list[tuple[str, dict[str, Any]]] = []

    def receiver(name: str) -> Any:
        def receive(sender: Any, **kwargs: Any) -> None:
            heard.append((name, kwargs))
        return receive

    receivers = {signal: receiver(name) for signal, name in
                 ((user_logged_in, "logged_in"), (user_logged_out, "logged_out"), (user_login_failed, "login_failed"))}
    for signal, fn in receivers.items():
        signal.connect(fn)
    yield heard
    for signal, fn in receivers.items():
        signal.disconnect(fn)


def log_in(client: Client, user: str = "alice", password: str = PASSWORD) -> Any:
    return client.post("/login", {"username": user, "password": password}, secure=True)


def test_login_creates_the_user_and_fires_user_logged_in(client: Client, signals: list[Any]) -> None:
    assert log_in(client).json() == {"user": "alice"}
    user = get_user_model().objects.get(username="alice")
    assert not user.has_usable_password(), "Django itself can never check a password for it"
    assert [name for name, _ in signals] == ["logged_in"] and signals[0][1]["user"] == user
    assert client.get("/me", secure=True).json() == {"user": "alice", "groups": [], "can_add": True, "can_delete": False}


def test_groups_are_mirrored_and_grant_through_authd(client: Client) -> None:
    log_in(client, "root")
    assert client.get("/me", secure=True).json() == {"user": "root", "groups": ["root"], "can_add": True, "can_delete": True}


def test_failed_login_fires_user_login_failed(client: Client, signals: list[Any]) -> None:
    response = log_in(client, password=CANARY)
    assert response.status_code == 401
    ((name, kwargs),) = signals
    assert name == "login_failed" and kwargs["credentials"]["username"] == "alice"
    assert CANARY not in str(kwargs["credentials"]), "Django masks the password in the signal"
    assert client.get("/me", secure=True).status_code == 302


def test_permission_required_uses_authd_roles(client: Client, shared_daemon: Daemon) -> None:
    log_in(client)
    assert client.get("/posts/add", secure=True).status_code == 200
    bob = Client()
    log_in(bob, "bob")
    assert bob.get("/me", secure=True).json()["can_add"] is False
    assert bob.get("/posts/add", secure=True).status_code == 403, "default deny"


def test_logout_ends_the_authd_session(client: Client, shared_daemon: Daemon, signals: list[Any]) -> None:
    log_in(client)
    token = client.session["_authd_token"]
    assert shared_daemon.call("session", token=token)["ok"]
    client.post("/logout", secure=True)
    assert [name for name, _ in signals] == ["logged_in", "logged_out"]
    assert shared_daemon.call("session", token=token)["error"] == "invalid_session"


def test_revoked_authd_session_logs_out_of_django(client: Client, shared_daemon: Daemon, signals: list[Any]) -> None:
    log_in(client)
    assert client.get("/me", secure=True).status_code == 200
    shared_daemon.call("revoke", user="alice")
    assert client.get("/me", secure=True).status_code == 302
    assert [name for name, _ in signals] == ["logged_in", "logged_out"]


def test_inactive_django_user_cannot_log_in(client: Client, shared_daemon: Daemon) -> None:
    log_in(client, "bob")
    sessions = len(shared_daemon.call("sessions", user="bob")["sessions"])
    get_user_model().objects.filter(username="bob").update(is_active=False)
    try:
        assert log_in(Client(), "bob").status_code == 401
        assert len(shared_daemon.call("sessions", user="bob")["sessions"]) == sessions, "the refused login's session was ended"
    finally:
        get_user_model().objects.filter(username="bob").update(is_active=True)


def test_locked_out_stops_other_backends(make_daemon: Any) -> None:
    d = make_daemon("\n[lockout.user]\nmax_failures = 1\n", name="locked").start()
    with override_settings(AUTHD={"SOCKET": str(d.socket), "SERVICE": "login"},
                           AUTHENTICATION_BACKENDS=["authd.integrations.django.AuthdBackend",
                                                    "django.contrib.auth.backends.ModelBackend"]):
        client = Client()
        assert log_in(client, password="wrong").status_code == 401
        assert log_in(client).status_code == 401, "locked: PermissionDenied ends the chain"
        assert d.auth("alice")["error"] == "locked_out"
