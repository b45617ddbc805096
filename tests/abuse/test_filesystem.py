"""The file system around a root daemon, attacked as a local user would: directories of theirs,
symlinks and files planted where authd keeps its state, its socket, its pidfile and its logs.

The suite runs as root, so `nobody` (uid 65534) plays the attacker: a directory or file of
theirs is made with chown. The victim is a root-owned file that must come through untouched.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from authd.client import Client, ClientError

from ..daemon import BASE_POLICY, Daemon, wait_for
from ..systemd.test_daemonize import gone

NOBODY = 65534
AUDIT = '\n[[handler]]\ntype = "audit"\npath = "{path}"\n'


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("precious\n")
    return path


def nobodys(path: Path) -> Path:
    os.chown(path, NOBODY, NOBODY)
    return path


def refused_start(d: Daemon) -> str:
    """Start `d` and expect it to exit 1 without ever serving; returns what it printed."""
    d.start(wait=False)
    proc = d.proc
    assert proc is not None

    def outcome() -> str | None:
        if proc.poll() is not None:
            return "exited"
        try:
            with Client(d.socket, timeout=2) as client:
                client.hello()
        except (ClientError, OSError):
            return None
        return "serving"

    assert wait_for(outcome, 30, what="authd to exit or serve") == "exited", f"authd started:\n{d.output()}"
    assert proc.returncode == 1, d.output()
    assert not d.socket.exists()
    return d.output()


PLANTED = {
    "symlink": "{path} is a symbolic link; authd never writes through one: remove it",
    "owned by nobody": "{path} is owned by nobody (uid 65534), not by root or the daemon's user root",
    "hard link": "{path} has 2 hard links",
}


def plant(how: str, path: Path, victim: Path) -> str:
    """Put a symlink to `victim`, a file of nobody's or a hard link to `victim` at `path`; returns the refusal."""
    if how == "symlink":
        path.symlink_to(victim)
    elif how == "owned by nobody":
        path.write_text("")
        nobodys(path)
    else:
        os.link(victim, path)
    return PLANTED[how].format(path=path)


# -- defect 1: directories of another user, files planted in the state dir -------------------


