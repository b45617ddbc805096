"""A real authd for the web integrations: roles for the `login` service, users alice, bob, root.

alice edits the blog but may not delete posts, bob has no role, root (group `root` from NSS)
may do anything: enough to see allow, deny and default, by user and by group.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ..daemon import PAM_SERVICE, PASSWORD, Daemon
from ..pamenv import PamEnv

ROLES = """
[roles.editor]
users = ["alice"]
permissions = ["blog.*", "reports.read"]
deny = ["blog.delete_post"]

[roles.admins]
groups = ["root"]
permissions = ["*"]
"""


@pytest.fixture
def web_daemon(make_daemon: Callable[..., Daemon], pam: PamEnv) -> Daemon:
    pam.add_user("root", PASSWORD, PAM_SERVICE)
    return make_daemon(ROLES).start()
