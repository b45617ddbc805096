"""Real libpam for tests, through pam_wrapper and pam_matrix.

pam_wrapper (LD_PRELOADed) makes libpam read service files from a directory of ours instead
of /etc/pam.d; pam_matrix authenticates against ``user:password:service`` lines, and its
account stage passes only when the service being logged into is the one on the user's line,
which gives tests an honest account failure ("service mismatch"). The preload must be in
place before libpam loads, so use ``env()`` for a subprocess (a PAM worker, a daemon), never
for the test process itself. pam_wrapper copies the service files when a process starts:
add services before starting the workers (users can be added at any time, pam_matrix reads
its file on every call).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
PAM_WRAPPER_LIB = LIBDIR / "libpam_wrapper.so"
PAM_MATRIX = LIBDIR / "pam_wrapper" / "pam_matrix.so"
PAM_FAILDELAY = LIBDIR / "security" / "pam_faildelay.so"
PAM_SUCCEED_IF = LIBDIR / "security" / "pam_succeed_if.so"
PAM_PERMIT = LIBDIR / "security" / "pam_permit.so"
PAM_DENY = LIBDIR / "security" / "pam_deny.so"
TEST_MODULES = Path(__file__).parent / "pam" / "modules"
REPO = Path(__file__).resolve().parents[1]


@dataclass
class PamEnv:
    """PAM service files and pam_matrix password files under ``root``.

    A user may be registered for several services. Each service reads its own view of the
    users (``passdb.d/<service>``): its own users first, then everyone else with the service
    they were registered for, so in a service they were not registered for, a user's password
    is accepted and pam_matrix's acct_mgmt refuses ("service mismatch"). ``passdb`` holds
    every registration, for ``PAM_MATRIX_PASSWD``.
    """

    root: Path
    service_dir: Path
    passdb: Path
    _users: list[tuple[str, str, str]] = field(default_factory=list, repr=False)
    _services: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def create(cls, root: Path) -> PamEnv:
        service_dir = root / "pam.d"
        service_dir.mkdir(parents=True, exist_ok=True)
        (root / "passdb.d").mkdir(exist_ok=True)
        passdb = root / "passdb"
        passdb.touch()
        # libpam's fallback for unknown services; without it every pam_start complains on stderr
        stages = ("auth", "account", "password", "session")
        (service_dir / "other").write_text("".join(f"{s} required {PAM_DENY}\n" for s in stages))
        return cls(root=root, service_dir=service_dir, passdb=passdb)

    def service_passdb(self, service: str) -> Path:
        return self.root / "passdb.d" / service

    def matrix(self, stage: str, service: str) -> str:
        """A ``<stage> required pam_matrix.so`` line reading ``service``'s view of the users."""
        return f"{stage} required {PAM_MATRIX} passdb={self.service_passdb(service)}"

    def add_user(self, user: str, password: str, service: str) -> None:
        """Let ``user`` log in to ``service`` with ``password``."""
        if any(c in f"{user}{password}{service}" for c in ":\n"):
            raise ValueError("pam_matrix fields cannot contain ':' or newlines")
        self._users.append((user, password, service))
        self._write_passdbs()

    def add_service(self, name: str, lines: list[str] | None = None) -> None:
        """A PAM service file; by default pam_matrix for auth and account."""
        if lines is None:
            lines = [self.matrix("auth", name), self.matrix("account", name)]
        (self.service_dir / name).write_text("".join(f"{line}\n" for line in lines))
        if name not in self._services:
            self._services.append(name)
        self._write_passdbs()

    def _write_passdbs(self) -> None:
        _write_lines(self.passdb, self._users)
        first: dict[str, tuple[str, str, str]] = {}
        for entry in self._users:
            first.setdefault(entry[0], entry)
        for service in self._services:
            own = [entry for entry in self._users if entry[2] == service]
            names = {entry[0] for entry in own}
            others = [entry for name, entry in first.items() if name not in names]
            _write_lines(self.service_passdb(service), own + others)

    def add_faildelay_service(self, name: str, delay: float) -> None:
        """pam_matrix behind pam_faildelay: a failure asks libpam for ``delay`` seconds,
        which libpam randomises to somewhere in [0.5, 1.5) x ``delay``."""
        usec = int(delay * 1_000_000)
        delay = f"auth optional {PAM_FAILDELAY} delay={usec}"
        self.add_service(name, [delay, self.matrix("auth", name), self.matrix("account", name)])

    def add_rhost_service(self, name: str, rhost: str, ruser: str | None = None) -> None:
        """pam_matrix behind pam_succeed_if: auth fails unless PAM_RHOST (and PAM_RUSER) match."""
        cond = f"rhost = {rhost}" + (f" ruser = {ruser}" if ruser is not None else "")
        check = f"auth requisite {PAM_SUCCEED_IF} {cond}"
        self.add_service(name, [check, self.matrix("auth", name), self.matrix("account", name)])

    def add_module_service(
        self, name: str, module_so: Path, args: list[str] | None = None, *, account: bool = False
    ) -> None:
        """A service whose auth is ``module_so``; account is pam_permit, or pam_matrix if
        ``account``."""
        auth = " ".join(["auth required", str(module_so), *(args or [])])
        acct = self.matrix("account", name) if account else f"account required {PAM_PERMIT}"
        self.add_service(name, [auth, acct])

    def python(self, script: str, *args: str, stdin: str | None = None) -> str:
        """Run ``script`` in a fresh interpreter with this setup and the checkout importable;
        its stdout+stderr (PAM modules may print there). It must exit 0."""
        proc = subprocess.run(
            [sys.executable, "-c", script, *args], input=stdin,
            env={**os.environ, "PYTHONPATH": str(REPO), **self.env()}, cwd=REPO, capture_output=True, text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    def env(self) -> dict[str, str]:
        """Variables to add to a subprocess's environment so its libpam uses this setup."""
        return {
            "LD_PRELOAD": str(PAM_WRAPPER_LIB),
            "PAM_WRAPPER": "1",
            "PAM_WRAPPER_SERVICE_DIR": str(self.service_dir),
            "PAM_WRAPPER_DEBUGLEVEL": "0",
            "PAM_MATRIX_PASSWD": str(self.passdb),
        }


def _write_lines(path: Path, users: list[tuple[str, str, str]]) -> None:
    path.write_text("".join(f"{user}:{password}:{service}\n" for user, password, service in users))


def compile_pam_module(src: Path, out_dir: Path) -> Path:
    """Build a PAM module from one C file into ``out_dir``; returns the .so path."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler found (need gcc to build test PAM modules)")
    out = out_dir / f"{src.stem}.so"
    built = subprocess.run(
        [cc, "-shared", "-fPIC", "-Wall", "-o", str(out), str(src), "-lpam"],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise RuntimeError(f"building {src.name} failed:\n{built.stderr}")
    return out


def compile_test_modules(out_dir: Path) -> dict[str, Path]:
    """Build every module in tests/pam/modules; returns {"segv": path, "hang": ..., ...}."""
    return {src.stem: compile_pam_module(src, out_dir) for src in sorted(TEST_MODULES.glob("*.c"))}
