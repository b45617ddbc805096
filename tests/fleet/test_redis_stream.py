"""The redis_stream handler: events from two daemons land in one stream that a consumer group
reads, and events emitted while Redis is down arrive once it is back (the outbox holds them)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from authd.errors import ConfigError
from authd.events import build_handlers
from authd.events.config import HandlerContext, RedisStreamConfig

from ..daemon import Daemon, wait_for
from ..events.test_daemon_handlers import wait_counter
from .redisserver import RedisServer

HANDLER = """
[[handler]]
type = "redis_stream"
url = "{url}"
stream = "{stream}"
maxlen = 1000
events = ["auth.*"]
retry_backoff = 0.05
max_age = 60
"""


def consume(server: RedisServer, stream: str, group: str = "lastlog") -> list[dict[str, Any]]:
    """What the group has not read yet, acknowledged: the events, as a consumer would see them."""
    client = server.client()
    read = client.xreadgroup(group, "c1", {stream: ">"}, count=1000) or []
    events = []
    for _, entries in read:
        for entry_id, fields in entries:
            event = json.loads(fields[b"event"])
            assert fields[b"name"].decode() == event["name"]
            events.append(event)
            client.xack(stream, group, entry_id)
    return events


def test_two_daemons_append_to_one_stream_read_by_a_group(make_daemon: Callable[..., Daemon],
                                                          redis_server: RedisServer, prefix: str) -> None:
    stream = f"{prefix}events"
    redis_server.client().xgroup_create(stream, "lastlog", id="0", mkstream=True)
    a = make_daemon(HANDLER.format(url=redis_server.url, stream=stream), name="a").start()
    b = make_daemon(HANDLER.format(url=redis_server.url, stream=stream), name="b").start()
    assert a.auth("alice")["ok"] and b.auth("bob")["ok"]
    seen: list[dict[str, Any]] = []
    wait_for(lambda: seen.extend(consume(redis_server, stream)) or len(seen) >= 2, what="both hosts' events")
    assert sorted((e["name"], e["user"]) for e in seen) == [("auth.succeeded", "alice"), ("auth.succeeded", "bob")]
    assert redis_server.client().xpending(stream, "lastlog")["pending"] == 0


def test_events_while_redis_is_down_arrive_after_it_returns(make_daemon: Callable[..., Daemon],
                                                            private_redis: RedisServer) -> None:
    d = make_daemon(HANDLER.format(url=private_redis.url, stream="ev")).start()
    assert d.auth("alice")["ok"]
    wait_for(lambda: private_redis.client().xlen("ev") == 1, what="the first event")
    private_redis.kill()
    rhosts = [f"192.0.2.{i}" for i in range(1, 21)]
    for rhost in rhosts:
        assert d.auth(rhost=rhost, open_session=False)["ok"], "logins never wait for the stream"
    private_redis.start()  # empty: this test's server keeps nothing across a restart
    private_redis.client().xgroup_create("ev", "lastlog", id="0", mkstream=True)
    seen: list[dict[str, Any]] = []
    wait_for(lambda: seen.extend(consume(private_redis, "ev")) or len({e["id"] for e in seen}) >= 20, timeout=30,
             what="the events held while Redis was down")
    assert sorted({e["rhost"] for e in seen} - {None}) == sorted(rhosts), "none lost"
    assert d.proc is not None and d.proc.poll() is None


def test_maxlen_trims_the_stream(make_daemon: Callable[..., Daemon], redis_server: RedisServer, prefix: str) -> None:
    stream = f"{prefix}trim"
    d = make_daemon(HANDLER.format(url=redis_server.url, stream=stream).replace("maxlen = 1000", "maxlen = 10")).start()
    for i in range(300):
        d.call("auth", user="alice", password=f"wrong-{i}", service="login")
    wait_counter(d, "redis_stream", 300)
    assert redis_server.client().xlen(stream) < 300, "MAXLEN ~ trims whole nodes, approximately"


@pytest.mark.parametrize("url", ["http://localhost/", "localhost:6379", "/run/redis/redis.sock"])
def test_a_url_that_is_not_redis_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match=r"handler\[0\]\.url: expected redis://"):
        build_handlers([RedisStreamConfig(url=url)], HandlerContext(tmp_path, tmp_path))
