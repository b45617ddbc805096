"""Start a real authd subprocess over pam_wrapper, talk to its real socket, send it real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from authd.client import AsyncClient, Client, ClientError, ReplyError

from .pamenv import PamEnv

CANARY = "canary-Pa55w0rd-7f3a9c"  # must never appear in any output, file or reply
PASSWORD = "correct horse"
SERVICE = "login"  # the authd service in the default policy
PAM_SERVICE = "authd-test"

T = TypeVar("T")

BASE_POLICY = """
[daemon]
socket = "{socket}"
socket_mode = 0o666
state_dir = "{state}"
workers = 2
pam_timeout = 5.0
drain_timeout = 10.0
sweep_interval = 0.5
log_level = "debug"

[clients]
users = ["*"]
admin_users = ["root"]

[[service]]
name = "login"
pam_service = "authd-test"
"""


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Daemon:
    """One authd process under test; `policy` is the TOML text, re-writable for reloads."""

    def __init__(self, root: Path, pam: PamEnv, policy: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.pam = pam
        self.sock_dir = Path(tempfile.mkdtemp(prefix="authd-", dir="/tmp"))  # AF_UNIX paths are short
        self.sock_dir.chmod(0o755)
        self.socket = self.sock_dir / "authd.sock"
        self.state = root / "state"
        self.config = root / "authd.toml"
        self.log = root / "authd.log"
        self.extra_env = env or {}
        self.write_policy(policy)
        self.proc: subprocess.Popen[bytes] | None = None

    def write_policy(self, policy: str) -> None:
        self.policy = policy
        staged = self.config.with_suffix(".new")  # rename: a SIGHUP must never read half a file
        staged.write_text(policy.replace("{socket}", str(self.socket)).replace("{state}", str(self.state)))
        staged.replace(self.config)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
        env.update(self.pam.env())
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        env.update(self.extra_env)
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "authd", *args]

    def start(self, wait: bool = True) -> Daemon:
        log = self.log.open("ab")
        self.proc = subprocess.Popen(self.command("serve", "-c", str(self.config)), env=self.env(),
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"authd exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with Client(self.socket, timeout=2) as c:
                    c.hello()
            except (ClientError, OSError):
                return False
            return True

        wait_for(ready, timeout, what="authd to serve")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket, timeout=timeout).connect()

    def aclient(self) -> AsyncClient:
        return AsyncClient(self.socket)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request on a fresh connection; returns the reply whether ok or not."""
        with self.client() as c:
            try:
                return c.call(op, **fields)
            except ReplyError as exc:
                return exc.reply

    def auth(self, user: str = "alice", password: str = PASSWORD, **fields: Any) -> dict[str, Any]:
        return self.call("auth", user=user, password=password, service=fields.pop("service", SERVICE), **fields)

    def kill(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.kill(signum)
        return self.wait(timeout, f"after {signal.Signals(signum).name}")

    def wait(self, timeout: float = 30.0, what: str = "") -> int:
        """Its exit status, once it exits by itself (or was told to already); killed if it takes longer."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"authd did not exit within {timeout}s {what}".rstrip()) from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_lines(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (event is None or record.get("event") == event):
                out.append(record)
        return out

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def inflight(d: Daemon) -> int:
    """Requests in flight, not counting the `status` call that asks."""
    return d.call("status")["connections"]["inflight"] - 1


class ClientLoop:
    """A client on its own persistent connection, sending `op` over and over from a thread.

    Run beside a reload, a shutdown or an attack, it shows whether authd kept serving everyone
    else: it records every request sent, every reply, each reply's latency and any error.
    `pause` spaces the requests out, for a normal client rather than a hammering one.
    """

    def __init__(self, daemon: Daemon, op: str = "auth", pause: float = 0.0) -> None:
        self.daemon = daemon
        self.op = op
        self.pause = pause
        self.sent = 0
        self.replies: list[dict[str, Any]] = []
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        wait_for(lambda: len(self.replies) >= 3 or self.errors, 20, what="the client loop to get going")
        assert self.errors == [], self.errors
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with Client(self.daemon.socket, timeout=30) as client:
            while not self._stop.is_set():
                self.sent += 1
                started = time.monotonic()
                try:
                    if self.op == "auth":
                        self.replies.append(client.auth("alice", PASSWORD, SERVICE, open_session=False))
                    else:
                        self.replies.append(client.call(self.op))
                except ReplyError as exc:
                    self.replies.append(exc.reply)
                except (ClientError, OSError) as exc:
                    self.errors.append(str(exc))
                    return
                self.latencies.append(time.monotonic() - started)
                self._stop.wait(self.pause)

    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.replies if not r.get("ok")]

    def served_during(self, action: Callable[[], T]) -> T:
        """Run `action()` and check that this client got fresh good answers meanwhile."""
        before = len(self.replies)
        result = action()
        wait_for(lambda: len(self.replies) >= before + 3 or self.errors, 20, what="answers during the action")
        self.check()
        return result

    def check(self) -> None:
        """No error, and every reply so far was a success."""
        assert self.errors == [], self.errors
        assert self.replies and not self.failures(), self.failures()[:3]


def raw_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    return sock


class as_uid:
    """Run `fn` in a forked child that dropped to `uid` (and gid `uid`); `with` gives its JSON
    result. The child lives until the block exits, so sockets `fn` keeps referenced stay open
    that long. An exception in the child comes back as {"error": "..."}. Nest them LIFO (an
    ExitStack): a child holds copies of the pipes of those forked before it."""

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


def as_nobody(path: Path, request: bytes) -> bytes:
    """Send `request` from a child that dropped to uid/gid nobody; all it got before the close."""

    def exchange() -> str:
        sock = raw_connect(path)
        sock.settimeout(5)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
        return data.decode("latin-1")

    with as_uid(65534, exchange) as got:
        return got.encode("latin-1")


def read_replies(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    buffer = b""
    replies: list[dict[str, Any]] = []
    while len(replies) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            replies.append(json.loads(line))
    return replies


@contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    try:
        yield daemon.start()
    finally:
        daemon.cleanup()


def scan_for(needle: str, *roots: Path) -> list[str]:
    """Every file under roots (and their names) that contains needle, as bytes."""
    hits = []
    raw = needle.encode()
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if needle in path.name:
                hits.append(str(path))
            if path.is_file():
                try:
                    if raw in path.read_bytes():
                        hits.append(str(path))
                except OSError:
                    pass
    return hits
