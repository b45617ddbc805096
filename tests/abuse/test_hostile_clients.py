"""Hostile clients against a real daemon: each is answered or cut off, counted, and nobody else waits.

Every attack runs beside a well-behaved client on its own connection, which must keep getting
good answers throughout.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from itertools import cycle
from typing import Any

import pytest

from ..daemon import ClientLoop, Daemon, as_uid, raw_connect, read_replies, wait_for
from .helpers import counters, open_fds, rss_bytes, with_limits

HELLO = b'{"id":1,"op":"hello"}\n'
NORMAL = 0.01  # seconds between a normal client's logins


def dribble(sock: socket.socket, data: bytes, interval: float, give_up: float) -> tuple[float, bytes]:
    """Send `data` a byte at a time until the daemon hangs up; (seconds it took, what it said)."""
    started = time.monotonic()
    received = b""
    for byte in cycle(data):
        if time.monotonic() - started > give_up:
            raise AssertionError(f"still connected after {give_up}s of dribbling")
        try:
            sock.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return time.monotonic() - started, received


def replies_of(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


@pytest.mark.parametrize("prefix", [b"", b'{"id":1,"op":"hello","pad":"' + b"x" * 2000],
                         ids=["dribble", "dribble-after-too-large"])
def test_slowloris_dribbler_is_cut_off(make_daemon: Callable[..., Daemon], prefix: bytes) -> None:
    d = make_daemon(base=with_limits(max_line=1024, request_timeout=1.0, idle_timeout=60.0)).start()
    with ClientLoop(d, pause=NORMAL) as normal:
        sock = raw_connect(d.socket)
        sock.sendall(prefix)
        seconds, said = normal.served_during(lambda: dribble(sock, b'{"id":2,"op":"hello"', 0.05, give_up=20.0))
        sock.close()
    replies = replies_of(said)
    assert seconds >= 0.9, "cut off by request_timeout, not before"
    assert replies[-1]["ok"] is False and replies[-1]["error"] == "bad_request"
    assert "not completed within 1s" in replies[-1]["message"]
    if prefix:
        assert replies[0]["error"] == "too_large"
    assert counters(d)["connections_closed_slow_request"] == 1
    normal.check()


def test_partial_line_never_completed_is_answered_and_closed(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(base=with_limits(request_timeout=1.0, idle_timeout=60.0)).start()
    with ClientLoop(d, pause=NORMAL) as normal:
        sock = raw_connect(d.socket)
        sock.sendall(HELLO + b'{"id":2,"op":"hel')
        said = normal.served_during(lambda: _read_to_eof(sock))
    first, last = replies_of(said)
    assert first["ok"] and last["error"] == "bad_request" and last["id"] is None
    assert counters(d)["connections_closed_slow_request"] == 1
    normal.check()


def test_idle_connections_are_closed(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(base=with_limits(idle_timeout=1.0)).start()
    with ClientLoop(d, pause=NORMAL) as normal:
        silent = raw_connect(d.socket)
        once = raw_connect(d.socket)
        once.sendall(HELLO)
        started = time.monotonic()
        assert normal.served_during(lambda: _read_to_eof(silent)) == b""
        assert len(replies_of(_read_to_eof(once))) == 1
        assert time.monotonic() - started >= 0.9
    assert counters(d)["connections_closed_idle"] == 2
    normal.check()


def test_client_that_never_reads_is_cut_off_with_bounded_memory(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(base=with_limits(write_buffer=65536, request_timeout=2.0)).start()
    baseline_fds, baseline_rss = open_fds(d.pid), rss_bytes(d.pid)
    burst = HELLO * 20_000  # ~2 MB of replies, 30x the write buffer
    with ClientLoop(d, pause=NORMAL) as normal:

        def attack() -> list[int]:
            answered = []
            for cut in range(1, 11):
                sock = raw_connect(d.socket)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                try:
                    sock.sendall(burst)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                wait_for(lambda: counters(d).get("connections_closed_not_reading", 0) >= cut, what="the cut-off")
                try:
                    answered.append(len(replies_of(_read_to_eof(sock).rpartition(b"\n")[0])))
                except ConnectionResetError:
                    answered.append(0)
                sock.close()
            return answered

        answered = normal.served_during(attack)
    assert all(n < 20_000 for n in answered), answered
    assert counters(d)["connections_closed_not_reading"] == 10
    assert rss_bytes(d.pid) - baseline_rss < 48 * 1024 * 1024, "memory stayed bounded"
    wait_for(lambda: open_fds(d.pid) <= baseline_fds, 10, what="descriptors released")
    normal.check()


def test_half_closed_client_that_never_reads_is_dropped(make_daemon: Callable[..., Daemon]) -> None:
    """Replies below the write buffer, then EOF, then silence: the buffer must not be held forever."""
    d = make_daemon(base=with_limits(request_timeout=1.0, max_connections=12)).start()
    baseline_fds = open_fds(d.pid)
    with ClientLoop(d, pause=NORMAL) as normal:
        held = []
        for _ in range(8):
            sock = raw_connect(d.socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(HELLO * 4000)  # ~350 KB of replies, under the 1 MiB write buffer
            sock.shutdown(socket.SHUT_WR)
            held.append(sock)
        wait_for(lambda: counters(d).get("connections_aborted_unread") == 8, 20, what="unread replies dropped")
        wait_for(lambda: open_fds(d.pid) <= baseline_fds + 1, 10, what="descriptors released")
        assert d.call("hello")["ok"], "the slots they held are free again"
        for sock in held:
            sock.close()
    normal.check()


def test_connection_flood_gets_busy_while_others_are_served(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(base=with_limits(max_connections=20, idle_timeout=30.0)).start()
    with ClientLoop(d, pause=NORMAL) as normal:  # holds one of the 20

        def flood() -> list[socket.socket]:
            return [raw_connect(d.socket) for _ in range(60)]

        flooders = normal.served_during(flood)
        first = _first_replies(flooders)
        busy = [r for r in first if r.get("error") == "busy"]
        assert len(busy) == 60 - 19 and sum(bool(r.get("ok")) for r in first) == 19
        assert all(r == {"id": None, "ok": False, "error": "busy", "message": "too many connections"} for r in busy)
        for sock in flooders:
            sock.close()
        wait_for(lambda: d.call("hello").get("ok"), 10, what="a fresh connection to be accepted again")
    assert counters(d)["connections_refused_busy"] == 60 - 19
    assert d.log_lines("connection limit reached; refusing"), "the flood is logged"
    normal.check()


def test_per_uid_cap_keeps_other_users_served(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(base=with_limits(max_connections=100, max_connections_per_uid=5, idle_timeout=30.0)).start()
    with ClientLoop(d, pause=NORMAL) as normal, as_uid(65534, lambda: _hold_connections(d, 20)) as result:
        assert result == {"accepted": 5, "busy": 15}
        assert d.call("hello")["ok"], "root can still connect"
    assert counters(d)["connections_refused_busy"] == 15
    normal.check()


def _hold_connections(d: Daemon, count: int) -> dict[str, int]:
    first = _first_replies([raw_connect(d.socket) for _ in range(count)])
    return {"accepted": sum(bool(r.get("ok")) for r in first), "busy": sum(r.get("error") == "busy" for r in first)}


def _first_replies(socks: list[socket.socket]) -> list[dict[str, Any]]:
    """Each connection's first line after a `hello`: the `busy` a refused one heard at accept,
    or the answer of an accepted one. No waiting for the daemon to get round to them."""
    for sock in socks:
        with contextlib.suppress(OSError):  # refused: may be closed already, its `busy` still buffered
            sock.sendall(HELLO)
    return [(read_replies(sock, 1) or [{}])[0] for sock in socks]


def _read_to_eof(sock: socket.socket, timeout: float = 20.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_big_reply_reaches_a_client_that_reads(make_daemon: Callable[..., Daemon]) -> None:
    """`write_buffer` bounds replies left unread, not the size of one reply (an admin's `sessions`)."""
    d = make_daemon("max_sessions_per_user = 1000\n", base=with_limits(write_buffer=4096)).start()
    sock = raw_connect(d.socket)
    rhost = ".".join(["h" * 49] * 5)  # a 249-character host name: big session rows
    for start in range(0, 1000, 25):  # within max_inflight
        sock.sendall(b"".join(b'{"id":%d,"op":"auth","user":"alice","password":"correct horse","service":"login",'
                              b'"rhost":"%s"}\n' % (i, rhost.encode()) for i in range(start, start + 25)))
        assert all(r["ok"] for r in read_replies(sock, 25))
    with d.client() as admin:
        listing = admin.sessions()["sessions"]
    assert len(listing) == 1000 and len(json.dumps(listing)) > 400_000
    assert "connections_closed_not_reading" not in counters(d)


def test_a_burst_of_connections_waits_in_the_kernel_queue(make_daemon: Callable[..., Daemon]) -> None:
    """1,000 clients connect while the daemon cannot accept (stopped): the kernel turns none away."""
    d = make_daemon(base=with_limits(max_connections=2000, max_connections_per_uid=2000)).start()
    burst = []
    os.kill(d.pid, signal.SIGSTOP)
    try:
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect(str(d.socket))  # BlockingIOError if the listen queue were full
            burst.append(sock)
    finally:
        os.kill(d.pid, signal.SIGCONT)
    for sock in burst:
        sock.setblocking(True)
        sock.settimeout(30)
        sock.sendall(HELLO)
    assert all(read_replies(sock, 1)[0]["ok"] for sock in burst)
    for sock in burst:
        sock.close()
