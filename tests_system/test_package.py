"""The Debian package on a pristine Debian 12 with systemd as PID 1: install, socket activation,
real pam_unix under the unit's sandbox, reload, dumps, watchdog, drain, restart, upgrade, purge.

The tests run in file order on one machine, as an operator's day would: each says what it
starts from.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from tests.daemon import wait_for

from .conftest import PASSWORD, USER, add_user, authctl, copy_in
from .machine import Machine

DEB = "/var/tmp/authd.deb"  # not /tmp: the booted container mounts a tmpfs there
CONFIG = "/etc/authd/authd.toml"


@pytest.fixture(scope="module")
def box(machine: Machine, deb: Path) -> Machine:
    copy_in(machine, deb, DEB)
    machine.run("apt-get", "update", "-q", timeout=600)
    machine.run("apt-get", "install", "-y", "-q", DEB, timeout=600)
    add_user(machine)
    return machine


def show(box: Machine, unit: str, *props: str) -> dict[str, str]:
    out = box.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(box: Machine, *args: str) -> list[str]:
    return box.run("journalctl", "-u", "authd", "--no-pager", "-o", "cat", *args).stdout.splitlines()


def events(box: Machine, name: str) -> list[dict]:
    return [json.loads(line) for line in journal(box) if line.startswith("{") and f'"event":"{name}"' in line]


def login(box: Machine, password: str = PASSWORD) -> dict:
    return authctl(box, "auth", USER, password=password)


def test_install_enables_the_units_and_ships_its_files(box: Machine) -> None:
    assert box.run("systemctl", "is-enabled", "authd.socket", "authd.service").stdout.split() == ["enabled", "enabled"]
    assert show(box, "authd.socket", "ActiveState")["ActiveState"] == "active"
    assert show(box, "authd.service", "ActiveState")["ActiveState"] == "inactive", "started by its socket, on demand"
    conffiles = box.run("dpkg-query", "-W", "-f=${Conffiles}", "authd").stdout
    assert CONFIG in conffiles and "/etc/fail2ban/jail.d/authd.conf" in conffiles and "/etc/logrotate.d/authd" in conffiles
    assert box.run("authd", "check-config", "-c", CONFIG).stdout.startswith(f"{CONFIG}: ok")
    version = box.run("authd", "--version").stdout.split()[-1]
    assert box.run("authctl", "--version").stdout.split() == ["authctl", version]
    assert box.run("readlink", "/usr/bin/authd").stdout.strip() == "/opt/venvs/authd/bin/authd"
    assert box.run("/opt/venvs/authd/bin/python", "-c", "import msgspec, structlog").returncode == 0
    for path in ("/usr/share/man/man8/authd.8.gz", "/usr/share/man/man1/authctl.1.gz", "/usr/share/man/man5/authd.toml.5.gz",
                 "/usr/share/doc/authd/README.md", "/usr/share/doc/authd/docs/configuration.md",
                 "/usr/lib/sysusers.d/authd.conf", "/usr/lib/tmpfiles.d/authd.conf", "/etc/fail2ban/filter.d/authd.conf"):
        assert box.path(path).exists(), path
    assert "enabled  = false" in box.path("/etc/fail2ban/jail.d/authd.conf").read_text()
    assert box.run("getent", "group", "authd").returncode == 0
    sock = box.run("stat", "-c", "%a %G %F", "/run/authd/authd.sock").stdout.strip().split(maxsplit=2)
    assert sock == ["660", "authd", "socket"]


def test_first_connection_starts_the_service(box: Machine) -> None:
    assert authctl(box, "hello")["server"] == "authd"
    assert show(box, "authd.service", "ActiveState")["ActiveState"] == "active"
    assert [e["inherited"] for e in events(box, "listening")] == [True], "it serves the socket systemd passed"


def test_auth_through_system_pam_under_the_sandbox(box: Machine) -> None:
    props = show(box, "authd.service", "MainPID", "MemoryDenyWriteExecute", "NoNewPrivileges", "SystemCallFilter")
    assert props["MemoryDenyWriteExecute"] == "yes" and props["NoNewPrivileges"] == "yes" and props["SystemCallFilter"]
    fields = dict(line.split(":\t", 1) for line in box.run("cat", f"/proc/{props['MainPID']}/status").stdout.splitlines())
    assert fields["Seccomp"].strip() == "2" and fields["NoNewPrivs"].strip() == "1", "the unit's filter is on"
    ok = login(box)
    assert ok["ok"] and ok["user"] == USER and ok["session"]["token"]
    assert login(box, "wrong-password")["error"] == "auth_failed"
    assert authctl(box, "auth", "no-such-user", password="x")["error"] == "auth_failed"
    assert authctl(box, "session", "--", ok["session"]["token"])["session"]["user"] == USER


def test_journal_lines_are_readable_with_their_priority(box: Machine) -> None:
    warnings = journal(box, "--priority=warning")
    assert any('"event":"auth failed"' in line for line in warnings)
    assert not any('"event":"ready"' in line for line in warnings), "info lines are not warnings"
    output = box.run("journalctl", "-u", "authd", "-o", "json", "--no-pager").stdout
    records = [json.loads(line) for line in output.splitlines()]
    priority = {json.loads(r["MESSAGE"])["event"]: r["PRIORITY"] for r in records
                if r.get("SYSLOG_IDENTIFIER") == "authd" and str(r.get("MESSAGE", "")).startswith("{")}
    assert priority["ready"] == "6" and priority["auth failed"] == "4", priority


def test_reload_good_and_broken_files(box: Machine) -> None:
    generation = authctl(box, "hello")["generation"]
    original = box.path(CONFIG).read_text()
    box.path(CONFIG).write_text(original.replace("failure_delay = 2.0", "failure_delay = 1.0"))
    assert box.run("systemctl", "reload", "authd").returncode == 0
    assert authctl(box, "hello")["generation"] == generation + 1

    box.path(CONFIG).write_text(original + "\n[daemon.nonsense]\n")
    failed = box.run("systemctl", "reload", "authd", check=False)
    assert failed.returncode != 0, "systemctl reload reports the invalid file"
    assert authctl(box, "hello")["generation"] == generation + 1, "the old policy keeps serving"
    assert login(box)["ok"]
    assert "daemon.nonsense" in authctl(box, "status")["last_reload_error"]
    box.path(CONFIG).write_text(original)
    assert box.run("systemctl", "reload", "authd").returncode == 0


def test_usr1_writes_a_dump(box: Machine) -> None:
    token = login(box)["session"]["token"]
    box.run("systemctl", "kill", "--kill-who=main", "--signal=USR1", "authd")
    dumps = wait_for(lambda: list(box.path("/var/lib/authd").glob("sessions-*.json")), what="a session dump")
    text = dumps[0].read_text()
    assert USER in json.dumps(json.loads(text)) and token not in text


def test_sessions_survive_restart(box: Machine) -> None:
    token = login(box)["session"]["token"]
    pid = show(box, "authd.service", "MainPID")["MainPID"]
    box.run("systemctl", "restart", "authd")
    assert show(box, "authd.service", "MainPID")["MainPID"] != pid
    assert authctl(box, "session", "--", token)["session"]["user"] == USER


def test_watchdog_restarts_a_hung_main_loop(box: Machine) -> None:
    token = login(box)["session"]["token"]
    dropin = box.path("/etc/systemd/system/authd.service.d/watchdog.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nWatchdogSec=2\nTimeoutAbortSec=2\nRestartSec=0\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", "authd")
    before = show(box, "authd.service", "MainPID", "NRestarts")
    try:
        box.run("systemctl", "kill", "--kill-who=main", "--signal=STOP", "authd")
        after = wait_for(lambda: _restarted(box, before["MainPID"]), timeout=60, what="a watchdog restart")
    finally:
        dropin.unlink()
        box.run("systemctl", "daemon-reload")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert any("Watchdog timeout" in line for line in box.run("journalctl", "--no-pager", "-u", "authd").stdout.splitlines())
    assert authctl(box, "session", "--", token)["session"]["user"] == USER


def test_stop_drains_a_request_in_flight(box: Machine) -> None:
    """A wrong password waits out PAM's delay (3 s): stopping meanwhile still answers it."""
    failures = len(events(box, "auth failed"))
    reply: dict = {}
    worker = threading.Thread(target=lambda: reply.update(login(box, "wrong-again")))
    worker.start()
    wait_for(lambda: len(events(box, "auth failed")) > failures, what="the failure to be decided")
    stop = box.run("systemctl", "stop", "authd.service")
    worker.join(timeout=60)
    assert stop.returncode == 0 and reply.get("error") == "auth_failed", reply
    stopped = events(box, "stopped")[-1]
    assert stopped["forced"] is False
    assert show(box, "authd.service", "Result")["Result"] == "success"


