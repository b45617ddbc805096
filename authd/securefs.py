"""Where a root daemon may write: directories only it (or root) controls, files never through a link.

A root daemon that trusts a directory another user owns reads that user's planted
`sessions.db` (their token becomes a root session) and binds a socket they can swap for their
own (clients' passwords go to them). One that follows a planted symlink writes its pid or a log
line carrying a client's user name into whatever file the link names, and deletes it at exit.

So every directory authd keeps files in, and every directory above it, must be owned by root
or by the daemon's own user and not writable by anyone else (a sticky directory such as /tmp
is fine above it: there nobody can rename or delete what is not theirs), and every file authd
creates or opens for writing is opened here: with O_NOFOLLOW, refused unless it is a regular
file with one link, owned by root or by the daemon's user.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat
from pathlib import Path

from .errors import ConfigError


class UnsafePath(ConfigError):
    """A directory or file authd must not trust; the message names it, its owner, and the fix."""


def resolve(base_dir: Path, value: str) -> Path:
    """A path from authd.toml: relative ones against the file's own directory.

    The directory is resolved, the last name is kept as written: a symlink there is what
    authd refuses to write through, not something to follow here.
    """
    path = Path(os.path.abspath(base_dir / os.path.expanduser(value)))
    return path.parent.resolve() / path.name


def make_dir(path: Path, what: str, mode: int = 0o700, *, private: bool = True) -> None:
    """Create `path` and any missing parents with exactly `mode`, then `check_dir` it.

    The deepest directory that exists is checked first, so nothing is created where someone
    else could swap it afterwards.
    """
    missing: list[Path] = []
    existing = Path(os.path.abspath(path))
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = existing.parent
    if missing:
        check_dir(existing, what, private=False)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue
        os.chmod(directory, mode)  # whatever the umask
    check_dir(path, what, private=private)


def check_dir(path: Path, what: str, *, private: bool = True) -> None:
    """Refuse `path` unless it and every directory above it are trusted (see the module doc).

    UnsafePath if one is not; OSError if `path` is not (or does not lead to) a directory.

    "Above it" is every directory the kernel looks a name up in to reach it, following
    symlinks as it does: whoever may write one of them may swap what comes next.
    `private`: `path` itself must not be writable by group or others even with the sticky bit
    (the state and socket directories); otherwise it is held to the rule for those above it.
    """
    *above, real = _lookups(path)
    st = os.stat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    _check_owner(st, f"{what}: {path}", f"chown {_name(os.geteuid())} {path}, or use a directory of its own")
    if private and st.st_mode & 0o022:
        raise UnsafePath(f"{what}: {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o});"
                         f" chmod go-w {path}")
    _check_shared(st, f"{what}: {path}")
    for directory in above:
        st = os.stat(directory)
        whose = f"{what}: {directory}, on the way to {path},"
        _check_owner(st, whose, f"its owner could replace {path}; use a directory that root owns all the way up")
        _check_shared(st, whose)


def _lookups(path: Path) -> list[Path]:
    """The directories whose entries resolving `path` reads, in order, then what it resolves to."""
    todo = list(Path(os.getcwd(), path).parts[1:])
    current = Path("/")
    seen: list[Path] = []
    links = 0
    while todo:
        name = todo.pop(0)
        if name in (".", ""):
            continue
        if name == "..":
            current = current.parent
            continue
        seen.append(current)
        step = current / name
        if not stat.S_ISLNK(os.lstat(step).st_mode):
            current = step
            continue
        links += 1
        if links > 40:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        target = Path(os.readlink(step))
        todo[:0] = target.parts[1:] if target.is_absolute() else target.parts
        if target.is_absolute():
            current = Path("/")
    return [*dict.fromkeys(seen), current]


def open_file(path: Path, flags: int, mode: int = 0o600, what: str = "") -> int:
    """`os.open` for writing, never through a symlink; refuse what authd should not write to.

    `flags` get O_NOFOLLOW and O_CLOEXEC added; do not pass O_TRUNC (it would act before the
    checks). Returns the descriptor of a regular file with one link, owned by root or by us.
    """
    label = f"{what}: {path}" if what else str(path)
    try:  # O_NONBLOCK: a planted FIFO must not hang the daemon on open
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError:
        if os.path.islink(path):
            raise _link(label) from None
        raise
    try:
        _check_file(os.fstat(fd), label)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_append(path: Path, mode: int = 0o600, what: str = "") -> int:
    """A log file: its directory checked (`check_dir`, not private), then opened for appending."""
    check_dir(path.parent, what or str(path), private=False)
    return open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode, what)


def check_existing(path: Path, what: str = "") -> None:
    """For a file that another program opens by name (SQLite): refuse it if it exists and is unsafe."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    label = f"{what}: {path}" if what else str(path)
    if stat.S_ISLNK(st.st_mode):
        raise _link(label)
    _check_file(st, label)


def same_file(fd: int, path: Path) -> bool:
    """Whether `path` (not following a symlink) is still the file open as `fd`."""
    try:
        held, current = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def _check_file(st: os.stat_result, label: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{label} is not a regular file; authd writes only regular files: remove it")
    _check_owner(st, label, "authd creates its own files: remove it")
    if st.st_nlink != 1:
        raise UnsafePath(f"{label} has {st.st_nlink} hard links; authd writes only files with one name: remove it")


def _check_owner(st: os.stat_result, label: str, fix: str) -> None:
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafePath(f"{label} is owned by {_name(st.st_uid)} (uid {st.st_uid}), not by root or the daemon's"
                         f" user {_name(os.geteuid())}; {fix}")


def _check_shared(st: os.stat_result, label: str) -> None:
    if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
        raise UnsafePath(f"{label} is writable by others without the sticky bit"
                         f" (mode {stat.S_IMODE(st.st_mode):o}); chmod o-w it")


def _link(label: str) -> UnsafePath:
    return UnsafePath(f"{label} is a symbolic link; authd never writes through one: remove it")


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
