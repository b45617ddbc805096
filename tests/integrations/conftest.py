"""A real authd for the web integrations: roles for the `login` service, users alice, bob, root.

alice edits the blog but may not delete posts, bob has no role, root (group `root` from NSS)
may do anything: enough to see allow, deny and default, by user and by group.

`shared_daemon` serves a whole test module (lockout off, so one test's failed logins cannot
lock another's user out); a test that stops the daemon or counts its connections takes its own
`web_daemon`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ..conftest import pam_env
from ..daemon import BASE_POLICY, PAM_SERVICE, PASSWORD, Daemon
from ..pamenv import PamEnv

USERS = ("alice", "bob", "root")
ROLES = """
[roles.editor]
users = ["alice"]
permissions = ["blog.*", "reports.read"]
deny = ["blog.delete_post"]

[roles.admins]
groups = ["root"]
permissions = ["*"]
"""
NO_LOCKOUT = "\n[lockout.user]\nmax_failures = 0\n\n[lockout.rhost]\nmax_failures = 0\n"


@pytest.fixture
def web_daemon(make_daemon: Callable[..., Daemon], pam: PamEnv) -> Daemon:
    pam.add_user("root", PASSWORD, PAM_SERVICE)
    return make_daemon(ROLES).start()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("web")
    daemon = Daemon(root, pam_env(root / "pam", USERS), BASE_POLICY + "failure_delay = 0.0\n" + ROLES + NO_LOCKOUT)
    try:
        yield daemon.start()
    finally:
        daemon.cleanup()
