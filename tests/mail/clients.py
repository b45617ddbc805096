"""Talking saslauthd and Dovecot auth-client to a daemon under test, from raw sockets."""

from __future__ import annotations

import base64
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from authd.saslauthd.codec import encode_request

from ..daemon import Daemon, raw_connect

MAIL_POLICY = """
[saslauthd]
socket = "{sock_dir}/mux"
services = {{ smtp = "login" }}

[dovecot]
socket = "{sock_dir}/auth-client"
services = {{ smtp = "login" }}
"""


def mail_daemon(make_daemon: Callable[..., Daemon], extra: str = "", mail: str = MAIL_POLICY, **kwargs: object) -> Daemon:
    """A daemon (not started) that also serves both mail sockets in its socket dir."""
    d = make_daemon(extra, **kwargs)
    d.write_policy(d.policy + mail.format(sock_dir=d.sock_dir))
    return d


def mux(d: Daemon) -> Path:
    return d.sock_dir / "mux"


def auth_client(d: Daemon) -> Path:
    return d.sock_dir / "auth-client"


def saslauthd(d: Daemon, user: str, password: str, service: str = "smtp", realm: str = "", addr: str | None = None) -> bytes:
    """One saslauthd request; the reply text (`OK`, `NO ...`), or b"" if the connection closed."""
    with raw_connect(mux(d)) as sock:
        sock.sendall(encode_request(user, password, service, realm, addr))
        return read_counted(sock)


def read_counted(sock: socket.socket) -> bytes:
    head = recv_exactly(sock, 2)
    if len(head) < 2:
        return b""
    return recv_exactly(sock, struct.unpack(">H", head)[0])


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class DovecotClient:
    """A Dovecot auth client on its own connection: reads the handshake, then sends lines."""

    def __init__(self, d: Daemon) -> None:
        self.sock = raw_connect(auth_client(d))
        self.buffer = b""
        self.handshake = self.lines_until(b"DONE")
        self.sock.sendall(b"VERSION\t1\t0\nCPID\t1\n")

    def __enter__(self) -> DovecotClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def line(self) -> str:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return ""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def lines_until(self, last: bytes) -> list[str]:
        lines = [self.line()]
        while lines[-1] not in (last.decode(), ""):
            lines.append(self.line())
        return lines

    def plain(self, request_id: int, user: str, password: str, rip: str = "192.0.2.10", service: str = "smtp") -> str:
        self.send(f"AUTH\t{request_id}\tPLAIN\tservice={service}\tnologin\tlip=127.0.0.1\trip={rip}\tresp={plain(user, password)}")
        return self.line()
