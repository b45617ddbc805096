"""Signals and lifecycle against a real daemon: reload, dump, drain, status, systemd notify."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from authd.client import Client

from .daemon import BASE_POLICY, CANARY, PASSWORD, ClientLoop, Daemon, inflight, raw_connect, read_replies, scan_for, wait_for
from .pamenv import PamEnv
from .procs import children, ignored_signals


def generation(d: Daemon) -> int:
    return d.call("status")["generation"]


# --- SIGHUP -----------------------------------------------------------------------------


def test_hup_applies_new_policy_and_keeps_sessions(daemon: Daemon) -> None:
    token = daemon.auth("bob")["session"]["token"]
    with ClientLoop(daemon) as loop:
        daemon.write_policy(daemon.policy + 'deny_users = ["bob"]\n')
        daemon.kill(signal.SIGHUP)
        wait_for(lambda: generation(daemon) == 2, what="generation 2")
    assert daemon.auth("bob")["error"] == "not_authorized", "new rule applies to the next request"
    assert daemon.call("session", token=token)["ok"], "existing session still validates"
    assert loop.errors == [] and loop.failures() == [] and len(loop.replies) == loop.sent
    assert daemon.log_lines("policy reloaded")[-1]["generation"] == 2


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("[[service]\nname = 'x'\n", "Expected ']]'"),
        ("bogus_key = 1\n", "service[0].bogus_key"),
        ('allow_groups = ["no-such-group-zz"]\n', "service[0].allow_groups[0]"),
    ],
    ids=["syntax", "unknown-key", "unknown-group"],
)
def test_hup_with_broken_file_keeps_old_policy(make_daemon: Callable[..., Daemon], breakage: str, expected: str) -> None:
    d = make_daemon('deny_users = ["bob"]\n').start()
    d.write_policy(d.policy.replace('deny_users = ["bob"]\n', "") + breakage)
    d.kill(signal.SIGHUP)
    status = wait_for(lambda: (s := d.call("status"))["last_reload_error"] and s, what="reload error in status")
    assert expected in status["last_reload_error"] and str(d.config) in status["last_reload_error"]
    assert status["generation"] == 1 and status["state"] == "ready"
    assert d.auth("bob")["error"] == "not_authorized", "old rule still applies"
    logged = d.log_lines("reload failed; previous policy kept")
    assert logged and expected in logged[-1]["error"]


def test_hup_burst_loses_nothing(daemon: Daemon) -> None:
    with ClientLoop(daemon) as loop:
        for i in range(200):
            if i % 50 == 0:
                daemon.write_policy(daemon.policy + f"# revision {i}\n" + ('deny_users = ["bob"]\n' if i == 150 else ""))
            daemon.kill(signal.SIGHUP)
        wait_for(lambda: daemon.auth("bob").get("error") == "not_authorized", what="last file's policy")
        sent = loop.sent
        wait_for(lambda: loop.sent >= sent + 20, what="logins under the last policy")
    assert loop.errors == [] and loop.failures() == [] and len(loop.replies) == loop.sent
    status = daemon.call("status")
    assert status["state"] == "ready" and 2 <= status["generation"] <= 201
    assert status["last_reload_error"] is None


def test_authctl_reload(daemon: Daemon) -> None:
    ctl = [*daemon.command()[:-1], "authd.ctl", "-s", str(daemon.socket), "reload"]
    ok = subprocess.run(ctl, capture_output=True, text=True, env=daemon.env(), timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["generation"] == 2
    daemon.write_policy(daemon.policy + "nonsense = true\n")
    bad = subprocess.run(ctl, capture_output=True, text=True, env=daemon.env(), timeout=60)
    assert bad.returncode == 1 and "service[0].nonsense" in bad.stderr and "reload_failed" in bad.stderr
    assert generation(daemon) == 2


def test_restart_only_settings_are_reported(daemon: Daemon) -> None:
    daemon.write_policy(daemon.policy.replace("workers = 2", "workers = 3\npam_keep_modules = false"))
    reply = daemon.call("reload")
    assert reply["ok"] and reply["restart_required"] == ["daemon.workers", "daemon.pam_keep_modules"]
    assert daemon.call("status")["pam"]["size"] == 2, "not half-applied"


def test_workers_never_see_signals(daemon: Daemon) -> None:
    """The workers ignore the operator's signals, so the kernel discards them as they are sent
    (no wait is needed to see that nothing happens): a `kill` of the process group reloads
    and dumps, and leaves every worker alone."""
    before = daemon.call("status")["pam"]
    signals = {signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
    workers = children(daemon.pid)
    assert len(workers) == before["size"] and all(signals <= ignored_signals(pid) for pid in workers)
    for signum in signals:
        os.killpg(daemon.pid, signum) if os.getpgid(daemon.pid) == daemon.pid else daemon.kill(signum)
    wait_for(lambda: generation(daemon) == 2, what="the reload SIGHUP asked for")
    assert daemon.auth("alice")["ok"]
    assert sorted(children(daemon.pid)) == sorted(workers)
    after = daemon.call("status")["pam"]
    assert after["crashed"] == before["crashed"] == 0 and after["spawned"] == before["spawned"]


# --- SIGUSR1 / SIGUSR2 --------------------------------------------------------------------


def test_usr1_dumps_sessions(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(base=BASE_POLICY.replace("sweep_interval", "dump_keep = 2\nsweep_interval")).start()
    tokens = [d.auth(user)["session"]["token"] for user in ("alice", "bob", "alice")]
    for dumps in range(1, 4):
        d.kill(signal.SIGUSR1)
        wait_for(lambda n=dumps: len(d.log_lines("sessions dumped")) == n, what=f"dump {dumps}")
    dumps = wait_for(lambda: len(list(d.state.glob("sessions-*.json"))) == 2 and sorted(d.state.glob("sessions-*.json")),
                     what="two dumps kept")
    data = json.loads(dumps[-1].read_text())
    assert data["count"] == 3 and {s["user"] for s in data["sessions"]} == {"alice", "bob"}
    assert data["by_service"] == {"login": 3}
    assert dumps[-1].stat().st_mode & 0o777 == 0o600
    for token in tokens:
        assert scan_for(token, d.state) == []
    summary = d.log_lines("sessions dumped")[-1]
    assert summary["count"] == 3 and summary["by_service"] == {"login": 3}


def test_usr2_logs_status_and_keeps_serving(daemon: Daemon) -> None:
    for _ in range(3):
        daemon.kill(signal.SIGUSR2)
    wait_for(lambda: daemon.log_lines("status"), what="status line")
    assert daemon.call("hello")["ok"] and daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.log_lines("status")[-1]["state"] == "ready"


# --- SIGTERM / SIGINT ---------------------------------------------------------------------


def test_term_under_load_answers_everything(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("failure_delay = 5.0\n").start()
    sock = raw_connect(d.socket)
    lines = [b'{"id":"bad","op":"auth","user":"alice","password":"wrong","service":"login"}\n']
    lines += [b'{"id":%d,"op":"auth","user":"bob","password":"%s","service":"login"}\n' % (i, PASSWORD.encode()) for i in range(30)]
    sock.sendall(b"".join(lines))
    wait_for(lambda: inflight(d) == 1, what="bob's logins answered, the failure waiting out its delay")
    started = time.monotonic()
    d.kill(signal.SIGTERM)
    replies = read_replies(sock, len(lines))
    assert len(replies) == len(lines)
    assert {r["id"] for r in replies} == {"bad", *range(30)}
    assert next(r for r in replies if r["id"] == "bad")["error"] == "auth_failed", "pending failure delay cut short"
    assert d.proc is not None and d.proc.wait(30) == 0
    assert time.monotonic() - started < 5.0, "did not wait out the 5 s failure delay"
    assert not d.socket.exists()
    assert d.log_lines("stopped")[-1]["forced"] is False


def test_term_refuses_new_connections_and_drains_loop(daemon: Daemon) -> None:
    with ClientLoop(daemon) as loop:
        daemon.kill(signal.SIGTERM)
        assert daemon.proc is not None and daemon.proc.wait(30) == 0
    answered = len(loop.replies)
    assert answered >= loop.sent - 1 and all(r.get("ok") or r.get("error") == "shutting_down" for r in loop.replies)
    with pytest.raises(OSError):
        raw_connect(daemon.socket)


def test_term_while_pam_hangs_exits_within_deadline(pam: PamEnv, make_daemon: Callable[..., Daemon],
                                                    crash_modules: dict[str, Path]) -> None:
    d, _hung = _daemon_with_hung_pam_call(pam, make_daemon, crash_modules, drain_timeout=2.0)
    started = time.monotonic()
    d.kill(signal.SIGTERM)
    code = d.proc.wait(30) if d.proc else None
    assert time.monotonic() - started < 10, "bounded by drain_timeout"
    assert code == 1, "a forced drain exits non-zero"
    assert d.log_lines("drain deadline passed; dropping connections and killing PAM workers")


def test_second_int_exits_at_once(pam: PamEnv, make_daemon: Callable[..., Daemon], crash_modules: dict[str, Path]) -> None:
    d, _hung = _daemon_with_hung_pam_call(pam, make_daemon, crash_modules, drain_timeout=60.0)
    d.kill(signal.SIGINT)
    wait_for(lambda: d.log_lines("draining"), what="the first INT to start the drain")
    assert d.proc is not None and d.proc.poll() is None, "first INT drains (and waits for the hung call)"
    started = time.monotonic()
    d.kill(signal.SIGINT)
    assert d.proc.wait(10) != 0
    assert time.monotonic() - started < 5


def _daemon_with_hung_pam_call(pam: PamEnv, make_daemon: Callable[..., Daemon], crash_modules: dict[str, Path],
                               drain_timeout: float) -> tuple[Daemon, socket.socket]:
    """A daemon with one request stuck in a PAM module that never returns, and its connection."""
    pam.add_module_service("hangs", crash_modules["hang"])
    base = BASE_POLICY.replace("pam_timeout = 5.0", "pam_timeout = 120.0").replace(
        "drain_timeout = 10.0", f"drain_timeout = {drain_timeout}")
    d = make_daemon(base=base, extra='\n[[service]]\nname = "hangs"\npam_service = "hangs"\n').start()
    sock = raw_connect(d.socket)
    sock.sendall(b'{"id":1,"op":"auth","user":"alice","password":"x","service":"hangs"}\n')
    wait_for(lambda: inflight(d) == 1, what="the request to be stuck in PAM")
    return d, sock


# --- systemd ------------------------------------------------------------------------------


class NotifyListener:
    """A real NOTIFY_SOCKET: collects every datagram the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def states(self) -> list[str]:
        out = []
        for message in self.messages:
            for line in message.splitlines():
                if line in ("READY=1", "RELOADING=1", "STOPPING=1"):
                    out.append(line.split("=")[0])
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(Path(tmp_path.parent / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock"))
    yield listener
    listener.close()


def test_sd_notify_sequence_and_watchdog(make_daemon: Callable[..., Daemon], notify_socket: NotifyListener) -> None:
    d = make_daemon(env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"}).start()
    wait_for(lambda: "READY" in notify_socket.states(), what="READY=1")
    assert d.call("reload")["ok"]
    d.write_policy(d.policy + "broken = 1\n")
    d.kill(signal.SIGHUP)
    wait_for(lambda: any("STATUS=reload failed:" in m for m in notify_socket.messages), what="reload failed status")
    wait_for(lambda: sum("WATCHDOG=1" in m for m in notify_socket.messages) >= 3, what="watchdog pings from the loop")
    d.stop()
    assert notify_socket.states() == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"]
    reloading = next(m for m in notify_socket.messages if "RELOADING=1" in m)
    assert "MONOTONIC_USEC=" in reloading


def test_socket_activation(pam: PamEnv, make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    env = d.env()
    passed = [f"-E{key}={env[key]}" for key in ("PYTHONPATH", *pam.env())]
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(d.socket), "--fdname=authd", *passed,
                             *d.command("serve", "-c", str(d.config))],
                            stdout=d.log.open("ab"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _connectable(d.socket), what="systemd-socket-activate to listen")
        with Client(d.socket, timeout=30) as client:
            assert client.hello()["ok"]
            assert client.auth("alice", PASSWORD, "login")["user"] == "alice"
        assert d.log_lines("listening")[-1]["inherited"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert d.socket.exists(), "a socket systemd owns is never unlinked"
    finally:
        if proc.poll() is None:
            proc.kill()


def _connectable(path: Path) -> bool:
    try:
        raw_connect(path).close()
    except OSError:
        return False
    return True


# --- --daemon -----------------------------------------------------------------------------


def test_daemon_mode(daemon_factory: Callable[..., tuple[Daemon, Path]]) -> None:
    d, pidfile = daemon_factory()
    launch = subprocess.run(d.command("serve", "-c", str(d.config), "--daemon", "--pidfile", str(pidfile)),
                            env=d.env(), capture_output=True, text=True, timeout=60)
    assert launch.returncode == 0, launch.stderr
    pid = int(pidfile.read_text())
    assert os.getsid(pid) != os.getsid(0), "detached into its own session"
    assert Client(d.socket).connect().hello()["ok"]
    second = subprocess.run(d.command("serve", "-c", str(d.config), "--daemon", "--pidfile", str(pidfile)),
                            env=d.env(), capture_output=True, text=True, timeout=60)
    assert second.returncode != 0 and "already running" in second.stderr
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: Client(d.socket).connect().status()["generation"] == 2, what="reload under --daemon")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pidfile.exists(), what="pidfile removed at exit")
    assert not d.socket.exists()


def test_daemon_mode_bad_config_fails_launcher(daemon_factory: Callable[..., tuple[Daemon, Path]]) -> None:
    d, pidfile = daemon_factory()
    d.write_policy(d.policy + "nope = 1\n")
    launch = subprocess.run(d.command("serve", "-c", str(d.config), "--daemon", "--pidfile", str(pidfile)),
                            env=d.env(), capture_output=True, text=True, timeout=60)
    assert launch.returncode != 0 and "service[0].nope" in launch.stderr
    assert not pidfile.exists()


def test_daemon_mode_socket_in_use_fails_launcher(daemon: Daemon, daemon_factory: Callable[..., tuple[Daemon, Path]]) -> None:
    d, pidfile = daemon_factory()
    d.write_policy(d.policy.replace("{socket}", str(daemon.socket)))
    launch = subprocess.run(d.command("serve", "-c", str(d.config), "--daemon", "--pidfile", str(pidfile)),
                            env=d.env(), capture_output=True, text=True, timeout=60)
    assert launch.returncode != 0 and "in use" in launch.stderr


@pytest.fixture
def daemon_factory(make_daemon: Callable[..., Daemon]) -> Iterator[Callable[..., tuple[Daemon, Path]]]:
    started: list[Path] = []

    def make() -> tuple[Daemon, Path]:
        d = make_daemon(name=f"dm{len(started)}")
        pidfile = d.root / "authd.pid"
        started.append(pidfile)
        return d, pidfile

    yield make
    for pidfile in started:
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_canary_never_in_dumps_or_logs(daemon: Daemon) -> None:
    daemon.auth("alice", CANARY)
    daemon.auth("alice")
    daemon.kill(signal.SIGUSR1)
    daemon.kill(signal.SIGUSR2)
    daemon.kill(signal.SIGHUP)
    wait_for(lambda: list(daemon.state.glob("sessions-*.json")), what="dump")
    assert daemon.stop() == 0
    assert CANARY not in daemon.output() and scan_for(CANARY, daemon.root) == []
