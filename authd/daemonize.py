"""`authd serve --daemon` for hosts without systemd.

The launching process forks a child that becomes the daemon through python-daemon's
DaemonContext, then waits on a pipe until the daemon says it serves (exit 0) or why it could
not (exit 1, the reason on stderr): an init script gets a truthful exit status, as it would
from systemd's Type=notify.

A pidfile locked with flock(2) guards against a second instance. The lock, not the pid written
in the file, says whether a daemon runs, so a pidfile left by a killed daemon is simply taken
over. flock locks belong to the open file description: the lock the launcher takes before it
forks is the one the daemon holds for life, with no window for a rival to slip in between.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

import daemon
import structlog

from authd import securefs
from authd.errors import AuthdError

Ready = Callable[[str | None], None]
"""Called by the daemon once: `ready(None)` when it serves, `ready("why")` when it cannot."""

log = structlog.get_logger("authd.daemonize")


class StartupError(AuthdError):
    """The daemon could not be started; the message is what the launcher prints."""


class PidFile:
    """A pidfile whose flock is held for the daemon's whole life and that is removed at exit.

    `acquire()` runs in the launcher; DaemonContext enters the object in the daemon, which
    writes its own pid, and exits it at shutdown, which removes the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stale_pid: int | None = None
        self._fd: int | None = None

    def acquire(self) -> None:
        """Lock the pidfile or raise StartupError naming the running daemon."""
        while True:
            try:  # never through a symlink: a root daemon would write whatever it points to, then delete it
                securefs.check_dir(self.path.parent, "pidfile", private=False)
                fd = securefs.open_file(self.path, os.O_RDWR | os.O_CREAT, 0o644, "pidfile")
            except securefs.UnsafePath as exc:
                raise StartupError(str(exc)) from None
            except OSError as exc:
                raise StartupError(f"cannot open pidfile {self.path}: {exc.strerror}") from None
            try:
                self._lock(fd)
            except StartupError:
                os.close(fd)
                raise
            if securefs.same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file between our open and our lock
        self._fd = fd
        self.stale_pid = _read_pid(fd)

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(f"already running (pid {_read_pid(fd) or 'unknown'}, pidfile {self.path})") from None
        except OSError as exc:
            raise StartupError(f"cannot lock pidfile {self.path}: {exc.strerror}") from None

    def fileno(self) -> int:
        assert self._fd is not None, "pidfile not acquired"
        return self._fd

    def close(self) -> None:
        """Drop this process's reference; the lock lives on in any process that shares it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        """Remove the pidfile (while still holding the lock, so nobody else's is removed).

        Only if the name still is the very file we locked (device and inode, not following a
        symlink): whatever someone put there since is not ours to delete.
        """
        if self._fd is not None and securefs.same_file(self._fd, self.path):
            self.path.unlink(missing_ok=True)
        self.close()

    def __enter__(self) -> PidFile:
        fd = self.fileno()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def run_daemon(
    serve: Callable[[Ready], int],
    *,
    pidfile: Path,
    log_file: Path | None,
    working_directory: Path,
    start_timeout: float = 60.0,
) -> int:
    """Start `serve` as a detached daemon; return the launcher's exit status.

    `serve` runs in the daemon with stdout and stderr appended to `log_file` (or /dev/null),
    umask 0o077, cwd `working_directory`, no inherited descriptors and the signal dispositions
    it was started with (so asyncio's handlers are the only ones). It must call `ready` once
    and return the daemon's exit status. The daemon process never returns from this
    function: it raises SystemExit with that status after removing the pidfile.
    """
    pidfile, working_directory = pidfile.absolute(), working_directory.absolute()
    log_file = log_file.absolute() if log_file is not None else None
    lock = PidFile(pidfile)
    try:
        lock.acquire()
        log_stream = _open_log(log_file)
    except StartupError as exc:
        lock.close()
        print(f"authd: {exc}", file=sys.stderr)
        return 1
    report_r, report_w = os.pipe()
    context = daemon.DaemonContext(
        working_directory=str(working_directory),
        umask=0o077,
        detach_process=True,
        signal_map={},
        pidfile=lock,
        files_preserve=[report_w, lock.fileno()],
        stdout=log_stream,
        stderr=log_stream,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        os.close(report_r)
        _become_daemon(serve, context, lock, _Reporter(report_w))
    os.close(report_w)
    lock.close()
    if log_stream is not None:
        log_stream.close()
    try:
        _wait_until_serving(report_r, start_timeout, log_file)
    except StartupError as exc:
        print(f"authd: {exc}", file=sys.stderr)
        return 1
    finally:
        os.close(report_r)
        os.waitpid(child, 0)
    return 0


class _Reporter:
    """The daemon's end of the start-up pipe: JSON lines, `{"pid"}` then `{"ready"}` or `{"error"}`."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def done(self) -> bool:
        return self._fd is None

    def send_pid(self) -> None:
        self._send({"pid": os.getpid()})

    def ready(self, error: str | None) -> None:
        if self._fd is None:
            return
        self._send({"ready": True} if error is None else {"error": error})
        os.close(self._fd)
        self._fd = None

    def _send(self, message: dict[str, Any]) -> None:
        assert self._fd is not None
        try:
            os.write(self._fd, json.dumps(message).encode() + b"\n")
        except OSError:
            pass  # the launcher gave up waiting; the daemon's log tells the rest


def _become_daemon(
    serve: Callable[[Ready], int], context: daemon.DaemonContext, lock: PidFile, reporter: _Reporter
) -> NoReturn:
    try:
        context.open()  # forks twice; only the daemon returns
    except BaseException as exc:
        reporter.ready(f"cannot become a daemon: {exc}")
        lock.release()
        os._exit(1)
    if context.stdout is not None:
        context.stdout.close()  # now duplicated onto fds 1 and 2; a stray copy would pin a rotated log
    reporter.send_pid()
    if lock.stale_pid is not None:
        state = "still running without the lock" if _alive(lock.stale_pid) else "not running"
        log.warning("stale pidfile taken over", pidfile=str(lock.path), stale_pid=lock.stale_pid, state=state)
    try:
        status = serve(reporter.ready)
    except Exception as exc:
        log.exception("start-up failed" if not reporter.done else "daemon failed")
        reporter.ready(str(exc) if isinstance(exc, AuthdError) else f"{type(exc).__name__}: {exc}")
        status = 1
    if not reporter.done:
        reporter.ready(f"exited with status {status} before it was ready")
    context.close()
    raise SystemExit(status)


def _wait_until_serving(fd: int, timeout: float, log_file: Path | None) -> None:
    """Read the daemon's reports until it is ready; raise StartupError with the reason if not."""
    deadline = time.monotonic() + timeout
    buffer = b""
    pid: int | None = None
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            message = json.loads(line)
            if message.get("ready"):
                return
            if "error" in message:
                raise StartupError(message["error"])
            pid = message.get("pid", pid)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if pid is None:
                raise StartupError(f"not ready after {timeout:g}s")
            _terminate(pid)
            raise StartupError(f"not ready after {timeout:g}s; stopped it (pid {pid})")
        if not select.select([fd], [], [], remaining)[0]:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            where = f"; see {log_file}" if log_file is not None else ""
            raise StartupError(f"exited during start-up{where}")
        buffer += chunk


def _open_log(log_file: Path | None) -> TextIO | None:
    if log_file is None:
        return None
    try:
        fd = securefs.open_append(log_file, 0o600, "daemon.log_file")
    except securefs.UnsafePath as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot open log file {log_file}: {exc.strerror}") from None
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
