"""The `[lockout]` table: limits, progressive locks and exemptions."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from authd.errors import ConfigError
from authd.rhost import HOSTNAME


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

    `max_keys` bounds how many keys each scope tracks (a flood of made-up user names would
    otherwise hold memory for every name until `interval` passes); `ipv6_prefix` is how much
    of an IPv6 address is one rhost, since one host usually holds a whole /64.
    """

    user: Limit = msgspec.field(default_factory=Limit)
    rhost: Limit = msgspec.field(default_factory=lambda: Limit(max_failures=20))
    progressive: bool = False
    max_lock_time: Annotated[float, Meta(gt=0)] = 86400.0
    exempt_users: tuple[str, ...] = ()
    exempt_rhosts: tuple[str, ...] = ()
    exempt_root: bool = False
    max_keys: Annotated[int, Meta(ge=1)] = 100_000
    ipv6_prefix: Annotated[int, Meta(ge=1, le=128)] = 64

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
    return name.rstrip(".") if HOSTNAME.match(name) else None


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
        """Whether an address, an IPv6 network key (only if all of it is exempt) or a name is exempt."""
        if not (self._networks or self._hosts):
            return False
        try:
            network = ipaddress.ip_network(key)
        except ValueError:
            return key in self._hosts
        return any(network.version == each.version and network.subnet_of(each) for each in self._networks)  # type: ignore[arg-type]


def user_key(user: str) -> str:
    """Case-folded, so "Alice" and "alice" share one budget even where PAM ignores case."""
    return user.casefold()
