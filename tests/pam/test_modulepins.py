"""Workers keep the PAM modules they used loaded: real libpam, pam_wrapper, pam_matrix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from authd.pam.modulepins import ModulePins, shared_objects

from ..pamenv import PAM_DENY, PAM_MATRIX, PAM_PERMIT, PamEnv

SERVICE = "login-test"

# Logins as listed in argv[3] (JSON: [service, password] or "swap" or "refresh"), with or
# without pins; after each, is pam_matrix still mapped? "swap" renames argv[4] over argv[5] (as
# dpkg installs a file); "refresh" is the worker's check between calls, with its clock moved on.
RUNNER = """
import json, os, sys
from authd.pam import binding
from authd.pam.modulepins import RECHECK, ModulePins, shared_objects
now = [0.0]
pins = ModulePins(clock=lambda: now[0]) if sys.argv[2] == "pin" else None
hook = pins.hold if pins else None
report = {"outcomes": [], "mapped_after": [], "held": [], "released": []}
for step in json.loads(sys.argv[3]):
    if step == "swap":
        os.rename(sys.argv[4], sys.argv[5])
    elif step == "refresh":
        now[0] += RECHECK
        report["released"].append(pins.refresh())
    else:
        result = binding.authenticate(step[0], "alice", step[1], on_start=hook)
        report["outcomes"].append(result.outcome)
        report["mapped_after"].append(any("pam_matrix" in p for p in shared_objects()))
report["held"] = sorted(pins.held) if pins else []
with open(sys.argv[1], "w") as f:
    json.dump(report, f)
"""
LOGINS = [[SERVICE, "pw-1"], [SERVICE, "pw-1"], [SERVICE, "wrong"]]


@pytest.fixture
def pam(tmp_path: Path) -> PamEnv:
    env = PamEnv.create(tmp_path / "pam")
    env.add_service(SERVICE)
    env.add_user("alice", "pw-1", SERVICE)
    return env


def run(pam: PamEnv, tmp_path: Path, mode: str, steps: list = LOGINS, *files: Path) -> dict[str, list]:
    out = tmp_path / f"{mode}.json"
    pam.python(RUNNER, str(out), mode, json.dumps(steps), *map(str, files))
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


def test_a_module_replaced_on_disk_is_let_go_and_the_new_one_decides(pam: PamEnv, tmp_path: Path) -> None:
    live, deny = tmp_path / "pam_swap.so", tmp_path / "pam_swap.so.new"
    shutil.copy(PAM_PERMIT, live)
    shutil.copy(PAM_DENY, deny)
    pam.add_module_service("swap", live)
    steps = [["swap", "x"], "swap", ["swap", "x"], "refresh", ["swap", "x"]]
    pinned = run(pam, tmp_path, "pin", steps, deny, live)
    assert pinned["outcomes"] == ["ok", "ok", "auth_failed"]  # the old code until the check
    assert pinned["released"] == [True]
    shutil.copy(PAM_PERMIT, live)
    shutil.copy(PAM_DENY, deny)
    assert run(pam, tmp_path, "plain", steps[:3], deny, live)["outcomes"] == ["ok", "auth_failed"]


def test_a_module_keeps_its_static_state_while_pinned(pam: PamEnv, tmp_path: Path, modules: dict[str, Path]) -> None:
    pam.add_module_service("once", modules["once"])
    steps = [["once", "x"]] * 3
    assert run(pam, tmp_path, "plain", steps)["outcomes"] == ["ok"] * 3  # loaded afresh each time
    assert run(pam, tmp_path, "pin", steps)["outcomes"] == ["ok", "auth_failed", "auth_failed"]


def test_only_new_shared_objects_are_held_once_per_service(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    line = "7f00-7f10 r-xp 00000000 08:01 42 {}\n"
    maps.write_text(line.format("/usr/lib/libpython3.11.so.1.0") + line.format("[heap]"))
    pins = ModulePins(maps)
    libc = next(p for p in shared_objects() if Path(p).name.startswith("libc.so"))  # loaded here
    maps.write_text(maps.read_text() + line.format(libc) + line.format("/usr/share/zoneinfo/UTC")
                    + line.format("/nowhere/pam_gone.so") + line.format(f"{libc} (deleted)"))
    pins.hold("svc")
    assert pins.held == {libc}  # not the baseline, a data file, one not loaded, or a deleted file
    maps.write_text(maps.read_text() + line.format("/lib/x86_64-linux-gnu/libm.so.6"))
    pins.hold("svc")
    assert pins.held == {libc}  # a service is scanned once per worker
    assert not pins.refresh()  # within RECHECK of the last check: no stat at all
    assert shared_objects(tmp_path / "missing") == frozenset()


def test_odd_maps_lines_and_a_missing_maps_file_pin_nothing_and_never_raise(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("")
    pins = ModulePins(maps)
    maps.write_bytes(b"7f00-7f10 r-xp 00000000 08:01 42 /lib/\xff/libx.so\n" + b"garbage 1 2 3 4 /x.so\n")
    pins.hold("svc")  # a non-UTF-8 path, a line of nonsense: looked at, nothing loaded
    maps.unlink()
    pins.hold("other")  # no maps file at all (no /proc)
    assert pins.held == frozenset()
