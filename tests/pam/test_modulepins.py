"""Workers keep the PAM modules they used loaded: real libpam, pam_wrapper, pam_matrix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from authd.pam.modulepins import ModulePins, shared_objects

from ..pamenv import PAM_MATRIX, PamEnv

REPO = Path(__file__).resolve().parents[2]
SERVICE = "login-test"

# Two logins and a wrong password, with or without pins; after each, is pam_matrix still mapped?
RUNNER = """
import json, sys
from authd.pam import binding
from authd.pam.modulepins import ModulePins, shared_objects
pins = ModulePins() if sys.argv[2] == "pin" else None
hook = pins.hold if pins else None
report = {"outcomes": [], "mapped_after": [], "held": []}
for password in ("pw-1", "pw-1", "wrong"):
    result = binding.authenticate("login-test", "alice", password, on_start=hook)
    report["outcomes"].append(result.outcome)
    report["mapped_after"].append(any("pam_matrix" in p for p in shared_objects()))
report["held"] = sorted(pins.held) if pins else []
with open(sys.argv[1], "w") as f:
    json.dump(report, f)
"""


@pytest.fixture
def pam(tmp_path: Path) -> PamEnv:
    env = PamEnv.create(tmp_path / "pam")
    env.add_service(SERVICE)
    env.add_user("alice", "pw-1", SERVICE)
    return env


def run(pam: PamEnv, tmp_path: Path, mode: str) -> dict[str, list]:
    out = tmp_path / f"{mode}.json"
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(out), mode],
        env={**os.environ, "PYTHONPATH": str(REPO), **pam.env()}, cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_pinned_modules_stay_loaded_and_still_decide(pam: PamEnv, tmp_path: Path) -> None:
    report = run(pam, tmp_path, "pin")
    assert report["outcomes"] == ["ok", "ok", "auth_failed"]  # a kept module still checks each password
    assert report["mapped_after"] == [True, True, True]
    assert any(Path(p).name == PAM_MATRIX.name for p in report["held"])


def test_without_pins_pam_end_unloads_them(pam: PamEnv, tmp_path: Path) -> None:
    report = run(pam, tmp_path, "plain")
    assert report["outcomes"] == ["ok", "ok", "auth_failed"]
    assert report["mapped_after"] == [False, False, False]


def test_only_new_shared_objects_are_held_once_per_service(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    line = "7f00-7f10 r-xp 00000000 08:01 42 {}\n"
    maps.write_text(line.format("/usr/lib/libpython3.11.so.1.0") + line.format("[heap]"))
    pins = ModulePins(maps)
    libc = "/lib/x86_64-linux-gnu/libc.so.6"  # loaded in this process: RTLD_NOLOAD finds it
    maps.write_text(maps.read_text() + line.format(libc) + line.format("/usr/share/zoneinfo/UTC")
                    + line.format("/nowhere/pam_gone.so"))
    pins.hold("svc")
    assert pins.held == {libc}  # not the baseline, not a data file, not one that is not loaded
    maps.write_text(maps.read_text() + line.format("/lib/x86_64-linux-gnu/libm.so.6"))
    pins.hold("svc")
    assert pins.held == {libc}  # a service is scanned once per worker
    assert shared_objects(tmp_path / "missing") == frozenset()

