"""What `authd serve` needs from the machine beyond a valid policy, checked without serving.

`authd check-config` runs these after the same policy load that a start and a reload use, so
that a file it calls valid is one `serve` starts with: the state directory (created and
checked exactly as at start), the log file (its directory trusted, the file itself neither a
link nor someone else's, and writable), and every socket's directory (trusted) and path (free
or a socket). A socket that a running authd (or systemd) holds is fine: checking the file a
running daemon is about to reload is the usual case. The checks are `securefs`'s, the ones
`serve` makes, without creating a log file or a socket directory.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from . import securefs
from .config import located
from .errors import ConfigError
from .policy import Policy
from .runtime import prepare_state_dir


def check(policy: Policy) -> None:
    """Raise ConfigError, located in the policy file, for what would stop `serve`."""
    sockets = {"daemon.socket": policy.socket_path}
    sockets.update({f"{name}.socket": path for name in ("saslauthd", "dovecot")
                    if (path := policy.front_socket(name)) is not None})
    try:
        prepare_state_dir(policy)
        if policy.daemon.log_file:
            _check_log_file(policy.path(policy.daemon.log_file))
        for key, path in sockets.items():
            _check_socket(path, key)
    except ConfigError as exc:
        raise located(exc, policy.source) from None


def _check_log_file(path: Path) -> None:
    key = "daemon.log_file"
    try:
        securefs.check_dir(path.parent, key, private=False)
        securefs.check_existing(path, key)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot open {path}: {exc.strerror}") from None
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise ConfigError(f"{key}: cannot open {path}: {os.strerror(errno.EACCES)}")


def _check_socket(path: Path, key: str) -> None:
    existing = next(p for p in (path.parent, *path.parent.parents) if os.path.lexists(p))
    try:
        securefs.check_dir(existing, key, private=existing == path.parent)  # as make_dir does at start
    except OSError as exc:
        raise ConfigError(f"{key}: cannot use {path.parent}: {exc.strerror}") from None
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{key}: {path} exists and is not a socket")