def test_state_dir_of_another_user_is_refused_with_the_sessions_in_it(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon().start()
    token = d.auth("alice")["session"]["token"]
    assert d.stop() == 0
    for path in [d.state, *d.state.iterdir()]:  # as if nobody had made the dir and planted sessions.db
        nobodys(path)
    output = refused_start(d)
    assert (f"daemon.state_dir: {d.state} is owned by nobody (uid 65534), not by root or the daemon's user root;"
            f" chown root {d.state}, or use a directory of its own") in output
    assert token not in output


def _state_below_nobodys(d: Daemon) -> str:
    theirs = nobodys(_mkdir(d.root / "theirs"))
    d.state = _mkdir(theirs / "state", 0o700)  # root's own, but nobody can rename it away
    d.write_policy(d.policy)
    return f"daemon.state_dir: {theirs}, on the way to {d.state}, is owned by nobody"


def _socket_below_nobodys(d: Daemon) -> str:
    theirs = nobodys(_mkdir(d.sock_dir / "theirs"))
    run = _mkdir(theirs / "run")
    d.socket = run / "authd.sock"
    d.write_policy(d.policy)
    return f"daemon.socket: {theirs}, on the way to {run}, is owned by nobody"


def _socket_dir_of_nobody(d: Daemon) -> str:
    nobodys(d.sock_dir)
    return f"daemon.socket: {d.sock_dir} is owned by nobody (uid 65534)"


def _socket_dir_writable_by_all(d: Daemon) -> str:
    d.sock_dir.chmod(0o777)
    return f"daemon.socket: {d.sock_dir} is writable by group or others (mode 777); chmod go-w {d.sock_dir}"


def _mkdir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(mode=mode)
    return path


@pytest.mark.parametrize("setup", [_state_below_nobodys, _socket_below_nobodys, _socket_dir_of_nobody,
                                   _socket_dir_writable_by_all],
                         ids=["state dir below nobody's", "socket dir below nobody's", "socket dir of nobody",
                              "socket dir writable by all"])
def test_untrusted_state_or_socket_directory_is_refused(make_daemon: Callable[..., Daemon],
                                                        setup: Callable[[Daemon], str]) -> None:
    d = make_daemon()
    expected = setup(d)
    assert expected in refused_start(d)


@pytest.mark.parametrize(("name", "how"), [
    ("sessions.db", "symlink"), ("lockout.db", "symlink"), ("sessions.db-wal", "symlink"),
    ("lockout.db-journal", "symlink"), ("sessions.db", "owned by nobody"), ("lockout.db", "hard link"),
])
def test_unsafe_file_in_the_state_dir_is_refused_not_opened(make_daemon: Callable[..., Daemon], victim: Path,
                                                            name: str, how: str) -> None:
    d = make_daemon()
    d.state.mkdir(mode=0o700)
    expected = plant(how, d.state / name, victim)
    assert f"daemon.state_dir: {expected}" in refused_start(d)
    assert victim.read_text() == "precious\n"


# -- defect 2: the pidfile (and the log) of `authd serve --daemon` ---------------------------


def daemonize(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(d.command("serve", "--daemon", "-c", str(d.config), *args), env=d.env(),
                          capture_output=True, text=True, timeout=90)


def stop_daemonized(d: Daemon) -> None:
    """SIGTERM the detached daemon serving on `d.socket`, if there is one, and wait until it is gone."""
    try:
        pid = d.call("status")["pid"]
    except (ClientError, OSError):
        return
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: gone(pid), what="the daemon to exit")


@pytest.mark.parametrize("planted", ["--pidfile", "state/authd.pid", "state/authd.log"])
def test_daemon_mode_never_writes_through_a_planted_symlink(make_daemon: Callable[..., Daemon], victim: Path,
                                                            planted: str) -> None:
    d = make_daemon()
    d.state.mkdir(mode=0o700)
    link = d.root / "authd.pid" if planted == "--pidfile" else d.root / planted
    link.symlink_to(victim)
    launcher = daemonize(d, *(["--pidfile", str(link)] if planted == "--pidfile" else []))
    stop_daemonized(d)  # only if it started (before the fix it did, and wrote its pid into the victim)
    what = "daemon.log_file" if link.name == "authd.log" else "pidfile"
    assert launcher.returncode == 1
    assert launcher.stderr == f"authd: {what}: {link} is a symbolic link; authd never writes through one: remove it\n"
    assert victim.read_text() == "precious\n"


def test_daemon_mode_removes_its_own_pidfile_and_nothing_else(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    pidfile = d.root / "authd.pid"
    launcher = daemonize(d, "--pidfile", str(pidfile))
    assert launcher.returncode == 0, launcher.stderr
    pid = int(pidfile.read_text())
    other = d.root / "other.pid"
    other.write_text("someone else's\n")
    os.replace(other, pidfile)  # the name now is another file: not the daemon's to delete
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: gone(pid), what="the daemon to exit")
    assert pidfile.read_text() == "someone else's\n"


# -- defect 3: log_file and the audit log ------------------------------------------------------


def with_log_file(path: Path) -> str:
    return BASE_POLICY.replace("[daemon]\n", f'[daemon]\nlog_file = "{path}"\n')


@pytest.mark.parametrize("log", ["log_file", "audit"])
@pytest.mark.parametrize("how", ["symlink", "owned by nobody", "hard link", "in a dir of nobody"])
def test_log_is_never_written_through_a_planted_file(make_daemon: Callable[..., Daemon], victim: Path, log: str,
                                                     how: str) -> None:
    logs = victim.parent / "logs"
    logs.mkdir()
    path = logs / "authd.log"
    if log == "log_file":
        d, key = make_daemon(base=with_log_file(path)), "daemon.log_file"
    else:
        d, key = make_daemon(AUDIT.format(path=path)), "handler[0].path"
    if how == "in a dir of nobody":
        nobodys(logs)
        expected = f"{logs} is owned by nobody (uid 65534)"
    else:
        expected = plant(how, path, victim)
    assert f"{key}: {expected}" in refused_start(d)
    assert victim.read_text() == "precious\n"


def test_log_file_reopen_after_rotation_never_follows_a_planted_symlink(make_daemon: Callable[..., Daemon],
                                                                        victim: Path) -> None:
    path = victim.parent / "authd-file.log"
    d = make_daemon(base=with_log_file(path)).start()
    rotated = path.with_name("authd-file.log.1")
    path.rename(rotated)
    path.symlink_to(victim)
    d.kill(signal.SIGHUP)
    wait_for(lambda: "cannot reopen the log file; still writing to the old one" in rotated.read_text(), 20,
             what="the reopen to be refused")
    assert d.auth("mallory-was-here", "guess")["error"] == "auth_failed"
    wait_for(lambda: "mallory-was-here" in rotated.read_text(), 20, what="the next lines in the old file")
    assert victim.read_text() == "precious\n"
    assert d.stop() == 0


def test_audit_log_reopen_after_rotation_never_follows_a_planted_symlink(make_daemon: Callable[..., Daemon],
                                                                         victim: Path) -> None:
    path = victim.parent / "audit.jsonl"
    d = make_daemon(AUDIT.format(path=path)).start()
    assert d.auth("alice")["ok"]
    wait_for(lambda: path.exists() and "alice" in path.read_text(), 20, what="the first audit line")
    path.rename(path.with_name("audit.jsonl.1"))
    path.symlink_to(victim)
    d.kill(signal.SIGHUP)
    wait_for(lambda: d.log_lines("reload failed; previous policy kept"), 20, what="the reload to be refused")
    assert d.auth("mallory-was-here", "guess")["error"] == "auth_failed"

    def refused() -> list[dict]:
        return [line for line in d.log_lines("handler failed") if "is a symbolic link" in line.get("error", "")]

    wait_for(refused, 20, what="the audit handler to refuse the symlink")
    assert victim.read_text() == "precious\n"
    assert d.stop() == 0
