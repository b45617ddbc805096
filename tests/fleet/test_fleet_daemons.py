"""Two real authd daemons on one real redis-server behave as one authd."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from ..daemon import Daemon, wait_for
from ..metrics.test_daemon_metrics import metrics_table, samples, scrape
from .redisserver import RedisServer

STORE = """
[store]
backend = "redis"
url = "{url}"
prefix = "{prefix}"
secret_file = "{secret}"
timeout = 1.0
retry_interval = 0.2

[lockout.user]
max_failures = 5
[lockout.rhost]
max_failures = 0
"""


def pair(make_daemon: Callable[..., Daemon], server: RedisServer, prefix: str, tmp_path: Path,
         extra: str = "") -> tuple[Daemon, Daemon]:
    """Hosts A and B: each its own state dir, one Redis."""
    secret = tmp_path / "fleet.key"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    extra += STORE.format(url=server.url, prefix=prefix, secret=secret)
    return make_daemon(extra, name="a").start(), make_daemon(extra, name="b").start()


def test_sessions_and_lockout_are_shared_by_two_daemons(make_daemon: Callable[..., Daemon], redis_server: RedisServer,
                                                       prefix: str, tmp_path: Path) -> None:
    a, b = pair(make_daemon, redis_server, prefix, tmp_path)
    token = a.auth(open_session=True)["session"]["token"]
    assert b.call("session", token=token)["session"]["user"] == "alice"
    b.call("logout", token=token)
    assert a.call("session", token=token)["error"] == "invalid_session"
    errors = []

    def guesses(daemon: Daemon, start: int) -> None:
        for i in range(start, start + 10):
            errors.append(daemon.call("auth", user="bob", password=f"wrong-{i}", service="login").get("error"))

    threads = [threading.Thread(target=guesses, args=(d, i * 10)) for i, d in enumerate((a, b, a, b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors.count("auth_failed") == 5 and errors.count("locked_out") == 35
    refusal = b.call("auth", user="bob", password="right-or-not", service="login")
    assert refusal["error"] == "locked_out" and refusal["retry_after"] > 0
    assert a.call("status")["store"]["state"] == "ok"


def test_each_expired_session_is_closed_once_across_the_fleet(make_daemon: Callable[..., Daemon],
                                                             redis_server: RedisServer, prefix: str, tmp_path: Path) -> None:
    short = '\n[[service]]\nname = "short"\npam_service = "authd-test"\nsession_ttl = 1.0\nfailure_delay = 0.0\n'
    audit = '\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\nevents = ["session.*"]\n'
    a, b = pair(make_daemon, redis_server, prefix, tmp_path, short + audit)

    def closed() -> list[str]:
        lines = [json.loads(x) for d in (a, b) if (d.root / "audit.jsonl").exists()
                 for x in (d.root / "audit.jsonl").read_text().splitlines()]
        return [e["session_id"] for e in lines if e["name"] == "session.closed" and e["reason"] == "expired"]

    opened = [d.auth(service="short")["session"]["id"] for d in (a, b, a, b, a, b)]
    wait_for(lambda: len(closed()) >= 6, what="the six sessions to expire")
    last = a.auth(service="short")["session"]["id"]  # by its expiry both hosts have swept again
    wait_for(lambda: last in closed(), what="one more expiry")
    assert sorted(closed()) == sorted([*opened, last]), "each expired session reported once, by one host"


def test_redis_stopped_then_killed_then_restarted(make_daemon: Callable[..., Daemon], private_redis: RedisServer,
                                                  tmp_path: Path) -> None:
    a, b = pair(make_daemon, private_redis, "k:", tmp_path)
    token = a.auth(open_session=True)["session"]["token"]
    private_redis.signal(signal.SIGSTOP)
    assert a.call("session", token=token)["error"] == "unavailable"
    assert b.auth(open_session=False)["user"] == "alice"  # lockout falls back to the local engine
    assert b.auth(open_session=True)["error"] == "unavailable"  # no session Redis does not hold
    assert b.call("revoke", user="alice")["error"] == "unavailable"
    assert b.call("cache_flush")["error"] == "unavailable"  # other hosts' caches could not be told
    assert a.call("status")["store"]["state"] == "down"
    private_redis.kill()
    assert a.call("session", token=token)["error"] == "unavailable"
    private_redis.start()  # an empty Redis: sessions issued before are gone (no persistence here)
    wait_for(lambda: a.call("session", token=token).get("error") == "invalid_session", what="recovery")
    fresh = b.auth(open_session=True)["session"]["token"]
    assert a.call("session", token=fresh)["session"]["user"] == "alice"
    assert a.proc.poll() is None and b.proc.poll() is None  # type: ignore[union-attr]


def test_metrics_show_redis_down_and_the_lockout_fallbacks(make_daemon: Callable[..., Daemon], private_redis: RedisServer,
                                                           tmp_path: Path) -> None:
    secret = tmp_path / "fleet.key"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    d = make_daemon(STORE.format(url=private_redis.url, prefix="m:", secret=secret) + metrics_table()).start()
    assert d.auth(open_session=False)["ok"]
    up = samples(scrape(d)[2])
    assert up['authd_store_up{store="sessions"}'] == up['authd_store_up{store="lockout"}'] == 1
    assert up["authd_lockout_fallbacks_total"] == 0
    private_redis.signal(signal.SIGSTOP)
    try:
        assert d.auth(open_session=False)["ok"]
        assert d.auth(open_session=False)["ok"]
        down = samples(scrape(d)[2])
    finally:
        private_redis.signal(signal.SIGCONT)
    assert down['authd_store_up{store="sessions"}'] == down['authd_store_up{store="lockout"}'] == 0
    assert down["authd_lockout_fallbacks_total"] == 2
    wait_for(lambda: d.auth(open_session=True).get("ok"), what="Redis to be used again")
    back = samples(scrape(d)[2])
    assert back['authd_store_up{store="sessions"}'] == back['authd_store_up{store="lockout"}'] == 1


def test_a_revoke_or_a_flush_on_one_host_reaches_the_other_hosts_credential_cache(
        make_daemon: Callable[..., Daemon], redis_server: RedisServer, prefix: str, tmp_path: Path) -> None:
    a, b = pair(make_daemon, redis_server, prefix, tmp_path, '[cache]\nenabled = true\naccount_check = "cached"\n')

    def hits(d: Daemon) -> int:
        return d.call("status")["counters"].get("cache:hit", 0)

    for command in ({"op": "revoke", "user": "alice"}, {"op": "cache_flush"}, {"op": "cache_flush", "user": "alice"}):
        assert b.auth(open_session=False)["ok"] and b.auth(open_session=False)["ok"]
        before = hits(b)
        assert b.auth(open_session=False)["ok"] and hits(b) == before + 1, "answered from b's cache"
        assert a.call(command.pop("op"), **command)["ok"]
        assert b.auth(open_session=False)["ok"] and hits(b) == before + 1, "b asked PAM again"
