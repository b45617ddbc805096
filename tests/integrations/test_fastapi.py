"""The FastAPI integration through FastAPI's own TestClient against a real authd."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.testclient import TestClient
from pydantic import BaseModel

from authd.integrations import LoginError, User
from authd.integrations.fastapi import Authd, logged_in, logged_out, login_failed

from ..daemon import CANARY, PASSWORD, Daemon

HTTPS = "https://app.example"


class LoginForm(BaseModel):
    username: str
    password: str


def make_app(d: Daemon) -> tuple[FastAPI, Authd]:
    authd = Authd(d.socket, service="login")
    app = FastAPI()

    @app.post("/login")
    async def login(request: Request, response: Response, form: LoginForm) -> Any:
        try:
            user, token = await authd.login(form.username, form.password, request)
        except LoginError as exc:
            raise HTTPException(401, str(exc), headers={"X-Authd-Error": exc.code}) from None
        authd.set_cookie(response, token)
        return {"user": user.name, "groups": list(user.groups)}

    @app.post("/logout")
    async def logout(request: Request, response: Response) -> Any:
        await authd.logout(request, response)
        return {"ok": True}

    @app.get("/me")
    async def me(user: User = Depends(authd.current_user)) -> Any:
        return {"user": user.name, "session": user.session_id}

    @app.get("/posts/new")
    async def new_post(user: User = Depends(authd.require("blog.add_post"))) -> Any:
        return {"user": user.name}

    @app.get("/posts/delete", dependencies=[Depends(authd.require("blog.delete_post"))])
    async def delete_post() -> Any:
        return {"ok": True}

    @app.get("/both")
    async def both(user: User = Depends(authd.current_user), _: User = Depends(authd.require("reports.read"))) -> Any:
        return {"user": user.name}

    return app, authd


@pytest.fixture
def app(shared_daemon: Daemon) -> tuple[FastAPI, Authd]:
    return make_app(shared_daemon)


@pytest.fixture
def client(app: tuple[FastAPI, Authd]) -> Iterator[TestClient]:
    with TestClient(app[0], base_url=HTTPS) as client:
        yield client


def log_in(client: TestClient, user: str = "alice", password: str = PASSWORD) -> Any:
    return client.post("/login", json={"username": user, "password": password})


def test_login_sets_a_secure_cookie(client: TestClient) -> None:
    response = log_in(client)
    assert response.status_code == 200 and response.json() == {"user": "alice", "groups": []}
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("authd_session=") and "Secure" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert client.get("/me").json()["user"] == "alice"


def test_login_and_logout_send_signals(app: tuple[FastAPI, Authd], client: TestClient) -> None:
    heard: list[tuple[str, Any]] = []
    authd = app[1]
    with logged_in.connected_to(lambda sender, user: heard.append(("in", user.name)), authd), \
            logged_out.connected_to(lambda sender, user: heard.append(("out", user and user.name)), authd), \
            login_failed.connected_to(lambda sender, username, reason: heard.append(("failed", (username, reason))), authd):
        log_in(client, password="wrong")
        log_in(client)
        client.post("/logout")
        client.post("/logout")
    assert heard == [("failed", ("alice", "auth_failed")), ("in", "alice"), ("out", "alice"), ("out", None)]


def test_failed_login(client: TestClient) -> None:
    response = log_in(client, password=CANARY)
    assert response.status_code == 401 and response.headers["x-authd-error"] == "auth_failed"
    assert CANARY not in response.text and "set-cookie" not in response.headers


def test_anonymous_and_invalid_tokens_get_401_with_a_challenge(client: TestClient) -> None:
    anonymous = client.get("/me")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == 'Bearer realm="authd"'
    assert client.get("/posts/new").status_code == 401
    invalid = client.get("/me", headers={"Authorization": "Bearer nope"})
    assert invalid.status_code == 401
    assert invalid.headers["www-authenticate"] == 'Bearer realm="authd", error="invalid_token"'


def test_require_answers_from_authd_roles(client: TestClient, shared_daemon: Daemon) -> None:
    log_in(client)
    assert client.get("/posts/new").json() == {"user": "alice"}
    denied = client.get("/posts/delete")
    assert denied.status_code == 403
    assert denied.headers["www-authenticate"] == 'Bearer realm="authd", error="insufficient_scope", scope="blog.delete_post"'
    assert client.get("/both").json() == {"user": "alice"}
    root = shared_daemon.auth("root")["session"]["token"]
    assert client.get("/posts/delete", headers={"Authorization": f"Bearer {root}"}).status_code == 200, "by group"
    bob = shared_daemon.auth("bob")["session"]["token"]
    assert client.get("/posts/new", headers={"Authorization": f"Bearer {bob}"}).status_code == 403, "default deny"


def test_logout_and_revoke(client: TestClient, shared_daemon: Daemon) -> None:
    log_in(client)
    response = client.post("/logout")
    assert 'authd_session=""' in response.headers["set-cookie"] and "Max-Age=0" in response.headers["set-cookie"]
    assert client.get("/me").status_code == 401
    log_in(client)
    assert shared_daemon.call("revoke", user="alice")["ok"]
    assert client.get("/me").status_code == 401


def test_concurrent_requests_share_one_connection(web_daemon: Daemon) -> None:
    """A hundred requests at once through the ASGI app: all answered over one authd connection."""
    import httpx

    token = web_daemon.auth("alice")["session"]["token"]
    fastapi_app, authd = make_app(web_daemon)
    before = web_daemon.call("status")["connections"]

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=fastapi_app)
        async with httpx.AsyncClient(transport=transport, base_url=HTTPS) as http:
            responses = await asyncio.gather(*(
                http.get("/posts/new" if i % 2 else "/posts/delete", headers={"Authorization": f"Bearer {token}"})
                for i in range(100)))
            opened = web_daemon.call("status")["connections"]["open"] - before["open"]
            await authd.close()
        assert opened == 1
        return [r.status_code for r in responses]

    assert asyncio.run(run()) == [403 if i % 2 == 0 else 200 for i in range(100)]


def test_authd_down(web_daemon: Daemon) -> None:
    with TestClient(make_app(web_daemon)[0], base_url=HTTPS) as client:
        log_in(client)
        web_daemon.stop()
        assert client.get("/me").status_code == 503
        assert log_in(client).headers["x-authd-error"] == "unavailable"


def test_permission_name_is_checked_up_front(app: tuple[FastAPI, Authd]) -> None:
    with pytest.raises(ValueError):
        app[1].require("blog.*")
