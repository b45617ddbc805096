"""The FastAPI app `bench_web` loads: one endpoint that needs a session and a permission.

BENCH_MODE=authd answers them through `authd.integrations.fastapi` (`current_user` asks
`session`, `require` asks `check`, over the process's one pipelined connection); BENCH_MODE=dict
answers them from an in-process dict of tokens (BENCH_TOKENS, a JSON object token -> user) with
the same 401/403 logic: the baseline. `GET /_stats` reports requests served and the seconds
spent handling them and, of those, waiting for authd.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request, Response

from authd.client import AsyncClient
from authd.integrations import LoopClient, bearer_token
from authd.integrations.fastapi import Authd

T = TypeVar("T")
PERMISSION = "reports.read"
stats = {"requests": 0, "handling": 0.0, "authd": 0.0}


class TimedClients(LoopClient):
    """The integration's connection, timing every round trip to authd."""

    async def run(self, call: Callable[[AsyncClient], Awaitable[T]]) -> T:
        started = time.perf_counter()
        try:
            return await super().run(call)
        finally:
            stats["authd"] += time.perf_counter() - started


app = FastAPI()
mode = os.environ.get("BENCH_MODE", "authd")
if mode == "authd":
    authd = Authd(os.environ["AUTHD_SOCKET"], service=os.environ.get("AUTHD_SERVICE", "bench"))
    authd.clients = TimedClients(os.environ["AUTHD_SOCKET"])
    guard: Callable[..., Any] = authd.require(PERMISSION)
else:
    tokens: dict[str, str] = json.loads(os.environ["BENCH_TOKENS"])
    grants: dict[str, frozenset[str]] = {user: frozenset({PERMISSION}) for user in tokens.values()}

    async def guard(request: Request) -> str:
        token = bearer_token(request.headers.get("authorization"))
        user = tokens.get(token) if token else None
        if user is None:
            raise HTTPException(401, "Login required.", headers={"WWW-Authenticate": 'Bearer realm="authd"'})
        if PERMISSION not in grants[user]:
            raise HTTPException(403, "Permission denied.")
        return user


@app.middleware("http")
async def timing(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    started = time.perf_counter()
    response = await call_next(request)
    if request.url.path != "/_stats":
        stats["requests"] += 1
        stats["handling"] += time.perf_counter() - started
    return response


@app.get("/reports", dependencies=[Depends(guard)])
async def reports() -> dict[str, bool]:
    return {"ok": True}


@app.get("/_stats")
async def read_stats() -> dict[str, Any]:
    return dict(stats)
