"""Persistence: private files, no passwords at rest, and authentication through storage faults."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from authd.lockout import Attempt, Locked, Lockout
from authd.writethrough import RETRY_INTERVAL

from ..clock import ManualClock
from ..filesystems import fill, remount, tmpfs
from .helpers import config, fail_distinct, login, run

CANARY = "canary-Pw-7f3a9c1e-\u00e9t\u00e9"


async def _retry_is_due(lockout: Lockout, retry_clock: ManualClock) -> None:
    """The fault is mended: no retry before its interval, then the next change rewrites the file."""
    await login(lockout, "too-soon", "x")
    assert lockout.storage_error
    retry_clock.now += RETRY_INTERVAL


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@run
async def test_database_and_journal_files_are_private(db_path: Path) -> None:
    lockout = Lockout(config(), db_path)
    await fail_distinct(lockout, "alice", 2, "203.0.113.9")
    files = sorted(db_path.parent.glob("lockout.db*"))
    assert [f.name for f in files] == ["lockout.db", "lockout.db-shm", "lockout.db-wal"]
    assert all(_mode(f) == 0o600 for f in files)
    lockout.close()

    db_path.chmod(0o644)
    Lockout(config(), db_path).close()
    assert _mode(db_path) == 0o600


@run
async def test_passwords_never_reach_disk_reprs_or_logs(db_path: Path) -> None:
    table = {"user": {"max_failures": 3}, "rhost": {"max_failures": 4}}
    seen: list[str] = []
    with capture_logs() as logs:
        lockout = Lockout(config(**table), db_path)
        for user in ("alice", "bob", "carol"):
            for i in range(4):
                password = f"{CANARY}{i}" if i else CANARY
                outcome = await lockout.begin(user, "203.0.113.9", password)
                seen.append(repr(outcome))
                if isinstance(outcome, Attempt):
                    seen.append(repr(lockout.finish(outcome, False)))
        seen.append(repr(lockout.lockouts()))
        lockout.unlock("alice")
        lockout.close()
    seen.append(repr(logs))

    forbidden = [CANARY.encode(), CANARY.encode("utf-16-le")]
    for algorithm in ("md5", "sha1", "sha256", "sha512"):
        digest = hashlib.new(algorithm, CANARY.encode()).digest()
        forbidden += [digest, digest.hex().encode()]
    files = list(db_path.parent.iterdir())
    assert files
    for path in files:
        data = path.read_bytes()
        assert not [token for token in forbidden if token in data], path
    text = "\n".join(seen)
    assert "canary" not in text.lower()


@run
async def test_corrupt_database_is_moved_aside_and_replaced(db_path: Path) -> None:
    db_path.write_bytes(b"this is not a database " * 200)
    lockout = Lockout(config(user={"max_failures": 2}), db_path)
    assert lockout.storage_error is None
    (aside,) = db_path.parent.glob("lockout.db.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not")
    await fail_distinct(lockout, "alice", 2)
    lockout.close()

    again = Lockout(config(user={"max_failures": 2}), db_path)
    assert isinstance(await again.begin("alice", None, "x"), Locked)
    again.close()


@run
async def test_unusable_location_keeps_authenticating_and_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state dir should be")
    db_path = blocker / "lockout.db"

    retry_clock = ManualClock()
    lockout = Lockout(config(user={"max_failures": 2}), db_path, retry_clock=retry_clock)
    assert lockout.storage_error
    await fail_distinct(lockout, "alice", 2)
    assert isinstance(await lockout.begin("alice", None, "x"), Locked)

    blocker.unlink()
    blocker.mkdir(mode=0o700)
    await _retry_is_due(lockout, retry_clock)
    assert await login(lockout, "bob", "x") == ()
    assert lockout.storage_error is None
    lockout.close()

    again = Lockout(config(user={"max_failures": 2}), db_path)
    assert [(r.key, r.failures, r.locked) for r in again.lockouts()] == [("alice", 0, True), ("bob", 1, False), ("too-soon", 1, False)]
    again.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, so the disk can really fill up and be made read-only."""
    with tmpfs(tmp_path / "fs") as mountpoint:
        yield mountpoint


@run
async def test_disk_full_keeps_authenticating_and_loses_nothing(small_fs: Path) -> None:
    db_path = small_fs / "lockout.db"
    table = {"user": {"max_failures": 2}, "rhost": {"max_failures": 0}}
    retry_clock = ManualClock()
    lockout = Lockout(config(**table), db_path, retry_clock=retry_clock)
    await login(lockout, "before", "x")
    filler = fill(small_fs)

    for i in range(20):
        await fail_distinct(lockout, f"user{i}", 2, tag="x" * 500)
    assert lockout.storage_error and "full" in lockout.storage_error
    assert isinstance(await lockout.begin("user7", None, "x"), Locked)

    filler.unlink()
    await _retry_is_due(lockout, retry_clock)
    await login(lockout, "after", "x")
    assert lockout.storage_error is None
    lockout.close()

    again = Lockout(config(**table), db_path)
    rows = {r.key: (r.failures, r.locked) for r in again.lockouts()}
    assert rows == {"before": (1, False), "after": (1, False), "too-soon": (1, False)} | {f"user{i}": (0, True) for i in range(20)}
    again.close()


@run
async def test_read_only_state_dir_still_enforces_locks_and_recovers(small_fs: Path) -> None:
    db_path = small_fs / "lockout.db"
    table = {"user": {"max_failures": 3}, "rhost": {"max_failures": 0}}
    first = Lockout(config(**table), db_path)
    await fail_distinct(first, "alice", 3)
    await login(first, "bob", "x")
    first.close()

    remount(small_fs, "ro")
    retry_clock = ManualClock()
    lockout = Lockout(config(**table), db_path, retry_clock=retry_clock)
    assert lockout.storage_error
    assert isinstance(await lockout.begin("alice", None, "y"), Locked)
    await login(lockout, "carol", "x")

    remount(small_fs, "rw")
    await _retry_is_due(lockout, retry_clock)
    await login(lockout, "bob", "y")
    assert lockout.storage_error is None
    lockout.close()

    again = Lockout(config(**table), db_path)
    assert [(r.key, r.failures, r.locked) for r in again.lockouts()] == [
        ("alice", 0, True), ("bob", 2, False), ("carol", 1, False), ("too-soon", 1, False),
    ]
    again.close()
