"""Which budgets an attempt spends, and how a guess is named: shared by every lockout backend.

An attempt counts against its user's key and its rhost's key (an IPv6 /`ipv6_prefix`
network), unless exempt or disabled. A guess is named by an HMAC of (user, password) under a
secret key: the local engine draws one per process, a fleet shares one (`[store] secret_file`)
so the same typo on two hosts counts once; neither stores anything brute-forceable.
"""

from __future__ import annotations

import hmac

from .. import rhost as rhosts
from .config import Exemptions, Limit, LockoutConfig
from .table import Scope

SCOPES: tuple[Scope, ...] = ("user", "rhost")
INVALID_RHOST = "(invalid)"
"""The one key every rhost value that names no host shares (front ends should refuse them)."""
FINGERPRINT_BYTES = 16


def limit(config: LockoutConfig, scope: Scope) -> Limit:
    return config.user if scope == "user" else config.rhost


def is_enforced(config: LockoutConfig, exempt: Exemptions, scope: Scope, name: str) -> bool:
    if not limit(config, scope).enabled:
        return False
    return not (exempt.user(name) if scope == "user" else exempt.rhost(name))


def rhost_key(rhost: str | None, ipv6_prefix: int) -> tuple[str | None, str | None]:
    """(the key an rhost counts under, the host itself for exemptions); (None, None) without one."""
    if not rhost:
        return None, None
    try:
        host = rhosts.parse(rhost)
    except ValueError:
        return INVALID_RHOST, None
    return rhosts.key(host, ipv6_prefix), str(host)


def listed_rhost(name: str, ipv6_prefix: int) -> str:
    """The key for an address, or a key as `lockouts` lists it (an IPv6 network, INVALID_RHOST)."""
    try:
        return rhosts.key(rhosts.parse(name), ipv6_prefix)
    except ValueError:
        return name


def enforced(config: LockoutConfig, exempt: Exemptions, ukey: str, rhost: str | None) -> list[tuple[Scope, str, Limit]]:
    """The (scope, key, limit) budgets an attempt by `ukey` from `rhost` must reserve."""
    scopes: list[tuple[Scope, str, Limit]] = []
    if is_enforced(config, exempt, "user", ukey):
        scopes.append(("user", ukey, config.user))
    rkey, host = rhost_key(rhost, config.ipv6_prefix)
    if rkey is not None and config.rhost.enabled and not (host and exempt.rhost(host)):
        scopes.append(("rhost", rkey, config.rhost))
    return scopes


def fingerprint(secret: bytes, ukey: str, password: str) -> bytes:
    user = ukey.encode("utf-8", "surrogatepass")
    message = len(user).to_bytes(4, "big") + user + password.encode("utf-8", "surrogatepass")
    return hmac.digest(secret, message, "sha256")[:FINGERPRINT_BYTES]
