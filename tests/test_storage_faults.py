"""sessions.db faults against a real daemon: disk full, read-only, corrupt, locked by another process.

In every case authd keeps authenticating and its sessions stay valid from memory; `status` and
the log say what cannot be persisted; when the fault clears the file catches up with memory;
and a `kill -9` afterwards loses nothing that was issued. The lockout store has its own tests
(tests/lockout/test_storage.py). The disk is a real, small tmpfs mounted over the state dir.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from pathlib import Path

import pytest

from authd.lockout.store import LockoutStore
from authd.sessions import SessionStore
from authd.writethrough import RETRY_INTERVAL

from .clock import ManualClock
from .daemon import Daemon, wait_for
from .filesystems import fill, remount, tmpfs

LOST = "session store write failed; sessions are kept in memory only"
BACK = "session store writable again; sessions persisted"


def login(d: Daemon, user: str = "alice") -> str:
    reply = d.auth(user)
    assert reply["ok"], reply
    return reply["session"]["token"]


def valid(d: Daemon, tokens: list[str]) -> bool:
    return all(d.call("session", token=t).get("ok") for t in tokens)


def store_error(d: Daemon) -> str | None:
    return d.call("status")["session_store_error"]


def read_only(error: str | None) -> bool:
    return error is not None and any(word in error.lower() for word in ("read-only", "readonly"))


def recovered(d: Daemon) -> None:
    wait_for(lambda: store_error(d) is None, 20, what="the session store to recover")
    assert d.log_lines(BACK)


def restart_hard(d: Daemon) -> None:
    """kill -9 and start again: only what reached the file survives."""
    d.stop(signal.SIGKILL)
    d.start()


def test_disk_full(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    with tmpfs(d.state):
        d.start()
        before = [login(d) for _ in range(3)]
        filler = fill(d.state)
        during = [login(d, "bob") for _ in range(40)]  # each commit needs new WAL pages
        error = store_error(d)
        assert error is not None and "full" in error
        assert valid(d, before + during), "sessions issued while the disk is full are valid"
        assert len(d.log_lines(LOST)) == 1, "logged once, not per write"
        assert d.call("logout", token=during[0])["ok"]

        filler.unlink()
        recovered(d)
        restart_hard(d)
        assert valid(d, before + during[1:]), "everything held in memory was written"
        assert d.call("session", token=during[0])["error"] == "invalid_session", "a logout during the fault stays"
        d.stop()


def test_read_only_state_dir_at_start(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    with tmpfs(d.state):
        d.start()
        before = [login(d) for _ in range(3)]
        assert d.stop() == 0
        remount(d.state, "ro")
        d.start()
        assert read_only(store_error(d)), "it says it cannot write"
        assert valid(d, before), "the persisted sessions were read"
        during = [login(d, "bob") for _ in range(3)]
        assert valid(d, during)
        assert d.log_lines(LOST)

        remount(d.state, "rw")
        recovered(d)
        restart_hard(d)
        assert valid(d, before + during)
        d.stop()


def test_state_fs_goes_read_only_while_running(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """ext4 with errors=remount-ro, made to fail under the running daemon (its files open), then
    repaired and mounted again, as an operator would after an I/O error."""
    d = make_daemon()
    with ext4(tmp_path / "state.img", d.state) as fs:
        d.start()
        before = [login(d) for _ in range(3)]
        fs.fail()
        during = [login(d, "bob") for _ in range(3)]
        assert store_error(d) is not None  # SQLite says "disk I/O error", then "read-only" on retries
        assert valid(d, before + during)

        fs.repair()
        recovered(d)
        restart_hard(d)
        assert valid(d, before + during)
        d.stop()


class Ext4:
    """An ext4 image on a loop device, mounted with errors=remount-ro; it can be made to fail."""

    def __init__(self, image: Path, mountpoint: Path) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.devices: list[str] = []

    def mount(self) -> None:
        """Mount the image from a fresh loop device, on top of whatever is mounted there.

        Stacking makes the swap atomic: the daemon's next open finds either the failed file
        system or the repaired one, never the empty directory underneath.
        """
        device = _run("losetup", "-f", "--show", str(self.image))
        self.devices.append(device)
        _run("mount", "-o", "errors=remount-ro", device, str(self.mountpoint))

    def fail(self) -> None:
        """What an I/O error does: ext4 aborts its journal and turns read-only, files still open."""
        Path(f"/sys/fs/ext4/{Path(self.devices[-1]).name}/trigger_fs_error").write_text("authd storage fault test\n")

    def repair(self) -> None:
        """What the operator does next: fsck the image and mount it again."""
        subprocess.run(["e2fsck", "-fy", str(self.image)], capture_output=True)
        self.mount()

    def remove(self) -> None:
        for _ in self.devices:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        for device in self.devices:
            subprocess.run(["losetup", "-d", device], capture_output=True)


def _run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@contextmanager
def ext4(image: Path, mountpoint: Path) -> Iterator[Ext4]:
    if not Path("/dev/loop-control").exists():
        # A container without loop devices (systemd-nspawn's default): say so. Where the device
        # exists (the CI host), a failure to mount is a failure, never a skip.
        pytest.skip("no /dev/loop-control: this machine (a container?) has no loop devices for an ext4 image")
    mountpoint.mkdir(mode=0o700, exist_ok=True)
    fs = Ext4(image, mountpoint)
    try:
        _run("truncate", "-s", "16M", str(image))
        _run("mkfs.ext4", "-q", "-F", str(image))
        fs.mount()
        mountpoint.chmod(0o700)
    except (OSError, subprocess.CalledProcessError) as exc:
        fs.remove()
        if os.geteuid() == 0:
            pytest.fail(f"cannot loop-mount an ext4 image: {exc}")  # root can here: never skip silently
        pytest.skip(f"cannot loop-mount an ext4 image: {exc}")
    try:
        yield fs
    finally:
        fs.remove()


@pytest.mark.parametrize("when", ["at-start", "while-running"])
def test_locked_by_another_process(make_daemon: Callable[..., Daemon], when: str) -> None:
    d = make_daemon().start()
    before = [login(d) for _ in range(3)]
    db = d.state / "sessions.db"
    if when == "at-start":
        assert d.stop() == 0
        with hold_exclusive_lock(db):
            d.start()
            during = [login(d, "bob") for _ in range(3)]
            assert "locked" in (store_error(d) or "")
            assert valid(d, before + during), "the file was still readable at start-up"
    else:
        with hold_exclusive_lock(db):
            during = [login(d, "bob") for _ in range(3)]
            assert "locked" in (store_error(d) or "")
            assert valid(d, before + during)
    recovered(d)
    restart_hard(d)
    assert valid(d, before + during)


@contextmanager
def hold_exclusive_lock(db: Path) -> Iterator[None]:
    """Another process (think `sqlite3` CLI or a backup tool) holding an exclusive write lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys\n"
         f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
         "c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)


