"""`run_daemon` through a real launcher subprocess, a real detached daemon and real signals."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("daemon_helper.py")


@dataclass
class Setup:
    root: Path

    @property
    def pidfile(self) -> Path:
        return self.root / "authd.pid"

    @property
    def sock(self) -> Path:
        return self.root / "authd.sock"

    @property
    def log(self) -> Path:
        return self.root / "authd.log"

    def launch(self, mode: str = "serve", *, timeout: float = 30.0, **kwargs: object) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(HELPER), mode, "--pidfile", str(self.pidfile), "--socket", str(self.sock)]
        command += ["--workdir", str(self.root), "--log", str(self.log), "--timeout", str(timeout)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout + 30, **kwargs)

    def pid(self) -> int:
        return int(self.pidfile.read_text())


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat fields after the command name: state, ppid, pgrp, session, tty_nr, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def gone(pid: int) -> bool:
    try:
        return stat_fields(pid)[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def pidfile_locked(path: Path) -> bool:
    with open(path) as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    setup = Setup(tmp_path)
    yield setup
    try:
        pid = setup.pid()
    except (FileNotFoundError, ValueError):
        return
    if not gone(pid):
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gone(pid), "the daemon to die")


def test_launcher_exits_zero_once_the_daemon_serves(setup: Setup) -> None:
    keep_r, keep_w = os.pipe()  # a descriptor the daemon must not inherit
    launcher = setup.launch(pass_fds=(keep_w,))
    os.close(keep_w)
    assert launcher.returncode == 0, launcher.stderr
    assert launcher.stderr == ""
    assert setup.sock.exists(), "ready only once listening"
    pid = setup.pid()
    assert not gone(pid)
    state, ppid, pgrp, session, tty_nr = stat_fields(pid)[:5]
    assert int(ppid) != os.getpid()
    assert int(session) != os.getsid(0), "in a session of its own"
    assert int(session) != pid, "not a session leader, so it cannot reacquire a terminal"
    assert int(tty_nr) == 0, "no controlling terminal"
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(r"^Umask:\s+0077$", status, re.M)
    assert os.readlink(f"/proc/{pid}/cwd") == str(setup.root)
    assert pidfile_locked(setup.pidfile)
    assert os.read(keep_r, 1) == b"", "the daemon closed inherited descriptors"
    os.close(keep_r)
    assert "serving" in setup.log.read_text()


def test_second_instance_is_refused(setup: Setup) -> None:
    assert setup.launch().returncode == 0
    first = setup.pid()
    second = setup.launch()
    assert second.returncode != 0
    assert f"already running (pid {first}" in second.stderr
    assert setup.pid() == first
    assert not gone(first)
    assert pidfile_locked(setup.pidfile)


def test_sigterm_stops_the_daemon_and_removes_the_pidfile(setup: Setup) -> None:
    assert setup.launch().returncode == 0
    pid = setup.pid()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: gone(pid), "the daemon to exit")
    assert not setup.pidfile.exists()
    assert not setup.sock.exists()
    assert "stopped" in setup.log.read_text()
    assert setup.launch().returncode == 0, "a clean stop leaves nothing in the way"


@pytest.mark.parametrize("previous", ["dead", "alive"])
def test_stale_pidfile_is_taken_over(setup: Setup, previous: str) -> None:
    if previous == "dead":
        exited = subprocess.Popen(["true"])
        exited.wait()
        stale_pid = exited.pid
    else:
        stale_pid = os.getpid()  # alive, but holding no lock
    setup.pidfile.write_text(f"{stale_pid}\n")
    launcher = setup.launch()
    assert launcher.returncode == 0, launcher.stderr
    assert setup.pid() not in (stale_pid, 0)
    assert pidfile_locked(setup.pidfile)
    log = setup.log.read_text()
    assert "stale pidfile taken over" in log and str(stale_pid) in log
    assert ("not running" if previous == "dead" else "still running without the lock") in log


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("bad-config", "bad config: daemon.socket: expected a path"),
        ("crash", "RuntimeError: boom during start-up"),
        ("no-ready", "exited with status 3 before it was ready"),
    ],
)
def test_startup_failure_is_reported_by_the_launcher(setup: Setup, mode: str, reason: str) -> None:
    launcher = setup.launch(mode)
    assert launcher.returncode == 1
    assert launcher.stderr == f"authd: {reason}\n"
    wait_for(lambda: not setup.pidfile.exists(), "the failed daemon to remove its pidfile")
    assert f"starting in mode {mode}" in setup.log.read_text()


def test_daemon_killed_during_startup_leaves_a_stale_pidfile(setup: Setup) -> None:
    launcher = setup.launch("die")
    assert launcher.returncode == 1
    assert launcher.stderr == f"authd: exited during start-up; see {setup.log}\n"
    dead = setup.pid()
    assert gone(dead) and not pidfile_locked(setup.pidfile)
    assert setup.launch().returncode == 0
    assert setup.pid() != dead


def test_pidfile_symlink_is_refused(setup: Setup) -> None:
    victim = setup.root / "victim"
    victim.write_text("precious\n")
    setup.pidfile.symlink_to(victim)
    launcher = setup.launch()
    assert launcher.returncode == 1
    assert launcher.stderr == f"authd: pidfile: {setup.pidfile} is a symbolic link; authd never writes through one: remove it\n"
    assert victim.read_text() == "precious\n"


def test_crash_traceback_goes_to_the_log(setup: Setup) -> None:
    assert setup.launch("crash").returncode == 1
    wait_for(lambda: "Traceback" in setup.log.read_text(), "the traceback in the log")
    assert "boom during start-up" in setup.log.read_text()


def test_socket_in_use_is_reported(setup: Setup) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(setup.sock))
        other.listen()
        launcher = setup.launch()
    assert launcher.returncode == 1
    assert "Address already in use" in launcher.stderr


def test_start_timeout_stops_the_daemon(setup: Setup) -> None:
    launcher = setup.launch("hang", timeout=1.5)
    assert launcher.returncode == 1
    match = re.fullmatch(r"authd: not ready after 1\.5s; stopped it \(pid (\d+)\)\n", launcher.stderr)
    assert match, launcher.stderr
    pid = int(match[1])
    wait_for(lambda: gone(pid), "the unready daemon to be stopped")


def test_unusable_pidfile_is_reported_before_detaching(setup: Setup) -> None:
    launcher = subprocess.run(
        [sys.executable, str(HELPER), "serve", "--pidfile", str(setup.root / "missing" / "authd.pid"),
         "--socket", str(setup.sock), "--workdir", str(setup.root)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )
    assert launcher.returncode == 1
    assert "cannot open pidfile" in launcher.stderr and "No such file or directory" in launcher.stderr
    assert not setup.sock.exists()


def test_sighup_reopens_the_log(setup: Setup) -> None:
    assert setup.launch().returncode == 0
    rotated = setup.log.with_suffix(".log.1")
    setup.log.rename(rotated)
    pid = setup.pid()
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: setup.log.exists() and "log reopened" in setup.log.read_text(), "the reopened log")
    assert "serving" in rotated.read_text()
    open_files = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert str(rotated) not in open_files, "the rotated log is let go"
    assert oct(setup.log.stat().st_mode & 0o777) == oct(0o600)
