"""The Flask integration through Flask's own test client against a real authd."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, request
from flask.testing import FlaskClient

from authd.integrations import LoginError, User
from authd.integrations.flask import (
    Authd, current_user, has_permission, logged_in, logged_out, login, login_failed, login_required, logout,
    permission_required,
)

from ..daemon import CANARY, PASSWORD, Daemon

HTTPS = "https://app.example"


def make_app(d: Daemon, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(AUTHD_SOCKET=str(d.socket), AUTHD_SERVICE="login", **config)
    Authd(app)

    @app.post("/login")
    def do_login() -> Any:
        try:
            user = login(request.form["username"], request.form["password"])
        except LoginError as exc:
            return {"error": exc.code, "message": str(exc)}, 401
        return {"user": user.name, "groups": list(user.groups)}

    @app.post("/logout")
    def do_logout() -> Any:
        logout()
        return {"ok": True}

    @app.get("/me")
    @login_required
    def me() -> Any:
        user = current_user()
        assert user is not None
        return {"user": user.name, "can_delete": has_permission("blog.delete_post")}

    @app.get("/posts/new")
    @permission_required("blog.add_post")
    def new_post() -> Any:
        return {"ok": True}

    @app.get("/posts/delete")
    @permission_required("blog.delete_post")
    def delete_post() -> Any:
        return {"ok": True}

    @app.get("/form")
    def form() -> Any:
        return "the login form"

    return app


@pytest.fixture
def app(shared_daemon: Daemon) -> Flask:
    return make_app(shared_daemon)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def signals(app: Flask) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """What the app's own receivers heard (connected for this app only, as an app would)."""
    heard: list[tuple[str, dict[str, Any]]] = []
    receivers = {name: (lambda sender, name=name, **kw: heard.append((name, kw))) for name in ("in", "out", "failed")}
    with logged_in.connected_to(receivers["in"], app), logged_out.connected_to(receivers["out"], app), \
            login_failed.connected_to(receivers["failed"], app):
        yield heard


def log_in(client: FlaskClient, user: str = "alice", password: str = PASSWORD) -> Any:
    return client.post("/login", data={"username": user, "password": password}, base_url=HTTPS)


def test_login_sets_a_secure_cookie_and_sends_logged_in(client: FlaskClient, signals: list[Any]) -> None:
    response = log_in(client)
    assert response.status_code == 200 and response.json == {"user": "alice", "groups": []}
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("authd_session=") and "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    ((name, kw),) = signals
    assert name == "in" and isinstance(kw["user"], User) and kw["user"].name == "alice" and kw["user"].service == "login"
    assert client.get("/me", base_url=HTTPS).json == {"user": "alice", "can_delete": False}


def test_failed_login_sends_login_failed_and_sets_no_cookie(client: FlaskClient, signals: list[Any], shared_daemon: Daemon) -> None:
    response = log_in(client, password=CANARY)
    assert response.status_code == 401 and response.json["error"] == "auth_failed"
    assert "Set-Cookie" not in response.headers and CANARY not in response.get_data(as_text=True)
    assert signals == [("failed", {"username": "alice", "reason": "auth_failed"})]
    assert client.get("/me", base_url=HTTPS).status_code == 401


def test_anonymous_gets_401_with_a_challenge(client: FlaskClient) -> None:
    response = client.get("/me", base_url=HTTPS)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == 'Bearer realm="authd"'
    assert client.get("/posts/new", base_url=HTTPS).status_code == 401


def test_permissions_come_from_authd_roles(client: FlaskClient) -> None:
    log_in(client)
    assert client.get("/posts/new", base_url=HTTPS).status_code == 200
    assert client.get("/posts/delete", base_url=HTTPS).status_code == 403, "deny wins"
    other = client.application.test_client()
    log_in(other, "bob")
    assert other.get("/me", base_url=HTTPS).status_code == 200
    assert other.get("/posts/new", base_url=HTTPS).status_code == 403, "default deny"
    admin = client.application.test_client()
    assert log_in(admin, "root").json["groups"] == ["root"]
    assert admin.get("/posts/delete", base_url=HTTPS).status_code == 200, "granted by group"


def test_logout_ends_the_authd_session(client: FlaskClient, signals: list[Any], shared_daemon: Daemon) -> None:
    log_in(client)
    cookie = client.get_cookie("authd_session", domain="app.example")
    assert cookie is not None and cookie.secure and cookie.http_only
    token = cookie.value
    response = client.post("/logout", base_url=HTTPS)
    assert "authd_session=;" in response.headers["Set-Cookie"]
    assert [name for name, _ in signals] == ["in", "out"] and signals[1][1]["user"].name == "alice"
    assert shared_daemon.call("session", token=token)["error"] == "invalid_session"
    assert client.get("/me", base_url=HTTPS).status_code == 401


def test_revoked_session_is_logged_out_on_the_next_request(client: FlaskClient, shared_daemon: Daemon) -> None:
    log_in(client)
    assert client.get("/me", base_url=HTTPS).status_code == 200
    assert shared_daemon.call("revoke", user="alice")["ok"]
    response = client.get("/me", base_url=HTTPS)
    assert response.status_code == 401 and "authd_session=;" in response.headers["Set-Cookie"]


def test_bearer_token_for_api_clients(client: FlaskClient, shared_daemon: Daemon) -> None:
    token = shared_daemon.auth("alice")["session"]["token"]
    fresh = client.application.test_client(use_cookies=False)
    assert fresh.get("/posts/new", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert fresh.get("/posts/new", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_login_view_redirects_browsers(shared_daemon: Daemon) -> None:
    client = make_app(shared_daemon, AUTHD_LOGIN_VIEW="form").test_client()
    response = client.get("/posts/new?x=1", base_url=HTTPS)
    assert response.status_code == 302 and response.headers["Location"] == "/form?next=/posts/new?x%3D1"


def test_authd_down(web_daemon: Daemon) -> None:
    app = make_app(web_daemon)
    client = app.test_client()
    reasons: list[str] = []
    log_in(client)
    web_daemon.stop()
    with login_failed.connected_to(lambda sender, username, reason: reasons.append(reason), app):
        response = log_in(client)
    assert response.status_code == 401 and response.json["error"] == "unavailable" and reasons == ["unavailable"]
    assert client.get("/me", base_url=HTTPS).status_code == 503


def test_permission_name_is_checked_when_decorating() -> None:
    with pytest.raises(ValueError):
        permission_required("blog.*")
