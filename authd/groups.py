"""A user's group names from NSS: what `allow_groups`/`deny_groups` and sessions see.

Looked up in the PAM worker right after a successful login, so a slow NSS backend (LDAP,
sssd) blocks a worker under its per-call timeout, never the daemon's event loop.
"""

from __future__ import annotations

import grp
import os
import pwd


def user_groups(user: str) -> tuple[str, ...]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return ()
    names = set()
    for gid in os.getgrouplist(user, entry.pw_gid):
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.add(str(gid))
    return tuple(sorted(names))