def test_corrupt_file_at_start_is_moved_aside(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon().start()
    old = login(d)
    assert d.stop() == 0
    db = d.state / "sessions.db"
    db.write_bytes(b"this is not a database " * 400)
    d.start()
    assert store_error(d) is None
    (aside,) = d.state.glob("sessions.db.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not") and (aside.stat().st_mode & 0o777) == 0o600
    (line,) = d.log_lines("session database corrupt; moved aside")
    assert line["moved_to"] == str(aside)
    assert d.call("session", token=old)["error"] == "invalid_session", "nothing was readable"
    fresh = login(d)
    restart_hard(d)
    assert valid(d, [fresh])


def test_corrupt_index_loses_no_session(make_daemon: Callable[..., Daemon]) -> None:
    """A damaged page in an index: the table itself is still readable, and every session is kept."""
    d = make_daemon().start()
    tokens = [login(d, user) for user in ("alice", "bob") * 100]
    assert d.stop() == 0
    db = d.state / "sessions.db"
    with sqlite3.connect(db) as conn:
        (page,) = conn.execute("SELECT pageno FROM dbstat WHERE name = 'sessions_user' AND pagetype = 'leaf' LIMIT 1").fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    with db.open("r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\xff" * size)
    d.start()
    (line,) = d.log_lines("session database corrupt; moved aside")
    assert line["salvaged"] == len(tokens)
    assert valid(d, tokens)
    restart_hard(d)
    assert valid(d, tokens), "the salvaged sessions were written to the new file"


def test_corrupted_while_running(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon().start()
    before = [login(d) for _ in range(3)]
    db = d.state / "sessions.db"
    for path in d.state.glob("sessions.db*"):
        with path.open("r+b") as f:
            f.write(b"\x00garbage" * 512)
    during = [login(d, "bob") for _ in range(3)]
    assert valid(d, before + during)
    wait_for(lambda: d.log_lines("session database corrupt; moved aside"), 20, what="the corrupt file to be replaced")
    recovered(d)
    restart_hard(d)
    assert valid(d, before + during), "memory was written to a fresh file"
    assert list(d.state.glob("sessions.db.corrupt-*")) and db.exists()


def _behind_memory(path: Path, retry_clock: ManualClock) -> SessionStore:
    """A session store whose file fell behind memory: a session was issued while another
    process held the file's write lock. Its next try is due once `retry_clock` has moved on."""
    store = SessionStore(path, retry_clock=retry_clock)
    store.open()
    with hold_exclusive_lock(path):
        store.create(user="a", groups=(), service="s", rhost=None, ttl=3600, idle_timeout=0)
        store.settle()
    assert "locked" in (store.persist_error or "")
    return store


def _kept_after_restart(path: Path, session_id: str) -> bool:
    store = SessionStore(path)
    store.open()
    try:
        return session_id in {s.id for s in store.all()}
    finally:
        store.close()


def _until_written(file: Any) -> None:
    """Wait for the writer thread to finish what is queued, without running what it posts back
    (`settle` would)."""
    deadline = time.monotonic() + 10
    while (file._settled < file._submitted or file._rewriting) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_session_issued_while_the_recovery_rewrite_runs_reaches_the_file(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """After a fault the file is rewritten whole from a snapshot of memory. A session issued
    after that snapshot was taken, while the rewrite waits in the writer, is written after it:
    not dropped as if the rewrite covered it. (The rewrite is held in the writer thread: the
    one interleaving a real disk gives only by chance.)"""
    path = tmp_path / "sessions.db"
    retry_clock = ManualClock()
    store = _behind_memory(path, retry_clock)
    file, gate, snapshot = store._file, threading.Event(), store._file._rewrite

    def held_rewrite() -> Callable[[sqlite3.Connection], bool]:
        job = snapshot()  # taken now, on this side

        def run(db: sqlite3.Connection) -> bool:
            gate.wait(10)
            return job(db)

        return run

    monkeypatch.setattr(file, "_rewrite", held_rewrite)
    retry_clock.advance(RETRY_INTERVAL)
    store.flush()  # the recovery rewrite, its snapshot taken
    late, _ = store.create(user="b", groups=(), service="s", rhost=None, ttl=3600, idle_timeout=0)
    gate.set()
    store.settle()
    assert store.persist_error is None
    store.close()
    assert _kept_after_restart(path, late.id)


def test_a_change_made_when_a_merge_queues_the_rewrite_is_written_once(tmp_path: Path) -> None:
    """The lockout file could not be opened or read at start (another process held its lock):
    its first rewrite reads what the file holds and hands it back. The next change runs that
    merge, which queues the real rewrite with a snapshot already holding the change: the
    change itself must not be written again."""
    path = tmp_path / "lockout.db"
    memory: list[tuple[str, str, float]] = []
    retry_clock = ManualClock()
    store = LockoutStore(path, snapshot=lambda: (list(memory), []), merge=lambda rows: memory.extend(rows[0]),
                         retry_clock=retry_clock)
    sqlite3.connect(path).close()
    with hold_exclusive_lock(path):
        store.open()  # cannot open, nothing to read: not loaded, behind memory
    assert "locked" in (store.error or "")
    file = store._file
    retry_clock.advance(RETRY_INTERVAL)
    memory.append(("user", "alice", 1.0))
    store.add_failure("user", "alice", 1.0)  # queues the read-and-merge
    _until_written(file)
    memory.append(("user", "alice", 2.0))
    store.add_failure("user", "alice", 2.0)  # runs the merge, which queues the rewrite
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT at FROM failures ORDER BY at").fetchall() == [(1.0,), (2.0,)]


def test_a_session_created_after_a_corrupt_file_is_moved_aside_is_written_once(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    retry_clock = ManualClock()
    store = _behind_memory(path, retry_clock)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    path.write_bytes(b"garbage" * 1000)  # corrupted while closed
    retry_clock.advance(RETRY_INTERVAL)
    store.flush()  # the writer finds it corrupt, moves it aside, hands back what it salvaged
    _until_written(store._file)
    late, _ = store.create(user="b", groups=(), service="s", rhost=None, ttl=3600, idle_timeout=0)
    store.settle()
    assert store.persist_error is None, store.persist_error  # no UNIQUE failure from a second INSERT
    store.close()
    assert _kept_after_restart(path, late.id)
