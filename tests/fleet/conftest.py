from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from .redisserver import RedisServer

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """Each test its own key space in the shared server."""
    return f"t{next(_prefixes)}:"


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A server a test may stop, kill and restart."""
    server = RedisServer().start()
    yield server
    server.stop()
