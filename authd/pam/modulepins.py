"""Keep the PAM modules a worker has used loaded between its transactions.

``pam_start`` dlopen()s every module named in the service's file and in ``/etc/pam.d/other``
(on Debian that pulls in common-auth/account/password/session: pam_unix, pam_deny, pam_cap,
pam_systemd, and what they link: libcrypt, libselinux, libcap, ...), and ``pam_end``
dlclose()s them all again. Loading and relocating those ~10 libraries is most of a cheap
transaction: ~0.7 ms of CPU on the development VM, against ~0.1 ms for pam_permit itself.

So on its first transaction for a service, right after ``pam_start`` has loaded the modules,
a worker takes one more reference to each shared object that appeared in its address space
(``dlopen`` with ``RTLD_NOLOAD``: nothing new is loaded, only counted). Later ``pam_end`` calls
then leave them mapped and later ``pam_start`` calls find them loaded. The service files are
still read on every ``pam_start``, so edits to ``/etc/pam.d`` apply at once; new module code (a
package upgrade) runs once the worker retires after ``worker_max_calls`` or the daemon
restarts. ``[daemon] pam_keep_modules = false`` turns this off.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

MAPS = Path("/proc/self/maps")


class ModulePins:
    """References to the shared objects PAM loaded, taken once per service, held until exit."""

    def __init__(self, maps: Path = MAPS) -> None:
        self._maps = maps
        self._baseline = shared_objects(maps)  # the worker's own libraries: Python, libpam, ...
        self._held: dict[str, ctypes.CDLL] = {}
        self._services: set[str] = set()

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def hold(self, service: str) -> None:
        """Call with a transaction for ``service`` open (after pam_start): pin what it loaded."""
        if service in self._services:
            return
        self._services.add(service)
        for path in sorted(shared_objects(self._maps) - self._baseline - self._held.keys()):
            try:
                self._held[path] = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_NOLOAD)
            except OSError:  # mapped but not dlopen()ed (a module's data file): nothing to hold
                continue


def shared_objects(maps: Path = MAPS) -> frozenset[str]:
    """Paths of the shared objects mapped into this process (a missing /proc: none)."""
    try:
        text = maps.read_text()
    except OSError:
        return frozenset()
    found = set()
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and _is_shared_object(fields[5]):
            found.add(fields[5])
    return frozenset(found)


def _is_shared_object(path: str) -> bool:
    name = path.rsplit("/", 1)[1]
    return name.endswith(".so") or ".so." in name
