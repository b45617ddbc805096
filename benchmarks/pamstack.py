"""Rootless, system-untouching PAM stacks for benchmarks, and the raw in-process PAM loop.

A benchmark is only honest if PAM costs what it costs in production. pam_matrix answers in
microseconds, so with it any IPC dominates; a real stack spends milliseconds hashing. The
``unix`` stack is Debian's own ``common-auth``/``common-account`` around the real
``pam_unix.so``, checking yescrypt hashes at the distribution's default cost; on a wrong
password pam_unix asks for its default 2 s failure delay by itself.

Two LD_PRELOADed wrappers keep it off the real system: pam_wrapper points libpam at our
service directory, nss_wrapper answers getpwnam()/getgrouplist() from our passwd and group
files. nss_wrapper 1.1.x wraps getspnam() but not the getspnam_r() that pam_unix uses, so the
hash sits in the passwd file's password field, which pam_unix reads exactly like a shadow
entry (it just skips the shadow aging checks). pam_unix reads the hash itself only as root;
as any other user it would run unix_chkpwd against the real /etc/shadow, so ``unix`` needs
root. The ``matrix`` stack (pam_matrix behind ``pam_faildelay delay=2000000``) works for
anyone and measures pure overhead.

The preloads must be in place before libpam loads, so ``env`` is for subprocesses only.

    python -m benchmarks.pamstack loop   # a raw-loop child: job JSON on stdin (see raw_loop)
"""

from __future__ import annotations

import ctypes
import grp
import json
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["unix", "matrix"]

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
PAM_WRAPPER_LIB = LIBDIR / "libpam_wrapper.so"
NSS_WRAPPER_LIB = LIBDIR / "libnss_wrapper.so"
PAM_MATRIX = LIBDIR / "pam_wrapper" / "pam_matrix.so"
REPO = Path(__file__).resolve().parents[1]
SERVICE = "authd-bench"
FIRST_UID = 20001
GROUP = ("authdbench", 20000)

# Debian 12's /etc/pam.d/common-auth and common-account, verbatim apart from comments.
UNIX_LINES = [
    "auth    [success=1 default=ignore]  pam_unix.so nullok",
    "auth    requisite                   pam_deny.so",
    "auth    required                    pam_permit.so",
    "account [success=1 new_authtok_reqd=done default=ignore]  pam_unix.so",
    "account requisite                   pam_deny.so",
    "account required                    pam_permit.so",
]
DENY_LINES = [f"{stage} required pam_deny.so" for stage in ("auth", "account", "password", "session")]


