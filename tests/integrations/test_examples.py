"""The example apps under examples/ as a user runs them: one command, a real port, a real daemon.

Each is started as its own process, driven over HTTP with a cookie jar (log in, open a page the
user may see, one it may not, log out), and stopped with Ctrl-C; its output shows that the
app's own signal receivers ran.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from authd import policy

from ..daemon import CANARY, PASSWORD, Daemon, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def request(self, method: str, path: str, data: dict[str, str] | None = None, json_body: Any = None) -> tuple[int, str]:
        body, headers = None, {}
        if data is not None:
            body = urllib.parse.urlencode(data).encode()
        elif json_body is not None:
            body, headers = json.dumps(json_body).encode(), {"Content-Type": "application/json"}
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with self.opener.open(req, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def _interruptible() -> None:
    """Ctrl-C as from a terminal. A suite started in the background (`cmd &` in a script)
    inherits SIGINT ignored, and a Python started with it ignored installs no
    KeyboardInterrupt: Flask's and Django's servers would never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def example(name: str, d: Daemon) -> Iterator[tuple[Browser, subprocess.Popen[str]]]:
    port = free_port()
    env = d.env() | {"AUTHD_SOCKET": str(d.socket), "AUTHD_SERVICE": "login", "PORT": str(port)}
    env.pop("LD_PRELOAD", None)  # the app is a PAM-free client; only the daemon needs pam_wrapper
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT prints every thread's stack: what a hung app waits on
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / name)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_interruptible)
    browser = Browser(f"http://127.0.0.1:{port}")

    def serving() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_for(serving, 60, what=f"{name} to listen")
        yield browser, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            stacks = proc.communicate(timeout=30)[0]
            raise AssertionError(f"{name} did not stop on Ctrl-C; where its threads were:\n{stacks[-6000:]}") from None


def output(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None and proc.poll() is not None
    return proc.stdout.read()


def test_example_policy_is_valid() -> None:
    loaded = policy.load(EXAMPLES / "authd-web.toml", 1, build=False)
    assert [r.name for r in loaded.roles.roles] == ["staff", "editors", "admin"]
    assert loaded.roles.decide("alice", ("adm",), "web", "blog.delete_post").rule == "roles.editors.deny[0]"


def test_flask_example(web_daemon: Daemon) -> None:
    with example("flask_app.py", web_daemon) as (browser, proc):
        assert browser.request("POST", "/login", {"username": "alice", "password": CANARY})[0] == 401
        status, page = browser.request("POST", "/login", {"username": "alice", "password": PASSWORD})
        assert status == 200 and "Hello, alice" in page  # followed the redirect home
        assert browser.request("GET", "/reports")[0] == 200
        assert browser.request("GET", "/posts/delete")[0] == 403
        browser.request("POST", "/logout")
        status, page = browser.request("GET", "/reports")
        assert status == 200 and "Log in" in page, "anonymous: sent to the login form"
    out = output(proc)
    assert "signal login_failed: alice (auth_failed)" in out and "signal logged_in: alice" in out
    assert "signal logged_out: alice" in out and CANARY not in out


def test_fastapi_example(web_daemon: Daemon) -> None:
    with example("fastapi_app.py", web_daemon) as (browser, proc):
        status, body = browser.request("POST", "/login", json_body={"username": "alice", "password": PASSWORD})
        assert status == 200 and json.loads(body)["user"] == "alice"
        assert json.loads(browser.request("GET", "/me")[1])["user"] == "alice"
        assert browser.request("GET", "/reports")[0] == 200
        assert browser.request("DELETE", "/posts/7")[0] == 403
        root = Browser(browser.base)
        root.request("POST", "/login", json_body={"username": "root", "password": PASSWORD})
        assert json.loads(root.request("DELETE", "/posts/7")[1]) == {"deleted": 7}
        browser.request("POST", "/logout")
        assert browser.request("GET", "/me")[0] == 401
    out = output(proc)
    assert "signal logged_in: alice" in out and "signal logged_in: root groups=root" in out
    assert "signal logged_out: alice" in out


def test_django_example(web_daemon: Daemon) -> None:
    with example("django_app.py", web_daemon) as (browser, proc):

        def log_in(who: Browser, user: str, password: str = PASSWORD) -> tuple[int, str]:
            form = who.request("GET", "/login")[1]
            csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)
            assert csrf, form
            return who.request("POST", "/login", {"username": user, "password": password,
                                                  "csrfmiddlewaretoken": csrf.group(1)})

        assert "Login failed" in log_in(browser, "alice", "wrong")[1]
        status, page = log_in(browser, "alice")
        assert status == 200 and "Hello, alice" in page and "reports.read: yes" in page and "blog.delete_post: no" in page
        assert browser.request("GET", "/reports")[0] == 200
        assert browser.request("GET", "/posts/delete")[0] == 403
        root = Browser(browser.base)
        assert "blog.delete_post: yes" in log_in(root, "root")[1]
        assert root.request("GET", "/posts/delete")[0] == 200
    out = output(proc)
    assert "signal user_login_failed: alice" in out and "signal user_logged_in: alice" in out
    assert "signal user_logged_in: root groups=root" in out
