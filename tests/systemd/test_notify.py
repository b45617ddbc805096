"""sd_notify and the watchdog against real AF_UNIX datagram listeners."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from authd import systemd


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


def test_notify_sends_one_datagram(listener: socket.socket) -> None:
    assert systemd.notify("READY=1", "STATUS=serving")
    assert listener.recv(4096) == b"READY=1\nSTATUS=serving"
    assert systemd.notify("STOPPING=1")
    assert listener.recv(4096) == b"STOPPING=1"


def test_notify_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"authd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_reloading_carries_the_monotonic_time(listener: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.notify_reloading("STATUS=reloading")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, stamp, status = listener.recv(4096).decode().split("\n")
    assert reloading == "RELOADING=1" and status == "STATUS=reloading"
    key, _, usec = stamp.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after


def test_notify_without_a_listener_is_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not systemd.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "not-a-socket-address")
    assert not systemd.notify("READY=1")


def test_notify_never_blocks_on_a_full_queue(listener: socket.socket) -> None:
    results = [systemd.notify(f"STATUS=ping {n}", "X" * 4000) for n in range(5000)]
    assert results[0] and not all(results), "a full queue drops the datagram instead of blocking"
    assert listener.recv(8192).startswith(b"STATUS=ping 0\n")


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "1", None),
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, interval: float | None) -> None:
    for var, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert systemd.watchdog_interval() == interval
