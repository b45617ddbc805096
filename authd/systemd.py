"""The slice of systemd's service protocol authd speaks: sd_notify, the watchdog and LISTEN_FDS.

Stdlib only, after sd_notify(3) and sd_listen_fds(3). Everything here is a no-op (or empty)
when not running under systemd, so callers never need to ask first.
"""

from __future__ import annotations

import os
import socket
import time

_LISTEN_FDS_START = 3
_notify_socket: socket.socket | None = None


def notify(*lines: str) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=serving") to $NOTIFY_SOCKET in one datagram.

    Returns False when there is no notify socket or the datagram could not be sent. Never
    raises and never blocks: it is called from the event loop, and a full notify queue must
    not stall serving (a lost WATCHDOG=1 is resent at the next tick).
    """
    global _notify_socket
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")) or not lines:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        if _notify_socket is None:
            _notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            _notify_socket.setblocking(False)
        _notify_socket.sendto("\n".join(lines).encode(), address)
    except (OSError, UnicodeError):
        return False
    return True


def notify_reloading(*lines: str) -> bool:
    """Tell systemd a reload started; the timestamp lets it match the READY=1 that ends it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *lines)


def stderr_is_journal() -> bool:
    """True when fd 2 is journald's stream: $JOURNAL_STREAM names its device:inode (systemd.exec(5))."""
    try:
        device, inode = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None if no watchdog is armed."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


def listen_fds() -> dict[str, list[socket.socket]]:
    """Sockets passed by systemd socket activation, grouped by FileDescriptorName=.

    Unnamed descriptors are called "unknown", as in sd_listen_fds_with_names(3). The LISTEN_*
    variables are removed so that no child process (a PAM worker) believes they are its own.
    """
    pid, count, names_env = (os.environ.pop(f"LISTEN_{var}", None) for var in ("PID", "FDS", "FDNAMES"))
    try:
        if pid is None or int(pid) != os.getpid() or count is None:
            return {}
        fd_count = int(count)
    except ValueError:
        return {}
    names = names_env.split(":") if names_env else []
    sockets: dict[str, list[socket.socket]] = {}
    for index in range(max(fd_count, 0)):
        fd = _LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else "unknown"
        os.set_inheritable(fd, False)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise OSError(exc.errno, f"LISTEN_FDS descriptor {fd} ({name}) is not a socket") from None
        sockets.setdefault(name, []).append(sock)
    return sockets
