"""Roles: what a session may do, decided from the user, groups and service it logged in with.

`[roles.NAME]` tables are compiled once per policy generation into frozen lookup tables, so a
`check` costs a few set and dict probes, and a reload swaps the whole table together with the
rest of the policy: no request ever sees roles of one generation and services of another.

Permissions are dotted names (`mail.send`); a pattern is a permission, a permission followed by
`.*` (one or more further segments: `mail.*` matches `mail.send` and `mail.queue.flush`, not
`mail`), or `*` alone (everything). Of the roles that apply to a session, any matching `deny`
pattern refuses; else any matching `permissions` pattern allows; else the answer is no (deny
wins and the default is deny, as in sssd's simple access provider).
"""

from __future__ import annotations

import grp
import pwd
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import msgspec

from .errors import ConfigError

MAX_PERMISSION = 256
_PERMISSION = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
PERMISSION_GRAMMAR = "dot-separated segments of a-z, 0-9, '_' and '-', at most 256 characters"
DEFAULT = "default"


class RoleConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One `[roles.NAME]` table as written; `compile` checks what its types cannot."""

    users: list[str | int] = []
    groups: list[str | int] = []
    services: list[str] | None = None
    permissions: list[str] = []
    deny: list[str] = []


def is_permission(name: str) -> bool:
    """A concrete permission, as `check` takes it (no wildcards)."""
    return len(name) <= MAX_PERMISSION and _PERMISSION.fullmatch(name) is not None


def is_pattern(pattern: str) -> bool:
    if pattern == "*":
        return True
    return is_permission(pattern[:-2] if pattern.endswith(".*") else pattern) and len(pattern) <= MAX_PERMISSION


def patterns_matching(permission: str) -> tuple[str, ...]:
    """Every pattern that matches a concrete permission: itself, each `prefix.*`, and `*`.

    Matching is then a dict probe per pattern instead of a scan of the policy's patterns.
    """
    out = [permission]
    end = len(permission)
    while (end := permission.rfind(".", 0, end)) > 0:
        out.append(permission[:end] + ".*")
    out.append("*")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    users: frozenset[str]
    everyone: bool  # users = ["*"]
    groups: frozenset[str]
    services: frozenset[str] | None  # None: sessions of any service
    allow: Mapping[str, int]  # pattern -> its index in `permissions`
    deny: Mapping[str, int]  # pattern -> its index in `deny`

    def applies(self, user: str, groups: Collection[str], service: str) -> bool:
        if self.services is not None and service not in self.services:
            return False
        return self.everyone or user in self.users or not self.groups.isdisjoint(groups)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str  # `roles.X.permissions[i]`, `roles.X.deny[i]` or `default`


@dataclass(frozen=True, slots=True)
class Effective:
    roles: tuple[str, ...]
    permissions: tuple[str, ...]
    deny: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Roles:
    roles: tuple[Role, ...] = ()

    def applicable(self, user: str, groups: Collection[str], service: str) -> list[Role]:
        return [role for role in self.roles if role.applies(user, groups, service)]

    def decide(self, user: str, groups: Collection[str], service: str, permission: str) -> Decision:
        """Deny wins, then allow, else `default`; the rule named is the first match in file order."""
        roles = self.applicable(user, groups, service)
        if not roles:
            return Decision(False, DEFAULT)
        candidates = patterns_matching(permission)
        for kind, allowed in (("deny", False), ("permissions", True)):
            for role in roles:
                table = role.deny if not allowed else role.allow
                hits = [table[c] for c in candidates if c in table]
                if hits:
                    return Decision(allowed, f"roles.{role.name}.{kind}[{min(hits)}]")
        return Decision(False, DEFAULT)

    def effective(self, user: str, groups: Collection[str], service: str) -> Effective:
        roles = self.applicable(user, groups, service)
        return Effective(
            roles=tuple(r.name for r in roles),
            permissions=_union(r.allow for r in roles),
            deny=_union(r.deny for r in roles),
        )


def build(table: Mapping[str, RoleConfig], services: Collection[str]) -> Roles:
    """Check every role against the grammar and the live system, then freeze it.

    Errors start with the key path (`roles.X.groups[1]: ...`) so `config.located` can add the
    file and line; they never quote a value an operator did not write as a key.
    """
    return Roles(tuple(_role(name, spec, services) for name, spec in table.items()))


def _role(name: str, spec: RoleConfig, services: Collection[str]) -> Role:
    where = f"roles.{name}"
    if not _ROLE_NAME.fullmatch(name):
        raise ConfigError(f"roles: invalid role name {name!r} (letters, digits, '_' and '-', starting with a letter; at most 64)")
    if not spec.users and not spec.groups:
        raise ConfigError(f"{where}: applies to no one; give `users` or `groups`")
    if not spec.permissions and not spec.deny:
        raise ConfigError(f"{where}: grants and denies nothing; give `permissions` or `deny`")
    if spec.services is not None:
        if not spec.services:
            raise ConfigError(f"{where}.services: empty list; leave it out to mean every service")
        for i, service in enumerate(spec.services):
            if service not in services:
                raise ConfigError(f"{where}.services[{i}]: no [[service]] of that name")
    users = [_user_name(user, f"{where}.users[{i}]") for i, user in enumerate(spec.users)]
    return Role(
        name=name,
        users=frozenset(u for u in users if u != "*"),
        everyone="*" in users,
        groups=frozenset(_group_name(group, f"{where}.groups[{i}]") for i, group in enumerate(spec.groups)),
        services=None if spec.services is None else frozenset(spec.services),
        allow=_patterns(spec.permissions, f"{where}.permissions"),
        deny=_patterns(spec.deny, f"{where}.deny"),
    )


def _patterns(patterns: list[str], where: str) -> dict[str, int]:
    table: dict[str, int] = {}
    for i, pattern in enumerate(patterns):
        if not is_pattern(pattern):
            raise ConfigError(f"{where}[{i}]: invalid pattern ({PERMISSION_GRAMMAR}; may end in `.*`, or be `*` alone)")
        if pattern in table:
            raise ConfigError(f"{where}[{i}]: duplicate of {where}[{table[pattern]}]")
        table[pattern] = i
    return table


def _user_name(user: str | int, where: str) -> str:
    """Names are kept as written (PAM may know users NSS does not); a uid must exist."""
    if isinstance(user, str):
        if not user or "\0" in user:
            raise ConfigError(f"{where}: empty or invalid user name")
        return user
    try:
        return pwd.getpwuid(user).pw_name
    except (KeyError, OverflowError):
        raise ConfigError(f"{where}: no such uid") from None


def _group_name(group: str | int, where: str) -> str:
    """Sessions hold group names, so a gid is resolved to its name; either must exist now."""
    try:
        return grp.getgrnam(group).gr_name if isinstance(group, str) else grp.getgrgid(group).gr_name
    except (KeyError, OverflowError, ValueError):
        raise ConfigError(f"{where}: no such group") from None


def _union(tables: Iterable[Mapping[str, int]]) -> tuple[str, ...]:
    return tuple(sorted({pattern for table in tables for pattern in table}))
