"""What `authd serve` needs from the machine beyond a valid policy, checked without serving.

`authd check-config` runs these after the same policy load that a start and a reload use, so
that a file it calls valid is one `serve` starts with: the state directory (created 0700 and
refused when others may write it, exactly as at start), the log file's directory, and the
socket's place. A socket that a running authd (or systemd) holds is fine: checking the file
a running daemon is about to reload is the usual case.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .config import located
from .errors import ConfigError
from .policy import Policy
from .runtime import prepare_state_dir


def check(policy: Policy) -> None:
    """Raise ConfigError, located in the policy file, for what would stop `serve`."""
    try:
        prepare_state_dir(policy)
        if policy.daemon.log_file:
            _check_log_file(policy.path(policy.daemon.log_file))
        _check_socket(policy.socket_path)
    except ConfigError as exc:
        raise located(exc, policy.source) from None


def _check_log_file(path: Path) -> None:
    target = path if path.exists() else path.parent
    if path.is_dir():
        raise ConfigError(f"daemon.log_file: cannot open {path}: {os.strerror(errno.EISDIR)}")
    if not target.is_dir() and target == path.parent:
        raise ConfigError(f"daemon.log_file: cannot open {path}: {os.strerror(errno.ENOENT)}")
    if not os.access(target, os.W_OK):
        raise ConfigError(f"daemon.log_file: cannot open {path}: {os.strerror(errno.EACCES)}")


def _check_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        existing = next(p for p in path.parents if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"daemon.socket: cannot create {path}: {os.strerror(errno.EACCES)} ({existing})") from None
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"daemon.socket: {path} exists and is not a socket")
