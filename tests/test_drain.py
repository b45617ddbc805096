"""SIGTERM on open connections: every line a client managed to write is answered.

The contract (docs/protocol.md, "Drain"): within the grace requests are served; after it
each line is answered `shutting_down`, for as long as the connection is open; once nothing
is in flight the daemon stops taking input, so a later write fails at the client (EPIPE)
instead of vanishing, and the client reads every reply, then EOF.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .daemon import BASE_POLICY, PASSWORD, Daemon, inflight, raw_connect, read_replies, wait_for
from .pamenv import PamEnv

HELLO = b'{"id":"h","op":"hello"}\n'


def test_lines_after_the_grace_are_all_answered_until_the_last_reply(pam: PamEnv, make_daemon: Callable[..., Daemon],
                                                                     crash_modules: dict[str, Path]) -> None:
    """A connection with a request stuck in PAM keeps being read during the drain: every line
    sent after the grace gets `shutting_down` (not just the first), the stuck request gets its
    answer when PAM gives up, and only then does the connection end: EOF, then EPIPE."""
    pam.add_module_service("hangs", crash_modules["hang"])
    base = BASE_POLICY.replace("pam_timeout = 5.0", "pam_timeout = 3.0")
    d = make_daemon(base=base, extra='\n[[service]]\nname = "hangs"\npam_service = "hangs"\n').start()
    sock = raw_connect(d.socket)
    sock.sendall(b'{"id":"stuck","op":"auth","user":"alice","password":"x","service":"hangs"}\n')
    wait_for(lambda: inflight(d) == 1, what="the stuck request to be in flight")
    d.kill(signal.SIGTERM)
    while (reply := _ask(sock))["ok"]:  # served until the grace is over
        pass
    assert reply["error"] == "shutting_down"
    after_grace = [_ask(sock) for _ in range(50)]
    assert [r.get("error") for r in after_grace] == ["shutting_down"] * 50
    (stuck,) = read_replies(sock, 1)
    assert stuck["id"] == "stuck" and stuck["error"] == "unavailable", "PAM gave up after pam_timeout"
    assert sock.recv(1) == b"", "then EOF: nothing else is coming"
    try:
        sock.sendall(HELLO)
        raise AssertionError("a write after the end must fail, not vanish")
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert d.proc is not None and d.proc.wait(30) == 0
    assert d.log_lines("stopped")[-1]["forced"] is False


def _ask(sock: socket.socket) -> dict[str, Any]:
    sock.sendall(HELLO)
    replies = read_replies(sock, 1)
    assert replies, "a line was taken but never answered"
    return replies[0]


AUTH = b'{"id":%d,"op":"auth","user":"alice","password":"%s","service":"login","open_session":false}\n'


class _Pipeliner(threading.Thread):
    """Keeps up to WINDOW lines (logins and hellos) unanswered, sending a new one as each reply
    comes, until the daemon ends the connection. Counts lines written and replies read."""

    WINDOW = 8

    def __init__(self, path: Path, seed: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.seed = seed
        self.written = 0
        self.replies: list[dict[str, Any]] = []
        self.ending = ""
        self.started_serving = threading.Event()
        self._buffer = b""

    def run(self) -> None:
        sock = raw_connect(self.path)
        try:
            while True:
                waiting = self.written - len(self.replies)
                if waiting < self.WINDOW:
                    n = self.seed + self.written
                    sock.sendall(AUTH % (n, PASSWORD.encode()) if n % 3 else HELLO)  # one small write: taken whole or refused
                    self.written += 1
                if select.select([sock], [], [], 0 if waiting < self.WINDOW else None)[0] and not self._read(sock):
                    self.ending = "eof"
                    return
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.ending = type(exc).__name__
        while self._read(sock):  # what was answered before the write failed, up to EOF
            pass

    def _read(self, sock: socket.socket) -> bool:
        chunk = sock.recv(65536)
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        self.replies += [json.loads(line) for line in lines]
        if len(self.replies) >= 3:
            self.started_serving.set()
        return bool(chunk)


def test_a_drain_under_load_answers_every_line_on_open_connections(make_daemon: Callable[..., Daemon]) -> None:
    """Eight clients pipelining logins when SIGTERM arrives: each line any of them wrote is
    answered, ok or `shutting_down`, and each connection ends in EOF or a refused write."""
    d = make_daemon().start()
    clients = [_Pipeliner(d.socket, seed) for seed in range(8)]
    for client in clients:
        client.start()
    for client in clients:
        assert client.started_serving.wait(30)
    d.kill(signal.SIGTERM)
    for client in clients:
        client.join(60)
        assert not client.is_alive()
    assert d.proc is not None and d.proc.wait(30) == 0
    for client in clients:
        assert len(client.replies) == client.written, (client.ending, client.written, len(client.replies))
        assert client.ending in ("eof", "BrokenPipeError"), client.ending
        assert all(r["ok"] or r["error"] == "shutting_down" for r in client.replies)
    assert sum(r.get("error") == "shutting_down" for c in clients for r in c.replies) > 0, "the drain was met mid-stream"
