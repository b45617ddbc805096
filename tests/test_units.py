"""The files in systemd/: verified by systemd's own tools, as they would be installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
HOST_UNITS = Path("/usr/lib/systemd/system")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file-system root with the host's units, authd's units and stand-in authd/authctl binaries.

    `systemd-analyze --root` resolves dependencies (sysinit.target, ...) and the ExecStart=
    binaries inside it, which is what lets it run without systemd as PID 1.
    """
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    for binary in ("authd", "authctl"):
        (root / "usr/bin" / binary).write_text("#!/bin/sh\n")
        (root / "usr/bin" / binary).chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in ("authd.service", "authd.socket"):
        shutil.copy(UNITS / unit, root / "etc/systemd/system" / unit)
    return root


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args, f"--root={root}"], capture_output=True, text=True, timeout=60
    )


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_units_verify_cleanly(root: Path) -> None:
    result = analyze(root, "verify", "--man=no", "authd.service", "authd.socket")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "no warning either"


def test_verify_would_notice_a_broken_unit(root: Path) -> None:
    broken = root / "etc/systemd/system/authd-broken.service"
    broken.write_text((UNITS / "authd.service").read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    try:
        result = analyze(root, "verify", "--man=no", broken.name)
    finally:
        broken.unlink()
    assert "Unknown key 'ProtectSytem'" in result.stderr


def test_security_exposure(root: Path) -> None:
    result = analyze(root, "security", "--offline=true", "authd.service")
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for authd\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    print(f"authd.service exposure level (systemd-analyze security --offline=true): {match[1]}")
    assert float(match[1]) <= 2.0, result.stdout


def test_drain_finishes_before_systemd_kills() -> None:
    from authd.config import Daemon

    service = unit_settings("authd.service")
    assert service["TimeoutStopSec"] == ["30"]
    assert Daemon().drain_timeout < 30
    assert service["KillMode"] == ["mixed"], "SIGTERM must reach authd, not its PAM workers"


def test_socket_is_passed_under_the_name_authd_expects() -> None:
    socket_unit = unit_settings("authd.socket")
    assert socket_unit["ListenStream"] == ["/run/authd/authd.sock"]
    assert socket_unit["FileDescriptorName"] == ["authd"]
    assert unit_settings("authd.service")["ExecReload"] == ["/usr/bin/authctl -s /run/authd/authd.sock reload"]


def test_tmpfiles_create_the_directories(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(UNITS / "authd.tmpfiles")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    modes = {path: (tmp_path / path).stat().st_mode & 0o777 for path in ("run/authd", "var/lib/authd", "var/log/authd")}
    assert modes == {"run/authd": 0o755, "var/lib/authd": 0o700, "var/log/authd": 0o750}


# What MemoryDenyWriteExecute=yes installs (systemd's seccomp filter): no mapping both writable
# and executable, no mprotect() adding PROT_EXEC.
_WX_FILTER = """
import ctypes
seccomp = ctypes.CDLL("libseccomp.so.2")
seccomp.seccomp_init.restype = ctypes.c_void_p
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
MASKED_EQ, EPERM, ALLOW, W, X = 7, 0x00050001, 0x7FFF0000, 2, 4
ctx = ctypes.c_void_p(seccomp.seccomp_init(ctypes.c_uint32(ALLOW)))
for name, mask in (("mmap", W | X), ("mprotect", X), ("pkey_mprotect", X)):
    rule = (Cmp * 1)(Cmp(2, MASKED_EQ, mask, mask))
    nr = seccomp.seccomp_syscall_resolve_name(name.encode())
    assert seccomp.seccomp_rule_add_array(ctx, ctypes.c_uint32(EPERM), nr, 1, rule) == 0
assert seccomp.seccomp_load(ctx) == 0

import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("filter not in force")
except PermissionError:
    pass
from authd.pam.binding import authenticate  # its conversation and fail-delay callbacks are libffi closures
assert authenticate("authd-wx", "alice", "canary-pw").ok
assert not authenticate("authd-wx", "alice", "wrong").ok
"""


def test_pam_conversation_survives_memory_deny_write_execute(tmp_path: Path) -> None:
    matrix = "/usr/lib/x86_64-linux-gnu/pam_wrapper/pam_matrix.so"
    (tmp_path / "passdb").write_text("alice:canary-pw:authd-wx\n")
    (tmp_path / "authd-wx").write_text(
        f"auth required {matrix} passdb={tmp_path / 'passdb'}\naccount required {matrix} passdb={tmp_path / 'passdb'}\n"
    )
    env = {
        **os.environ,
        "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libpam_wrapper.so",
        "PAM_WRAPPER": "1",
        "PAM_WRAPPER_SERVICE_DIR": str(tmp_path),
        "PYTHONPATH": str(UNITS.parent),
    }
    result = subprocess.run([sys.executable, "-c", _WX_FILTER], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
