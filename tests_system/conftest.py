"""The system stage's machines: Debian 12 roots booted with systemd as PID 1 (see machine.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from authd import __version__

from .machine import Machine, root_tarball

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "alice", "Correct-Horse-42"


@pytest.fixture(scope="session")
def deb() -> Path:
    """The package scripts/build-deb made from this checkout."""
    path = ROOT / "dist" / f"authd_{__version__}_amd64.deb"
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/build-deb first (scripts/test-system does)")
    return path


@pytest.fixture(scope="module")
def machine(request: pytest.FixtureRequest) -> Iterator[Machine]:
    """A freshly booted minbase root (systemd, dbus, PAM, passwd), deleted afterwards."""
    extra = getattr(request.module, "EXTRA_PACKAGES", ())
    box = Machine(root_tarball(tuple(extra)), name=request.module.__name__.rsplit(".", 1)[-1].replace("_", "-"))
    try:
        yield box.boot()
    finally:
        box.stop()


def add_user(box: Machine, user: str = USER, password: str = PASSWORD) -> None:
    """A real local account: /etc/passwd, and a yescrypt hash in /etc/shadow."""
    box.run("useradd", "--create-home", user)
    box.run("chpasswd", input=f"{user}:{password}\n")


def authctl(box: Machine, *args: str, password: str | None = None, check: bool = True) -> dict:
    """`authctl ARGS` inside; the reply (stdout when ok, stderr when authd said no) as JSON."""
    done = box.run("authctl", *args, input=None if password is None else password + "\n", check=False)
    if check and done.returncode not in (0, 1):
        raise AssertionError(f"authctl {' '.join(args)} -> {done.returncode}: {done.stderr}")
    return json.loads(done.stdout if done.returncode == 0 else done.stderr)


def copy_in(box: Machine, source: Path, inside: str) -> None:
    target = box.path(inside)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
