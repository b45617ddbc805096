"""The `[lockout]` table: limits, progressive locks and exemptions."""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from authd.errors import ConfigError

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z)(?:{_LABEL}\.)*(?=[a-z]){_LABEL}\.?\Z")
"""A DNS name whose last label is not numeric, so a mistyped address is not taken for one."""


class Limit(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """`max_failures` distinct failures within `interval` seconds lock the key for `lock_time`.

    `max_failures = 0` turns the limit off. `lock_time = 0` (never unlock on its own) is only
    accepted together with `permanent = true`, so nobody gets a permanent lock by a typo.
    """

    max_failures: Annotated[int, Meta(ge=0)] = 5
    interval: Annotated[float, Meta(gt=0)] = 900.0
    lock_time: Annotated[float, Meta(ge=0)] = 600.0
    permanent: bool = False

    def __post_init__(self) -> None:
        for name in ("interval", "lock_time"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number of seconds")
        if self.permanent and self.lock_time != 0:
            raise ValueError("permanent = true needs lock_time = 0")
        if self.lock_time == 0 and not self.permanent:
            raise ValueError(
                "lock_time = 0 would never unlock on its own; add permanent = true if that is meant"
            )

    @property
    def enabled(self) -> bool:
        return self.max_failures > 0


class LockoutConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Per-user and per-rhost limits, like pam_faillock (user) and fail2ban (host) together.

    The rhost default allows 20 failures, not 5, so that a few users behind one NAT address
    mistyping their passwords do not lock each other out.

    With `progressive`, each consecutive lock of a key lasts twice as long as the one before,
    up to `max_lock_time`; a key's lock count is forgotten after a successful login (user
    scope) or once the key has stayed unlocked for `max_lock_time`.
    """

    user: Limit = msgspec.field(default_factory=Limit)
    rhost: Limit = msgspec.field(default_factory=lambda: Limit(max_failures=20))
    progressive: bool = False
    max_lock_time: Annotated[float, Meta(gt=0)] = 86400.0
    exempt_users: tuple[str, ...] = ()
    exempt_rhosts: tuple[str, ...] = ()
    exempt_root: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_lock_time):
            raise ValueError("max_lock_time must be a finite number of seconds")
        if self.progressive:
            for scope in ("user", "rhost"):
                limit = getattr(self, scope)
                if limit.enabled and limit.lock_time > self.max_lock_time:
                    raise ValueError(f"{scope}.lock_time is longer than max_lock_time")
        for i, name in enumerate(self.exempt_users):
            if not name:
                raise ValueError(f"exempt_users[{i}] is empty")
        for i, entry in enumerate(self.exempt_rhosts):
            if _parse_rhost_pattern(entry) is None:
                raise ValueError(f"exempt_rhosts[{i}] is not an IP address, CIDR network or host name")


def load_config(raw: Mapping[str, Any] | None, *, path: str = "lockout") -> LockoutConfig:
    """Build a LockoutConfig from the parsed TOML table, naming the key path on errors."""
    try:
        return msgspec.convert(dict(raw or {}), LockoutConfig)
    except msgspec.ValidationError as exc:
        raise config_error(exc, path) from None


def config_error(exc: msgspec.ValidationError, prefix: str) -> ConfigError:
    """Turn msgspec's "message - at `$.a.b`" into "prefix.a.b: message"."""
    message, sep, where = str(exc).rpartition(" - at `$")
    if not sep:
        return ConfigError(f"{prefix}: {exc}")
    return ConfigError(f"{prefix}{where.rstrip('`')}: {message}")


def _parse_rhost_pattern(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        pass
    name = entry.lower()
    return name.rstrip(".") if _HOSTNAME.match(name) else None


class Exemptions:
    """Who never gets counted or locked, precomputed from a LockoutConfig."""

    def __init__(self, config: LockoutConfig) -> None:
        self._users = {user_key(name) for name in config.exempt_users}
        if config.exempt_root:
            self._users.add("root")
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._hosts: set[str] = set()
        for entry in config.exempt_rhosts:
            pattern = _parse_rhost_pattern(entry)
            if isinstance(pattern, str):
                self._hosts.add(pattern)
            elif pattern is not None:
                self._networks.append(pattern)

    def user(self, key: str) -> bool:
        return key in self._users

    def rhost(self, key: str) -> bool:
        if not (self._networks or self._hosts):
            return False
        try:
            address = ipaddress.ip_address(key)
        except ValueError:
            return key in self._hosts
        return any(address in network for network in self._networks)


def user_key(user: str) -> str:
    """Case-folded, so "Alice" and "alice" share one budget even where PAM ignores case."""
    return user.casefold()


@functools.lru_cache(maxsize=4096)
def rhost_key(rhost: str | None) -> str | None:
    """Canonical address text (IPv4-mapped IPv6 unwrapped), or a lower-case host name."""
    if not rhost:
        return None
    try:
        address = ipaddress.ip_address(rhost)
    except ValueError:
        return rhost.lower().rstrip(".")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(address)
