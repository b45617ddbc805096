"""`authctl` as a shell user meets it: the password from stdin, exit codes, --version, defaults."""

from __future__ import annotations

import inspect
import json
import subprocess

from authd import __version__
from authd.client import DEFAULT_SERVICE, AsyncClient, Client
from authd.ctl import EMPTY_PASSWORD

from .abuse.helpers import counters, ctl
from .daemon import PASSWORD, Daemon


def test_password_line_end_is_stripped_crlf_too(daemon: Daemon) -> None:
    for line_end in ("\n", "\r\n", ""):
        done = ctl(daemon, "auth", "alice", stdin=PASSWORD + line_end)
        assert done.returncode == 0 and json.loads(done.stdout)["user"] == "alice", (line_end, done.stderr)


def test_empty_password_is_refused_before_sending(daemon: Daemon) -> None:
    for stdin in ("\n", "\r\n", ""):
        done = ctl(daemon, "auth", "alice", stdin=stdin)
        assert done.returncode == 2, done
        assert done.stderr == f"authctl: {EMPTY_PASSWORD}\n"
        assert done.stdout == ""
    assert not [name for name in counters(daemon) if name.startswith("auth:")], "nothing reached authd"


def test_exit_codes(daemon: Daemon) -> None:
    assert ctl(daemon, "hello").returncode == 0
    refused = ctl(daemon, "auth", "alice", stdin="wrong\n")
    assert refused.returncode == 1 and json.loads(refused.stderr)["error"] == "auth_failed"
    assert ctl(daemon, "no-such-command").returncode == 2
    daemon.stop()
    gone = ctl(daemon, "hello")
    assert gone.returncode == 2 and gone.stderr.startswith("authctl: cannot connect to ")


def test_version_and_help_document_exit_codes_and_socket(daemon: Daemon) -> None:
    version = ctl(daemon, "--version")
    assert version.returncode == 0 and version.stdout == f"authctl {__version__}\n"
    help_text = ctl(daemon, "--help").stdout
    assert "exit status:" in help_text and "AUTHD_SOCKET" in help_text and "130" in help_text


def test_socket_from_environment(daemon: Daemon) -> None:
    command = [*daemon.command()[:-1], "authd.ctl", "hello"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/",
                          env={**daemon.env(), "AUTHD_SOCKET": str(daemon.socket)})
    assert done.returncode == 0 and json.loads(done.stdout)["server"] == "authd", done.stderr


def test_library_and_authctl_default_to_the_same_service(daemon: Daemon) -> None:
    for client in (Client, AsyncClient):
        assert inspect.signature(client.auth).parameters["service"].default == DEFAULT_SERVICE == "login"
    with Client(str(daemon.socket)) as c:
        assert c.auth("alice", PASSWORD)["user"] == "alice"
    done = ctl(daemon, "auth", "alice", stdin=PASSWORD)
    assert done.returncode == 0
    services = {r.get("service") for r in daemon.log_lines("auth succeeded")}
    assert services == {DEFAULT_SERVICE}, services


def test_pid_is_the_daemons_for_kill(daemon: Daemon) -> None:
    done = ctl(daemon, "pid")
    assert done.returncode == 0 and done.stdout == f"{daemon.pid}\n"
