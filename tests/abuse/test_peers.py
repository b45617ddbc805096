"""What a peer may hold and what it is told, decided by its credentials.

A uid that `[clients]` forbids is refused at accept and never holds a slot; admins keep a
reserve of connections through a flood; no message quotes a value the client sent.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from contextlib import ExitStack

from ..daemon import BASE_POLICY, Daemon, as_uid, raw_connect, read_replies
from .helpers import counters, with_limits

FORBIDDEN_UIDS = (65534, 40001, 40002, 40003)
ALLOWED_UID = 1  # `daemon`: a client, not an admin
HELD: list[socket.socket] = []  # in an `as_uid` child: connections kept open until it exits


def _connect_and_listen(d: Daemon, count: int) -> dict[str, object]:
    """Open `count` connections at once and keep them; report what each hears, up to EOF."""
    socks = [raw_connect(d.socket) for _ in range(count)]
    HELD.extend(socks)
    heard = []
    for sock in socks:
        sock.settimeout(5)
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except TimeoutError:
            heard.append({"no_eof": data.decode(errors="replace")})
            continue
        heard.extend(json.loads(line) for line in data.splitlines())
    return {"heard": heard}


def _hello_as_client(d: Daemon) -> dict[str, object]:
    with d.client(timeout=10) as c:
        return c.hello()


def test_forbidden_peers_are_refused_at_accept_without_a_slot(make_daemon: Callable[..., Daemon]) -> None:
    """Four forbidden uids, three connections each, against max_connections = 10: every one is
    told `client_forbidden` and closed, and allowed clients and root still connect."""
    policy = with_limits(max_connections=10, max_connections_per_uid=3)
    d = make_daemon(base=policy.replace('users = ["*"]', 'users = ["daemon"]')).start()
    forbidden = {"id": None, "ok": False, "error": "client_forbidden", "message": "this uid/gid may not use authd"}
    with ExitStack() as holders:  # they keep their refused sockets open throughout
        for uid in FORBIDDEN_UIDS:
            assert holders.enter_context(as_uid(uid, lambda: _connect_and_listen(d, 3))) == {"heard": [forbidden] * 3}
        with as_uid(ALLOWED_UID, lambda: _hello_as_client(d)) as hello:
            assert hello.get("ok") is True, hello
        assert d.call("status")["connections"]["open"] == 1, "the refused hold no slot (only this status call)"
    assert counters(d)["connections_refused_forbidden"] == 12
    assert "connections_refused_busy" not in counters(d)
    assert len(d.log_lines("peer not allowed by [clients]; refusing")) == 1, "a flood of refusals is logged once"


def _flood_and_hold(d: Daemon, count: int) -> dict[str, int]:
    """Open `count` connections and keep them; the accepted ones answer `hello`."""
    socks = [raw_connect(d.socket) for _ in range(count)]
    HELD.extend(socks)
    outcome = {"accepted": 0, "busy": 0}
    for sock in socks:
        sock.sendall(b'{"id":1,"op":"hello"}\n')
        (reply,) = read_replies(sock, 1)
        outcome["accepted" if reply.get("ok") else reply["error"]] += 1
    return outcome


def test_admin_reserve_keeps_status_and_revoke_working_through_a_flood(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(base=with_limits(max_connections=6, max_connections_per_uid=100, admin_reserve=2,
                                     idle_timeout=60.0)).start()
    session_id = d.auth("alice")["session"]["id"]
    with as_uid(65534, lambda: _flood_and_hold(d, 10)) as flood:
        assert flood == {"accepted": 4, "busy": 6}, "non-admins stop at max_connections - admin_reserve"
        with d.client() as first, d.client() as second:
            assert second.hello()["ok"]
            assert first.status()["connections"]["open"] == 6
            assert second.revoke(session_id=session_id)["revoked"] == [session_id]
            third = raw_connect(d.socket)
            assert read_replies(third, 1)[0]["error"] == "busy", "admins too stop at max_connections"
            third.close()
    assert counters(d)["connections_refused_busy"] == 7


def _hostile_requests(d: Daemon, secret: str) -> list[dict[str, object]]:
    sock = raw_connect(d.socket)
    lines = [{"id": 1, "op": "unlock", "key": "k", "scope": secret},
             {"id": 2, "op": "hello", secret: 1},
             {"id": 3, "op": secret},
             {"id": 4, "op": "auth", "user": "u", "password": "p", "service": "login", "open_session": secret},
             {"id": 5, "op": "lastlog", "user": secret, "extra": secret}]
    sock.sendall(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    return read_replies(sock, len(lines))


def test_no_error_message_quotes_what_an_unprivileged_peer_sent(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(base=BASE_POLICY).start()
    secret = "s3cr3t-value-from-the-client"
    with as_uid(65534, lambda: _hostile_requests(d, secret)) as replies:
        assert [r["error"] for r in replies] == ["bad_request"] * 5
        assert all(secret[:6] not in r["message"] for r in replies), replies
        assert replies[0]["message"] == "Invalid value - at `$.scope`"
        assert replies[1]["message"] == "unknown field"
    assert secret not in d.output()
