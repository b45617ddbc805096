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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import msgspec

from .errors import ConfigError

MAX_PERMISSION = 256
_PERMISSION = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
PERMISSION_GRAMMAR = "dot-separated segments of a-z, 0-9, '_' and '-', at most 256 characters"
DEFAULT = "default"
MAX_GRANTS = 10_000  # cached (user, groups, service) grants per policy generation
MAX_DECISIONS = 10_000  # cached (user, groups, service, permission) decisions per generation


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
class Effective:
    roles: tuple[str, ...]
    permissions: tuple[str, ...]
    deny: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str  # `roles.X.permissions[i]`, `roles.X.deny[i]` or `default`


DENIED_BY_DEFAULT = Decision(False, DEFAULT)
Rule = tuple[int, int, Decision]  # (role's place in the file, pattern's index, the decision)


@dataclass(frozen=True, slots=True)
class Grant:
    """What the roles that apply to one (user, groups, service) add up to, merged for lookup."""

    roles: tuple[str, ...]
    allow: Mapping[str, Rule]
    deny: Mapping[str, Rule]

    def decide(self, permission: str) -> Decision:
        """Deny wins, then allow, else `default`; of several matches the first in file order."""
        candidates = patterns_matching(permission)
        for table in (self.deny, self.allow):
            hits = [table[c] for c in candidates if c in table]
            if hits:
                return min(hits)[2]
        return DENIED_BY_DEFAULT


@dataclass(frozen=True, slots=True)
class Roles:
    """The compiled roles of one policy generation.

    Grants are cached per (user, groups, service), and the decisions taken from them per
    permission too: a web app asks the same few questions about the same few sessions over
    and over. Both caches live and die with this generation and are emptied whole when they
    reach MAX_GRANTS or MAX_DECISIONS entries, so they stay bounded however many users log in
    and whatever permissions clients ask about.
    """

    roles: tuple[Role, ...] = ()
    _grants: dict[tuple[str, tuple[str, ...], str], Grant] = field(default_factory=dict, compare=False, repr=False)
    _decisions: dict[tuple[str, tuple[str, ...], str, str], Decision] = field(default_factory=dict, compare=False,
                                                                             repr=False)

    def grant(self, user: str, groups: tuple[str, ...], service: str) -> Grant:
        key = (user, groups, service)
        if (found := self._grants.get(key)) is not None:
            return found
        if len(self._grants) >= MAX_GRANTS:
            self._grants.clear()
        grant = self._grants[key] = _merge([(i, r) for i, r in enumerate(self.roles) if r.applies(user, groups, service)])
        return grant

    def decide(self, user: str, groups: tuple[str, ...], service: str, permission: str) -> Decision:
        key = (user, groups, service, permission)
        if (found := self._decisions.get(key)) is not None:
            return found
        if len(self._decisions) >= MAX_DECISIONS:
            self._decisions.clear()
        decision = self._decisions[key] = self.grant(user, groups, service).decide(permission)
        return decision

    def effective(self, user: str, groups: tuple[str, ...], service: str) -> Effective:
        grant = self.grant(user, groups, service)
        return Effective(roles=grant.roles, permissions=tuple(sorted(grant.allow)), deny=tuple(sorted(grant.deny)))


def _merge(roles: list[tuple[int, Role]]) -> Grant:
    allow: dict[str, Rule] = {}
    deny: dict[str, Rule] = {}
    for place, role in roles:
        for kind, patterns, table, allowed in (("permissions", role.allow, allow, True), ("deny", role.deny, deny, False)):
            for pattern, index in patterns.items():
                table.setdefault(pattern, (place, index, Decision(allowed, f"roles.{role.name}.{kind}[{index}]")))
    return Grant(roles=tuple(role.name for _, role in roles), allow=allow, deny=deny)


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
