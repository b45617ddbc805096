"""The Redis backend (`[store] backend = "redis"`): sessions and lockout shared by a fleet.

Needs the `redis` package (`pip install authd[redis]`) and Redis or Valkey >= 7.0.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from ...errors import ConfigError
from ...lockout import Lockout
from ...securefs import UnsafePath, open_file
from .cachedrops import FleetCacheDrops
from .link import Link
from .lockout import FleetLockout
from .sessions import RedisSessions

MIN_SECRET = 32


def connect(policy: Any, local: Lockout) -> tuple[RedisSessions, FleetLockout, FleetCacheDrops]:
    config = policy.config.store
    if config.secret_file is None:
        raise ConfigError("store.secret_file: required with backend = \"redis\" (the fleet's shared lockout key)")
    secret = read_secret(policy.path(config.secret_file))
    link = Link(config)
    sessions = RedisSessions(link, near_cache=config.near_cache, near_cache_size=config.near_cache_size)
    return sessions, FleetLockout(link, config, policy.config.lockout, secret, local), FleetCacheDrops(link)


def read_secret(path: Any) -> bytes:
    """The fleet key: a regular file of ours (or root's), readable by no one else, >= 32 bytes."""
    what = "store.secret_file"
    try:
        fd = open_file(path, os.O_RDONLY, 0o600, what)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot open {path}: {exc.strerror}") from None
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            raise UnsafePath(f"{what}: {path} may be read by other users; chmod 600 it")
        secret = os.read(fd, 4096)
    finally:
        os.close(fd)
    if len(secret) < MIN_SECRET:
        raise ConfigError(f"{what}: {path} holds {len(secret)} bytes; it needs at least {MIN_SECRET} (head -c 32 /dev/urandom)")
    return secret
