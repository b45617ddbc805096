"""Process hardening shared by the daemon and its PAM workers."""

from __future__ import annotations

import ctypes
import resource
import sys

_PR_SET_DUMPABLE = 4


def no_core_dumps() -> None:
    """A crash must not write a password (held briefly in memory) into a core file.

    Not dumpable also keeps other processes of the same uid from ptrace-reading our memory.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
