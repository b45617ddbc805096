"""Shared pieces of the abuse tests: policies with tight limits, authctl, probes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

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
    """authctl's code in a forked child running as uid/gid nobody (who cannot exec root's python).

    Imported before the fork: nobody may not be able to read the checkout (root's 0700 home).
    """
    from authd import ctl as authctl

    with tempfile.TemporaryFile() as out:
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                sys.stdout = sys.stderr = open(out.fileno(), "w", closefd=False)  # past pytest's capture
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
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
