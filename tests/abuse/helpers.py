"""Shared pieces of the abuse tests: policies with tight limits, authctl, probes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..daemon import BASE_POLICY, Daemon


def with_limits(**limits: object) -> str:
    """The base policy with a `[daemon.limits]` table."""
    table = "".join(f"{key} = {value}\n" for key, value in limits.items())
    return BASE_POLICY.replace("[clients]", f"[daemon.limits]\n{table}\n[clients]")


def lockout_table(**table: str) -> str:
    """A `[lockout]` table (values as TOML text), for `make_daemon(extra=...)`."""
    return "\n[lockout]\n" + "".join(f"{key} = {value}\n" for key, value in table.items())


def ctl(daemon: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real `authctl` (python -m authd.ctl) against the daemon's socket."""
    command = [*daemon.command()[:-1], "authd.ctl", "-s", str(daemon.socket), *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, env=daemon.env(), timeout=60)


def ctl_as_nobody(daemon: Daemon, *args: str) -> tuple[int, str]:
    """authctl's code in a forked child running as uid/gid nobody (who cannot exec root's python)."""
    with tempfile.TemporaryFile() as out:
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                sys.stdout = sys.stderr = open(out.fileno(), "w", closefd=False)  # past pytest's capture
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                from authd import ctl as authctl

                code = authctl.main(["-s", str(daemon.socket), *args])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode()


def counters(daemon: Daemon) -> dict[str, int]:
    return daemon.call("status")["counters"]


def pam_calls(daemon: Daemon) -> int:
    return daemon.call("status")["pam"]["calls"]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class as_uid:
    """Run `fn` in a forked child that dropped to `uid` (and gid `uid`); `with` gives its JSON
    result, and the child keeps its sockets open until the block exits. An exception in the
    child comes back as {"error": "..."}."""

    def __init__(self, uid: int, fn: Callable[[], Any]) -> None:
        self.uid = uid
        self.fn = fn

    def __enter__(self) -> Any:
        out_r, out_w = os.pipe()
        self.hold_r, self.hold_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(out_r)
                os.close(self.hold_w)
                os.setgroups([])
                os.setgid(self.uid)
                os.setuid(self.uid)
                try:
                    result = self.fn()
                except Exception as exc:
                    result = {"error": repr(exc)}
                os.write(out_w, json.dumps(result).encode())
                os.close(out_w)
                os.read(self.hold_r, 1)
                code = 0
            finally:
                os._exit(code)
        os.close(out_w)
        os.close(self.hold_r)
        data = b""
        while chunk := os.read(out_r, 65536):
            data += chunk
        os.close(out_r)
        return json.loads(data)

    def __exit__(self, *exc: object) -> None:
        os.close(self.hold_w)
        os.waitpid(self.pid, 0)
