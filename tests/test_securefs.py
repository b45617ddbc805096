"""securefs on a real file system: which directories are trusted, what is never opened for writing.

Run as root (like the rest of the suite), so a directory or file can belong to another user:
`nobody` plays the local attacker.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from authd import securefs
from authd.securefs import UnsafePath

NOBODY = 65534


def owned_by_nobody(path: Path) -> Path:
    os.chown(path, NOBODY, NOBODY)
    return path


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A root-owned file that must come through every test untouched."""
    path = tmp_path / "victim"
    path.write_text("precious\n")
    yield path
    assert path.read_text() == "precious\n"


def test_directory_of_another_user_is_refused_with_owner_and_fix(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    owned_by_nobody(theirs)
    with pytest.raises(UnsafePath) as info:
        securefs.check_dir(theirs, "daemon.state_dir")
    assert str(info.value) == (f"daemon.state_dir: {theirs} is owned by nobody (uid 65534), not by root or the"
                               f" daemon's user root; chown root {theirs}, or use a directory of its own")


def test_directory_below_one_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    (theirs / "state").mkdir(parents=True, mode=0o700)
    owned_by_nobody(theirs)
    with pytest.raises(UnsafePath, match=f"{theirs}, on the way to {theirs / 'state'}, is owned by nobody"):
        securefs.check_dir(theirs / "state", "daemon.state_dir")


def test_symlink_in_a_directory_of_another_user_is_refused_even_to_a_good_directory(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "link").symlink_to(good)
    owned_by_nobody(theirs)
    securefs.check_dir(good, "x")
    with pytest.raises(UnsafePath, match=f"{theirs}, on the way to {theirs / 'link'}, is owned by nobody"):
        securefs.check_dir(theirs / "link", "x")


def test_writable_directories(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o770)
    with pytest.raises(UnsafePath, match=r"is writable by group or others \(mode 770\); chmod go-w"):
        securefs.check_dir(shared, "daemon.socket")
    securefs.check_dir(shared, "log", private=False)  # a log's directory may be group-writable (/var/log)
    shared.chmod(0o777)
    with pytest.raises(UnsafePath, match=r"writable by others without the sticky bit \(mode 777\)"):
        securefs.check_dir(shared, "log", private=False)
    (shared / "below").mkdir(mode=0o700)
    with pytest.raises(UnsafePath, match=f"{shared}, on the way to .* without the sticky bit"):
        securefs.check_dir(shared / "below", "x")
    shared.chmod(0o1777)  # like /tmp: nobody can rename or delete what is not theirs
    securefs.check_dir(shared / "below", "x")


def test_make_dir_creates_every_missing_directory_with_exactly_its_mode(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        securefs.make_dir(tmp_path / "a" / "b" / "c", "x")
        securefs.make_dir(tmp_path / "run" / "authd", "x", 0o755)
    finally:
        os.umask(old)
    old = os.umask(0o077)
    try:
        securefs.make_dir(tmp_path / "sock", "x", 0o755)
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o7777 for p in tmp_path.rglob("*")}
    assert modes == {"a": 0o700, "a/b": 0o700, "a/b/c": 0o700, "run": 0o755, "run/authd": 0o755, "sock": 0o755}


def test_make_dir_refuses_to_create_inside_a_directory_of_another_user(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    owned_by_nobody(theirs)
    with pytest.raises(UnsafePath, match="is owned by nobody"):
        securefs.make_dir(theirs / "state", "daemon.state_dir")
    assert not (theirs / "state").exists()


def test_open_file_never_writes_through_a_symlink(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "authd.log"
    link.symlink_to(victim)
    with pytest.raises(UnsafePath, match=f"log: {link} is a symbolic link; authd never writes through one"):
        securefs.open_file(link, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600, "log")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(UnsafePath, match="symbolic link"):
        securefs.open_file(dangling, os.O_WRONLY | os.O_CREAT, 0o600)
    assert not (tmp_path / "would-be-created").exists()


def test_open_file_refuses_another_users_file_a_hard_link_and_a_fifo(tmp_path: Path, victim: Path) -> None:
    theirs = tmp_path / "theirs.log"
    theirs.write_text("")
    owned_by_nobody(theirs)
    with pytest.raises(UnsafePath, match=f"{theirs} is owned by nobody .*authd creates its own files: remove it"):
        securefs.open_file(theirs, os.O_WRONLY | os.O_APPEND)
    linked = tmp_path / "linked.log"
    os.link(victim, linked)
    with pytest.raises(UnsafePath, match=f"{linked} has 2 hard links"):
        securefs.open_file(linked, os.O_WRONLY | os.O_APPEND)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = threading.Event()

    def open_fifo() -> None:
        with pytest.raises((UnsafePath, OSError)):
            securefs.open_file(fifo, os.O_WRONLY | os.O_APPEND)
        done.set()

    threading.Thread(target=open_fifo, daemon=True).start()
    assert done.wait(10), "opening a FIFO with no reader must not block"


def test_open_file_creates_a_private_blocking_descriptor(tmp_path: Path) -> None:
    fd = securefs.open_file(tmp_path / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert os.get_blocking(fd) and not os.get_inheritable(fd)
        assert os.fstat(fd).st_mode & 0o777 == 0o600
        assert securefs.same_file(fd, tmp_path / "new")
        os.rename(tmp_path / "new", tmp_path / "moved")
        (tmp_path / "new").symlink_to(tmp_path / "moved")
        assert not securefs.same_file(fd, tmp_path / "new"), "a symlink to the file is not the file"
    finally:
        os.close(fd)


def test_check_existing(tmp_path: Path, victim: Path) -> None:
    securefs.check_existing(tmp_path / "missing")
    securefs.check_existing(tmp_path / "missing" / "below")
    securefs.check_existing(victim)
    (tmp_path / "sessions.db-wal").symlink_to(victim)
    with pytest.raises(UnsafePath, match="sessions.db-wal is a symbolic link"):
        securefs.check_existing(tmp_path / "sessions.db-wal")


def test_resolve_keeps_the_last_name_and_resolves_the_directory(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "dir").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "audit.log").symlink_to(victim)
    assert securefs.resolve(tmp_path, "dir/audit.log") == tmp_path / "real" / "audit.log"
    assert securefs.resolve(tmp_path, "dir/sub/../audit.log") == tmp_path / "real" / "audit.log"
    assert securefs.resolve(tmp_path, "/abs/x") == Path("/abs/x")
