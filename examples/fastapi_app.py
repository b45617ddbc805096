"""Example: a FastAPI app that logs users in through authd and gates endpoints on its roles.

    AUTHD_SOCKET=examples/authd.sock python examples/fastapi_app.py   # http://127.0.0.1:8002

Settings from the environment: AUTHD_SOCKET, AUTHD_SERVICE (default "web"), PORT (8002).
`POST /login {"username": ..., "password": ...}` answers with the token (for API clients, as
`Authorization: Bearer <token>`) and sets it as a cookie (for browsers). The cookie's Secure
flag is off because this serves plain HTTP on loopback: behind HTTPS, keep the default.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel

from authd.integrations import LoginError, User
from authd.integrations.fastapi import Authd, logged_in, logged_out, login_failed

authd = Authd(os.environ.get("AUTHD_SOCKET"), service=os.environ.get("AUTHD_SERVICE", "web"), cookie_secure=False)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await authd.close()


app = FastAPI(title="authd + FastAPI", lifespan=lifespan)


@logged_in.connect_via(authd)
def _on_login(sender: Authd, user: User) -> None:
    print(f"signal logged_in: {user.name} groups={','.join(user.groups) or '-'}", flush=True)


@logged_out.connect_via(authd)
def _on_logout(sender: Authd, user: User | None) -> None:
    print(f"signal logged_out: {user.name if user else '-'}", flush=True)


@login_failed.connect_via(authd)
def _on_failure(sender: Authd, username: str, reason: str) -> None:
    print(f"signal login_failed: {username} ({reason})", flush=True)


class Credentials(BaseModel):
    username: str
    password: str


@app.post("/login")
async def login(credentials: Credentials, request: Request, response: Response) -> dict[str, Any]:
    try:
        user, token = await authd.login(credentials.username, credentials.password, request)
    except LoginError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": 'Bearer realm="authd"'}) from None
    authd.set_cookie(response, token)
    return {"user": user.name, "groups": list(user.groups), "token": token, "expires_at": user.expires_at}


@app.post("/logout")
async def logout(request: Request, response: Response) -> dict[str, bool]:
    await authd.logout(request, response)
    return {"ok": True}


@app.get("/me")
async def me(user: User = Depends(authd.current_user)) -> dict[str, Any]:
    return {"user": user.name, "groups": list(user.groups), "expires_at": user.expires_at}


@app.get("/reports")
async def reports(user: User = Depends(authd.require("reports.read"))) -> dict[str, Any]:
    return {"reports": [], "for": user.name}


@app.delete("/posts/{post_id}", dependencies=[Depends(authd.require("blog.delete_post"))])
async def delete_post(post_id: int) -> dict[str, Any]:
    return {"deleted": post_id}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8002")), log_level="info")
