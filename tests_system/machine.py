"""A pristine Debian 12 booted under systemd-nspawn, with systemd as its PID 1.

The root file system comes from `mmdebstrap --variant=minbase` with the host's apt sources
(so apt inside reaches the same mirror), cached as a tarball under CACHE keyed on everything
that goes into it. Each Machine unpacks a fresh copy, boots it with
`systemd-nspawn --register=no --keep-unit -b` (this works where the host's PID 1 is not
systemd), and runs commands inside through `nsenter -t <its PID 1> -a`. `stop()` powers it
off, kills what is left, unmounts and deletes the copy, and is safe to call on any failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("AUTHD_TEST_CACHE", "/var/cache/authd-test"))
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
BOOT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "libpam-modules", "passwd")


def root_tarball(extra: tuple[str, ...] = ()) -> Path:
    """The cached minbase root with BOOT_PACKAGES and `extra`, built on first use (~20 s)."""
    include = ",".join(sorted({*BOOT_PACKAGES, *extra}))
    sources = SOURCES.read_bytes() if SOURCES.exists() else b""
    key = hashlib.sha256(b"bookworm\0minbase\0" + include.encode() + b"\0" + sources).hexdigest()[:16]
    tarball = CACHE / f"bookworm-{key}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial.tar")
    mirror = [str(SOURCES)] if SOURCES.exists() else []
    subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={include}", "bookworm", str(partial),
                    *mirror], check=True, stdout=subprocess.DEVNULL)
    partial.rename(tarball)
    return tarball


class CommandFailed(AssertionError):
    pass


class Machine:
    def __init__(self, tarball: Path, name: str) -> None:
        self.tarball = tarball
        self.name = name
        self.root = Path(tempfile.mkdtemp(prefix=f"authd-{name}-", dir="/var/tmp"))
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.console = self.root.with_suffix(".console")

    def boot(self, timeout: float = 60.0) -> Machine:
        subprocess.run(["tar", "-C", str(self.root), "-xf", str(self.tarball)], check=True)
        with self.console.open("wb") as console:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", f"--machine={self.name}",
                 "-D", str(self.root), "-b", "systemd.firstboot=off"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.pid1:
            if self.nspawn.poll() is not None or time.monotonic() > deadline:
                raise CommandFailed(f"{self.name} did not boot:\n{self.console.read_text(errors='replace')[-3000:]}")
            self.pid1 = self._container_init()
            time.sleep(0.05)  # the container's PID 1 execs within a second of the fork
        state = ""
        while not state and time.monotonic() < deadline:  # empty until systemd's own socket is up
            state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout).stdout.strip()
        if state not in ("running", "degraded"):
            raise CommandFailed(f"{self.name} booted to {state!r}")
        return self

    def _container_init(self) -> int:
        """nspawn's child once it has become the container's systemd (before, it is nspawn's own)."""
        assert self.nspawn is not None
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        return 0

    def run(self, *command: str, input: str | None = None, check: bool = True, timeout: float = 120.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `command` inside, as root, in the container's namespaces and environment."""
        base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive", **(env or {})}
        argv = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", *(f"{k}={v}" for k, v in base.items()), *command]
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode:
            raise CommandFailed(f"{' '.join(command)} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, **kwargs)  # type: ignore[arg-type]

    def path(self, inside: str) -> Path:
        """The host's view of a path inside (not under the container's own /tmp, a tmpfs)."""
        return self.root / inside.lstrip("/")

    def stop(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)  # nspawn powers the container off
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait(timeout=30)
        mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout.split()
        for target in sorted((m for m in mounts if m == str(self.root) or m.startswith(f"{self.root}/")), reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.console.unlink()