@dataclass(frozen=True)
class PamStack:
    """A PAM service ``service`` that authenticates ``users``, usable by subprocesses given ``env``."""

    kind: Kind
    root: Path
    service: str
    env: dict[str, str]
    description: str

    @classmethod
    def create(cls, root: Path, users: Mapping[str, str], kind: Kind = "unix") -> PamStack:
        """Write the stack's files under ``root``; ``users`` maps user name to password."""
        root.mkdir(parents=True, exist_ok=True)
        service_dir = root / "pam.d"
        service_dir.mkdir(exist_ok=True)
        _write_lines(service_dir / "other", DENY_LINES)  # keeps libpam quiet about a missing "other"
        env = {
            "PAM_WRAPPER": "1",
            "PAM_WRAPPER_SERVICE_DIR": str(service_dir),
            "PAM_WRAPPER_DEBUGLEVEL": "0",
        }
        if kind == "unix":
            if os.geteuid() != 0:
                raise RuntimeError("the pam_unix stack needs root (else pam_unix asks unix_chkpwd and the real /etc/shadow)")
            _require(NSS_WRAPPER_LIB, "libnss-wrapper")
            passwd, group = root / "passwd", root / "group"
            _write_lines(passwd, [*_system_accounts(), *_passwd_lines(users)])
            _write_lines(group, [*_system_groups(), f"{GROUP[0]}:x:{GROUP[1]}:{','.join(users)}"])
            _write_lines(service_dir / SERVICE, UNIX_LINES)
            env |= {
                "LD_PRELOAD": f"{PAM_WRAPPER_LIB}:{NSS_WRAPPER_LIB}",
                "NSS_WRAPPER_PASSWD": str(passwd),
                "NSS_WRAPPER_GROUP": str(group),
            }
            description = "pam_unix (yescrypt) via pam_wrapper+nss_wrapper"
        else:
            passdb = root / "passdb"
            _write_lines(passdb, [f"{_field(u)}:{_field(p)}:{SERVICE}" for u, p in users.items()])
            matrix = f"{PAM_MATRIX} passdb={passdb}"
            _write_lines(
                service_dir / SERVICE,
                ["auth optional pam_faildelay.so delay=2000000", f"auth required {matrix}", f"account required {matrix}"],
            )
            env |= {"LD_PRELOAD": str(PAM_WRAPPER_LIB), "PAM_MATRIX_PASSWD": str(passdb)}
            description = "pam_matrix + pam_faildelay (2 s) via pam_wrapper"
        _require(PAM_WRAPPER_LIB, "libpam-wrapper")
        return cls(kind=kind, root=root, service=SERVICE, env=env, description=description)

    def subprocess_env(self) -> dict[str, str]:
        """The current environment plus this stack's, with the checkout importable."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
        env |= self.env
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return env


def yescrypt(password: str) -> str:
    """A yescrypt hash at libxcrypt's default cost (what Debian's passwd(1) writes)."""
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    setting = lib.crypt_gensalt(b"$y$", 0, None, 0)
    hashed: bytes | None = lib.crypt(password.encode(), setting) if setting else None
    if not hashed or hashed.startswith(b"*"):
        raise RuntimeError("libcrypt cannot make yescrypt hashes here")
    return hashed.decode()


def _passwd_lines(users: Mapping[str, str]) -> list[str]:
    return [
        f"{_field(user)}:{yescrypt(password)}:{uid}:{GROUP[1]}:authd benchmark:/nonexistent:/usr/sbin/nologin"
        for uid, (user, password) in enumerate(users.items(), FIRST_UID)
    ]


def _system_accounts() -> list[str]:
    """root and whoever runs the benchmark, so the daemon can still resolve its admins."""
    entries = {e.pw_uid: e for e in (pwd.getpwuid(0), pwd.getpwuid(os.geteuid()))}
    return [f"{e.pw_name}:x:{e.pw_uid}:{e.pw_gid}:{e.pw_gecos}:{e.pw_dir}:{e.pw_shell}" for e in entries.values()]


def _system_groups() -> list[str]:
    entries = {e.gr_gid: e for e in (grp.getgrgid(0), grp.getgrgid(os.getegid()))}
    return [f"{e.gr_name}:x:{e.gr_gid}:" for e in entries.values()]


def _field(value: str) -> str:
    if any(c in value for c in ":\n"):
        raise ValueError("user names and passwords here cannot contain ':' or newlines")
    return value


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def _require(path: Path, package: str) -> None:
    if not path.exists():
        raise RuntimeError(f"{path} is missing: apt-get install {package}")


@dataclass(frozen=True)
class LoopResult:
    """What the raw PAM loop did: calls completed in the window, and their latencies (s)."""

    count: int
    seconds: float
    latencies: list[float]
    failures: int

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def raw_loop(
    stack: PamStack, user: str, password: str, *, processes: int, seconds: float,
    rhost: str | None = None, timeout: float = 60.0, on_go: Callable[[], None] = lambda: None,
) -> LoopResult:
    """``processes`` subprocesses call ``authd.pam.binding.authenticate`` back to back for
    ``seconds``, all starting together after each has done one warm-up call; ``on_go`` runs
    as they are released."""
    job = json.dumps({"service": stack.service, "user": user, "password": password, "rhost": rhost, "seconds": seconds})
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.pamstack", "loop"], env=stack.subprocess_env(), cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(processes)
    ]
    try:
        for child in children:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(job + "\n")
            child.stdin.flush()
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"raw PAM loop child exited with {child.wait(timeout)}")
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()  # communicate() closes it
        on_go()
        reports = [json.loads(child.communicate(timeout=seconds + timeout)[0]) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return LoopResult(
        count=sum(r["count"] for r in reports),
        seconds=seconds,
        latencies=[x for r in reports for x in r["latencies"]],
        failures=sum(r["failures"] for r in reports),
    )


def _loop_child() -> int:
    from authd.pam import binding

    job = json.loads(sys.stdin.readline())
    args = (job["service"], job["user"], job["password"], job["rhost"])
    warm = binding.authenticate(*args)
    if not warm.ok:
        print(f"warm-up login failed: {warm.outcome} ({warm.detail})", file=sys.stderr)
        return 1
    print("ready", flush=True)
    sys.stdin.readline()
    latencies: list[float] = []
    failures = 0
    clock = time.perf_counter
    deadline = clock() + job["seconds"]
    while (started := clock()) < deadline:
        ok = binding.authenticate(*args).ok
        done = clock()
        if done > deadline:
            break
        latencies.append(done - started)
        failures += not ok
    json.dump({"count": len(latencies) - failures, "latencies": latencies, "failures": failures}, sys.stdout)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["loop"]:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(_loop_child())
