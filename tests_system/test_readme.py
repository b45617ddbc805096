"""The README's two commands, pasted on a fresh Debian 12 with only `python3 python3-venv` added.

The checkout is copied to /root/authd (0700 /root, where root would clone it); the host's CA
bundle and /etc/pip.conf go in so that pip trusts and reaches what the host does. The
commands are read from the README itself, so the test follows the README when it changes.
Then python-pam, which the test extras install, is the independent oracle: for the same
users and passwords on the real /etc/pam.d/login (pam_unix, no pam_wrapper), it must agree
with authd.

`scripts/test` runs the whole fast suite when AUTHD_SYSTEM_FULL_SUITE=1; otherwise (CI) the
files that touch what differs in a container (a 0700 checkout, dropping to nobody, loop and
tmpfs mounts, the system PAM stack) plus the configuration, docs and authctl tests; the
times of both are in docs/operations.md.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.daemon import wait_for

from .conftest import PASSWORD, ROOT, USER, add_user
from .machine import Machine

EXTRA_PACKAGES = ("python3", "python3-venv")
CHECKOUT = "/root/authd"
CI_SUBSET = ("tests/abuse/test_lockout.py", "tests/test_storage_faults.py", "tests/test_auth.py",
             "tests/test_config.py", "tests/test_authctl.py", "tests/test_docs.py", "tests/test_manpages.py")


def readme_command(section: str) -> str:
    """The one shell block under `## {section}` in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"^```sh\n(.*?)\n```", body, re.S | re.M).group(1).strip()


@pytest.fixture(scope="module")
def box(machine: Machine) -> Machine:
    machine.path(CHECKOUT).mkdir(parents=True)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in (f for f in files if f and (ROOT / f).is_file()):  # tracked and new files, as a clone has them
        target = machine.path(f"{CHECKOUT}/{name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    machine.run("chmod", "700", "/root")
    for host_file in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf"):
        if Path(host_file).exists():
            machine.path(host_file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(host_file, machine.path(host_file))
    add_user(machine)
    return machine


def serve_in_background(box: Machine, command: str) -> subprocess.Popen[str]:
    argv = ["nsenter", "-t", str(box.pid1), "-a", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
            "sh", "-c", f"cd {CHECKOUT} && {command}"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_run_it_serves_and_authenticates_a_real_user(box: Machine) -> None:
    command = readme_command("Run it")
    server = serve_in_background(box, command)
    try:
        wait_for(lambda: box.path(f"{CHECKOUT}/authd.sock").exists() or server.poll() is not None, timeout=300,
                 what="the README's first command to serve")
        assert server.poll() is None, server.stdout.read() if server.stdout else ""
        ok = box.sh(f"cd {CHECKOUT} && printf '%s\\n' {shlex.quote(PASSWORD)} | .venv/bin/authctl auth {USER}")
        assert '"ok": true' in ok.stdout
        wrong = box.sh(f"cd {CHECKOUT} && printf 'nope\\n' | .venv/bin/authctl auth {USER}", check=False)
        assert wrong.returncode == 1 and '"auth_failed"' in wrong.stderr
    finally:
        box.sh(f"cd {CHECKOUT} && kill -INT $(.venv/bin/authctl pid)", check=False)  # Ctrl-C
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0, output


def test_test_it_passes_from_a_0700_checkout(box: Machine) -> None:
    command = readme_command("Test it")
    args = "" if os.environ.get("AUTHD_SYSTEM_FULL_SUITE") == "1" else " -q " + " ".join(CI_SUBSET)
    done = box.sh(f"cd {CHECKOUT} && {command}{args}", check=False, timeout=1800)
    summary = done.stdout.strip().splitlines()[-1:] or [""]
    print(f"README `{command}{args}` in the container: {summary[0]}")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    skipped = re.findall(r"^SKIPPED .*$", done.stdout, re.M)
    assert all("loop devices" in line for line in skipped), skipped


def test_python_pam_agrees_with_authd_on_the_system_stack(box: Machine) -> None:
    oracle = box.path(f"{CHECKOUT}/tests_system/pam_oracle.py")
    assert oracle.exists()
    server = serve_in_background(box, "exec .venv/bin/authd serve -c authd.toml")
    try:
        wait_for(lambda: box.path(f"{CHECKOUT}/authd.sock").exists() or server.poll() is not None, what="authd to serve")
        done = box.sh(f"cd {CHECKOUT} && .venv/bin/python tests_system/pam_oracle.py authd.sock {USER}",
                      input=PASSWORD + "\n", check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("agree") == 3, done.stdout
    finally:
        box.sh(f"cd {CHECKOUT} && kill -TERM $(.venv/bin/authctl pid)", check=False)
        server.communicate(timeout=60)
