"""Keep the PAM modules a worker has used loaded between its transactions.

``pam_start`` dlopen()s every module named in the service's file and in ``/etc/pam.d/other``
(on Debian that pulls in common-auth/account/password/session: pam_unix, pam_deny, pam_cap,
pam_systemd, and what they link: libcrypt, libselinux, libcap, ...), and ``pam_end``
dlclose()s them all again. Loading and relocating those ~10 libraries is most of a cheap
transaction: ~0.7 ms of CPU on the development VM, against ~0.1 ms for pam_permit itself.

So on its first transaction for a service, right after ``pam_start`` has loaded the modules,
a worker takes one more reference to each shared object that appeared in its address space
(``dlopen`` with ``RTLD_NOLOAD``: nothing new is loaded, only counted). Later ``pam_end`` calls
then leave them mapped and later ``pam_start`` calls find them loaded. What that changes:

- The service files are still read on every ``pam_start``: edits to ``/etc/pam.d`` apply at once.
- A module's static variables, and whatever it set up when loaded (a configuration file read
  once, an open descriptor), now last from one login to the next, across users, as in any
  program that keeps a PAM module loaded; modules that keep per-login state in the handle
  (``pam_set_data``), as they should, see no difference. ``pam_keep_modules = false`` restores
  a fresh load per call.
- New module code: a package upgrade replaces the files. After each call the worker looks, at
  most once per ``RECHECK`` seconds, whether a held file still is the one it mapped; if one is
  not, it gives up every reference, so the next ``pam_start`` loads what is on disk now.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from pathlib import Path

import _ctypes

MAPS = Path("/proc/self/maps")
RECHECK = 1.0  # seconds between checks that the held files are still the ones on disk

Identity = tuple[int, int]  # st_dev, st_ino of a held file when it was pinned


class ModulePins:
    """References to the shared objects PAM loaded, taken once per service and given up all
    at once when one of their files is replaced."""

    def __init__(self, maps: Path = MAPS, clock: Callable[[], float] = time.monotonic) -> None:
        self._maps = maps
        self._clock = clock
        self._baseline = shared_objects(maps)  # the worker's own libraries: Python, libpam, ...
        self._held: dict[str, tuple[ctypes.CDLL, Identity]] = {}
        self._services: set[str] = set()
        self._checked = clock()

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def hold(self, service: str) -> None:
        """Call with a transaction for ``service`` open (after pam_start): pin what it loaded.
        Never raises: this only saves time, and must not cost a login."""
        if service in self._services:
            return
        try:
            for path in sorted(shared_objects(self._maps) - self._baseline - self._held.keys()):
                identity = _on_disk(path)  # a file replaced since pam_start mapped it is caught
                try:  # at the next refresh, at worst at the worker's retirement
                    library = ctypes.CDLL(path, mode=os.RTLD_LAZY | os.RTLD_NOLOAD)
                except OSError:  # mapped but not dlopen()ed (a module's data file): nothing to hold
                    continue
                self._held[path] = library, identity
        except Exception:  # noqa: BLE001 - an unreadable maps file: this service goes unpinned
            return
        self._services.add(service)

    def refresh(self) -> bool:
        """Between calls: give up every reference if a held file was replaced (checked at most
        once per RECHECK seconds). True if they were given up."""
        now = self._clock()
        if now - self._checked < RECHECK or not self._held:
            return False
        self._checked = now
        if all(_on_disk(path) == identity for path, (_, identity) in self._held.items()):
            return False
        for library, _ in self._held.values():
            _ctypes.dlclose(library._handle)
        self._held.clear()
        self._services.clear()  # the next call of each service pins what it loads anew
        return True


def shared_objects(maps: Path = MAPS) -> frozenset[str]:
    """Paths of the shared objects mapped into this process (a missing /proc: none). Files
    deleted or replaced since they were mapped (`` (deleted)``) are left out: their path names
    something else now."""
    try:
        text = maps.read_bytes()
    except OSError:
        return frozenset()
    found = set()
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(b"/") and not fields[5].endswith(b" (deleted)"):
            path = os.fsdecode(fields[5])
            if _is_shared_object(path):
                found.add(path)
    return frozenset(found)


def _is_shared_object(path: str) -> bool:
    name = path.rsplit("/", 1)[1]
    return name.endswith(".so") or ".so." in name


def _on_disk(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
