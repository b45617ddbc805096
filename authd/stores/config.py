"""`[store]`: which backend keeps sessions and lockout state, and how to reach a shared one."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Seconds = Annotated[float, msgspec.Meta(gt=0, le=60)]


class StoreConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    backend: Literal["sqlite", "redis"] = "sqlite"
    url: str = "unix:///run/redis/redis.sock"  # or redis://host:port/db
    prefix: Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$")] = "authd:"
    timeout: Seconds = 0.5  # one command's round trip; past it the store counts as down
    connect_timeout: Seconds = 1.0
    connections: Annotated[int, msgspec.Meta(gt=0, le=1024)] = 16  # pool size; more requests queue for one
    retry_interval: Seconds = 1.0  # while down, Redis is tried again at most this often
    secret_file: str | None = None  # fleet-wide lockout fingerprint key (0600); required with redis
    on_store_error: Literal["local", "closed"] = "local"  # lockout when Redis is down
    near_cache: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.0  # seconds a session check may be served locally
    near_cache_size: Annotated[int, msgspec.Meta(gt=0, le=10_000_000)] = 100_000
    lease: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0  # past pam_timeout: a dead host's slots free after it
