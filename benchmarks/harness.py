"""What every benchmark needs around the daemon: a policy, the process, CPU and latency figures.

The benchmarks measure different things but must agree on how: the same daemon start-up
(timed phases never include it), the same CPU accounting (so "others" means the same on every
line), the same latency summaries. Each benchmark keeps its own load and its own report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

from authd.client import Client, ClientError

NOISY = 0.15  # cores used by other processes during a phase above which figures are suspect


def policy(
    *, socket: Path | str, pam_service: str, workers: int, service: str = "bench", state_dir: str = "state",
    log_level: str = "info", failure_delay: float = 0.0, daemon: str = "", service_extra: str = "",
    exempt_users: Sequence[str] = (), socket_mode: int = 0o600,
) -> str:
    """An authd policy with one service that every local user may call and root administers.

    ``daemon`` is TOML added to ``[daemon]`` (sub-tables such as ``[daemon.limits]`` too),
    ``service_extra`` to the service; ``exempt_users`` are kept out of lockout, so that every
    wrong password really reaches PAM. ``socket_mode`` 0o666 lets other local uids connect.
    """
    text = f"""\
[daemon]
socket = "{socket}"
socket_mode = 0o{socket_mode:o}
state_dir = "{state_dir}"
workers = {workers}
log_level = "{log_level}"
{daemon}
[clients]
users = ["*"]
admin_users = ["root"]

[[service]]
name = "{service}"
pam_service = "{pam_service}"
failure_delay = {failure_delay}
{service_extra}
"""
    if exempt_users:
        text += "\n[lockout]\nexempt_users = [" + ", ".join(f'"{user}"' for user in exempt_users) + "]\n"
    return text


class AuthdProcess:
    """``python -m authd serve -c root/authd.toml`` as a subprocess; a context manager.

    Entering returns once a fresh connection gets ``hello`` answered, so no phase times the
    start-up; leaving sends SIGTERM and kills only if the drain overruns ``grace``. Subclasses
    write ``self.config`` before entering.
    """

    def __init__(self, root: Path, env: Mapping[str, str], *, grace: float = 30.0) -> None:
        self.root = root
        self.socket = root / "authd.sock"
        self.config = root / "authd.toml"
        self.log = root / "authd.log"
        self.env = dict(env)
        self.grace = grace
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "authd", "serve", "-c", str(self.config)], env=self.env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"authd exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with Client(self.socket, timeout=2) as client:
                    client.hello()
                return self
            except (ClientError, OSError):
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"authd did not serve within {self.grace:.0f} s:\n{self.tail()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User+system CPU of the daemon process itself (all threads, not its PAM workers)."""
        return process_cpu(self.pid)

    def rss(self) -> int:
        """Resident bytes of the daemon process (0 once it is gone)."""
        return memory_kib(self.pid).get("VmRSS", 0) * 1024

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def stop(proc: subprocess.Popen[Any] | None, grace: float = 15.0) -> None:
    """SIGTERM a child server, then SIGKILL it if it has not exited within `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def process_cpu(pid: int) -> float:
    """User+system CPU seconds of one process (all its threads, none of its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Window:
    """Requests completed inside one timed window: their latencies, and the errors beside them."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cores: tuple[float, float] = (0.0, 0.0)  # CpuMeter.cores() over the window

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def per_request(self, cpu: float) -> str:
        """CPU seconds spent over the window, per completed request, in microseconds."""
        return f"{cpu / max(1, len(self.latencies)) * 1e6:.0f} us"


def memory_kib(pid: int) -> dict[str, int]:
    """The ``Vm*`` figures of /proc/PID/status (VmRSS, VmHWM, ...), in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm"):
            out[key] = int(value.split()[0])
    return out


class CpuMeter:
    """Core-seconds the whole box was busy, and how many of them went to our process tree.

    Ours is this process plus every live descendant (daemon, PAM workers, load children),
    with reaped children counted through their parent's cutime/cstime. On a shared machine
    the others' share says whether a figure can be trusted. ``roots`` are more trees counted as
    ours: daemons we started that fork away from us (saslauthd detaches itself).
    """

    def __init__(self, roots: Sequence[int] = ()) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.roots = tuple(roots)
        self.started = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        busy = sum(cpu[:3]) + sum(cpu[5:8])  # user nice system, irq softirq steal
        ours = _tree_ticks({os.getpid(), *self.roots})
        return time.monotonic(), busy / self.tick, ours / self.tick

    def restart(self) -> None:
        self.started = self._snapshot()

    def cores(self) -> tuple[float, float]:
        """(our cores, other processes' cores) averaged since the start."""
        now = self._snapshot()
        wall = max(1e-9, now[0] - self.started[0])
        ours = (now[2] - self.started[2]) / wall
        busy = (now[1] - self.started[1]) / wall
        return ours, max(0.0, busy - ours)


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU of ``root`` and its live descendants, with their reaped children's."""
    return _tree_ticks({root}) / os.sysconf("SC_CLK_TCK")


def _tree_ticks(roots: set[int]) -> int:
    """Clock ticks (utime stime cutime cstime) of ``roots`` and all their live descendants."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = sum(int(x) for x in fields[11:15])
    total = 0
    for pid, spent in times.items():
        ancestor = pid
        while ancestor not in roots and ancestor in parents and ancestor not in (0, 1):
            ancestor = parents[ancestor]
        if ancestor in roots:
            total += spent
    return total


def cpu_note(cores: tuple[float, float]) -> str:
    return f"cpu: ours {cores[0]:.2f} cores, others {cores[1]:.2f}"


def percentile(values: Sequence[float], q: float, *, rank: Callable[[float], int] = round) -> float:
    """The sorted values' element at rank ``rank(q / 100 * n)`` (clamped to 1..n); NaN for none.

    ``math.ceil`` is the textbook nearest rank (bench_lifecycle uses it); the other benchmarks
    have always rounded, and keep doing so to stay comparable with their earlier figures.
    """
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, rank(q / 100 * len(ordered)) - 1))]


def overhead_parser(module: str, doc: str, seconds: float) -> argparse.ArgumentParser:
    """The options of a benchmark that measures authd's own overhead: pam_matrix by default."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=seconds, help=f"per phase (default {seconds:g})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--stack", choices=["matrix", "unix"], default="matrix",
                        help="matrix: pam_matrix, daemon overhead only (default); unix: pam_unix + yescrypt")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def report_errors(errors: Mapping[str, int]) -> None:
    """One ``!!`` line per kind of error, so a figure that hides failures cannot pass unseen."""
    for what, count in sorted(errors.items()):
        print(f"  !! {count} x {what}")


@contextmanager
def scratch_dir(prefix: str, *, keep: bool = False) -> Iterator[Path]:
    """A fresh directory under /tmp (AF_UNIX socket paths must stay short), removed afterwards
    unless ``keep``."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield root
    finally:
        if keep:
            print(f"scratch directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


class SlowReceiver(BaseHTTPRequestHandler):
    """Takes a second per request, like an overloaded SIEM endpoint; counts what it answered."""

    protocol_version = "HTTP/1.1"
    seen = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(1.0)
        type(self).seen += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def slow_http_server() -> Iterator[str]:
    """A ``SlowReceiver`` on 127.0.0.1 in a thread; yields the webhook URL to post to."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowReceiver)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()
