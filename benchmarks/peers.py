"""The real programs authd replaces, started on the real system's PAM: for bench_peers only.

Cyrus saslauthd and Dovecot's auth service read /etc/pam.d and the real user database; they
cannot be pointed at pam_wrapper's scratch directory the way authd's own benchmarks are. So
for a side-by-side run every daemon (authd too) uses temporary service files in /etc/pam.d and
a temporary local user, created here and removed afterwards. That needs root and changes the
machine while it runs: run it on a throwaway machine or VM, never on a server in use.

Beside them, `BareLoop` starts `benchmarks.bareloop`: no daemon authd replaces, but the floors
under authd (one Python event loop answering lines, or a request per connection, with nothing else).
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .harness import stop
from .pamstack import REPO, yescrypt

PAM_DIR = Path("/etc/pam.d")
PERMIT_LINES = ["auth required pam_permit.so", "account required pam_permit.so"]


@contextmanager
def system_pam_services(services: dict[str, list[str]]) -> Iterator[None]:
    """/etc/pam.d/NAME for each name, refusing to overwrite one that exists; removed on exit."""
    written: list[Path] = []
    try:
        for name, lines in services.items():
            path = PAM_DIR / name
            with path.open("x") as f:  # never replace a real service file
                f.write("".join(f"{line}\n" for line in lines))
            written.append(path)
        yield
    finally:
        for path in written:
            path.unlink(missing_ok=True)


@contextmanager
def local_user(name: str, password: str) -> Iterator[None]:
    """A real local user with a yescrypt hash (Debian 12's default), deleted on exit."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        pass
    else:
        raise RuntimeError(f"user {name} already exists: remove it (userdel {name}) or pick another")
    subprocess.run(
        ["useradd", "--no-create-home", "--no-user-group", "--shell", "/usr/sbin/nologin",
         "--password", yescrypt(password), name],
        check=True,
    )
    try:
        yield
    finally:
        subprocess.run(["userdel", name], check=False)


class Saslauthd:
    """``saslauthd -a pam -n N -m DIR [-c]``: it detaches itself, so it is found by its pidfile."""

    def __init__(self, root: Path, *, processes: int = 5, cache: bool = False) -> None:
        self.dir = root
        self.socket = root / "mux"
        self.args = ["saslauthd", "-a", "pam", "-n", str(processes), "-m", str(root), *(["-c"] if cache else [])]
        self.pid = 0

    def __enter__(self) -> Saslauthd:
        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(self.args, check=True)
        pidfile = self.dir / "saslauthd.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if pidfile.exists() and self.socket.exists() and (text := pidfile.read_text().strip()):
                self.pid = int(text)
                return self
            time.sleep(0.05)
        raise RuntimeError("saslauthd did not start")

    def __exit__(self, *exc: object) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{self.pid}").exists():
                time.sleep(0.05)


DOVECOT_CONF = """\
base_dir = {root}/run
log_path = {root}/dovecot.log
protocols =
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {{
  driver = pam
  args = %s
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
}}
"""


class _Server:
    """A server child process: its pid (for CPU accounting) and its stop."""

    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)


class Dovecot(_Server):
    """An auth-only Dovecot 2.3 (``dovecot -F -c FILE``), ``passdb pam`` with the request's
    service as the PAM service, no auth cache (Dovecot's default)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "dovecot.conf"
        self.socket = root / "run" / "auth-client"

    def __enter__(self) -> Dovecot:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(DOVECOT_CONF.format(root=self.root))
        self.proc = _started(["dovecot", "-F", "-c", str(self.config)], self.socket,
                             f"dovecot (see {self.root}/dovecot.log)")
        return self


class BareLoop(_Server):
    """``benchmarks.bareloop``: a bare Python server, the floor under authd. `kind`: ``hello``
    lines on a persistent connection, or a saslauthd request per connection answered `OK`
    through asyncio's transports (``saslauthd``) or by hand (``saslauthd-raw``); in `processes`
    event-loop processes sharing the socket."""

    def __init__(self, root: Path, kind: str = "hello", processes: int = 1) -> None:
        self.socket = root / f"bareloop-{kind}-{processes}.sock"
        self.kind = kind
        self.processes = processes

    def __enter__(self) -> BareLoop:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.proc = _started([sys.executable, "-m", "benchmarks.bareloop", str(self.socket), self.kind, str(self.processes)],
                             self.socket,
                             f"benchmarks.bareloop {self.kind}", env=env)
        return self


def _started(argv: list[str], socket: Path, what: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server and wait (up to 15 s) for its socket to appear."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if socket.exists():
            return proc
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{what} did not create {socket}")