def test_upgrade_keeps_sessions_and_the_socket(box: Machine, deb: Path, tmp_path: Path) -> None:
    token = login(box)["session"]["token"]
    pid = show(box, "authd.service", "MainPID")["MainPID"]
    listening_since = show(box, "authd.socket", "ActiveEnterTimestamp")
    newer = _rebuilt_with_newer_version(deb, tmp_path)
    copy_in(box, newer, "/var/tmp/authd-newer.deb")
    box.run("apt-get", "install", "-y", "-q", "/var/tmp/authd-newer.deb", timeout=600)
    assert box.run("dpkg-query", "-W", "-f=${Version}", "authd").stdout.endswith("+upgrade")
    assert show(box, "authd.service", "MainPID")["MainPID"] not in ("0", pid), "the running service was restarted"
    assert show(box, "authd.socket", "ActiveEnterTimestamp") == listening_since, "the socket never closed"
    assert authctl(box, "session", "--", token)["session"]["user"] == USER


def test_remove_stops_and_purge_removes_state(box: Machine) -> None:
    box.run("apt-get", "remove", "-y", "-q", "authd")
    assert show(box, "authd.socket", "ActiveState")["ActiveState"] == "inactive"
    assert show(box, "authd.service", "ActiveState")["ActiveState"] == "inactive"
    assert box.path("/var/lib/authd/sessions.db").exists() and box.path(CONFIG).exists(), "remove keeps state and config"
    box.run("apt-get", "purge", "-y", "-q", "authd")
    for path in ("/var/lib/authd", "/var/log/authd", "/etc/authd", "/opt/venvs/authd"):
        assert not box.path(path).exists(), path


def _restarted(box: Machine, old_pid: str) -> dict[str, str] | None:
    props = show(box, "authd.service", "MainPID", "NRestarts", "ActiveState")
    return props if props["ActiveState"] == "active" and props["MainPID"] not in ("0", old_pid) else None


def _rebuilt_with_newer_version(deb: Path, tmp_path: Path) -> Path:
    """The same package as version X+upgrade: what an upgrade does is independent of the code."""
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    lines = [f"{line}+upgrade" if line.startswith("Version: ") else line for line in control.read_text().splitlines()]
    control.write_text("\n".join(lines) + "\n")
    out = tmp_path / "authd-newer.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "-b", str(tree), str(out)], check=True, capture_output=True)
    return out
