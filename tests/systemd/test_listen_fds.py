"""Socket activation through the real `systemd-socket-activate`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from authd import systemd

REPO = Path(__file__).resolve().parents[2]

# Runs as the activated service: reports what listen_fds() found over the connection that
# activated it, accepted on the first socket of the first name.
ACTIVATED = """
import json, os, socket
from authd.systemd import listen_fds
before = sorted(k for k in os.environ if k.startswith("LISTEN_"))
found = listen_fds()
report = {
    "before": before,
    "after": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "names": {
        name: [[s.family, s.type, s.getsockname(), os.get_inheritable(s.fileno())] for s in socks]
        for name, socks in found.items()
    },
}
conn, _ = next(iter(found.values()))[0].accept()
conn.sendall(json.dumps(report).encode())
conn.close()
"""


def activate(tmp_path: Path, paths: list[Path], *options: str) -> dict[str, Any]:
    command = ["systemd-socket-activate", "-E", f"PYTHONPATH={REPO}"]
    for path in paths:
        command += ["-l", str(path)]
    command += [*options, sys.executable, "-c", ACTIVATED]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as activator:
        try:
            deadline = time.monotonic() + 20
            while not all(path.exists() for path in paths):
                assert activator.poll() is None, activator.stderr.read() if activator.stderr else ""
                assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
                time.sleep(0.02)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(20)
                client.connect(str(paths[0]))
                data = b"".join(iter(lambda: client.recv(65536), b""))
            assert activator.wait(timeout=20) == 0
        finally:
            if activator.poll() is None:
                activator.kill()
    return json.loads(data)


def test_one_named_socket(tmp_path: Path) -> None:
    path = tmp_path / "authd.sock"
    report = activate(tmp_path, [path], "--fdname=authd")
    assert report["before"] == ["LISTEN_FDNAMES", "LISTEN_FDS", "LISTEN_PID"]
    assert report["after"] == [], "children must not inherit the activation variables"
    assert report["names"] == {"authd": [[socket.AF_UNIX, socket.SOCK_STREAM, str(path), False]]}


def test_a_named_set(tmp_path: Path) -> None:
    native, sasl = tmp_path / "authd.sock", tmp_path / "saslauthd.mux"
    report = activate(tmp_path, [native, sasl], "--fdname=authd:saslauthd")
    assert report["names"] == {
        "authd": [[socket.AF_UNIX, socket.SOCK_STREAM, str(native), False]],
        "saslauthd": [[socket.AF_UNIX, socket.SOCK_STREAM, str(sasl), False]],
    }


def test_unnamed_sockets_are_unknown(tmp_path: Path) -> None:
    first, second = tmp_path / "a.sock", tmp_path / "b.sock"
    report = activate(tmp_path, [first, second])
    assert report["names"] == {
        "unknown": [
            [socket.AF_UNIX, socket.SOCK_STREAM, str(first), False],
            [socket.AF_UNIX, socket.SOCK_STREAM, str(second), False],
        ]
    }


@pytest.mark.parametrize("listen_pid", ["1", "not-a-pid", None])
def test_variables_meant_for_another_process_are_dropped(monkeypatch: pytest.MonkeyPatch, listen_pid: str | None) -> None:
    if listen_pid is None:
        monkeypatch.delenv("LISTEN_PID", raising=False)
    else:
        monkeypatch.setenv("LISTEN_PID", listen_pid)
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "authd")
    assert systemd.listen_fds() == {}
    assert not any(var.startswith("LISTEN_") for var in os.environ)
