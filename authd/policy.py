"""The running policy: a validated config plus what only the live system can tell, frozen.

A reload builds a whole new `Policy` (including its event handlers) before anything is
swapped, so a request always sees one consistent generation from start to finish.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import config as cfg, roles as roles_mod
from .errors import ConfigError
from .events import Handler, HandlerContext, build_handlers
from .metrics.config import restart_only_changes as metrics_restart_only
from .peer import Peer


@dataclass(frozen=True)
class Policy:
    config: cfg.Config
    source: Path
    generation: int
    services: Mapping[str, cfg.Service]
    client_uids: frozenset[int] | None  # None: any uid that can open the socket
    client_gids: frozenset[int]
    admin_uids: frozenset[int]
    admin_gids: frozenset[int]
    subscriber_uids: frozenset[int] = frozenset()
    subscriber_gids: frozenset[int] = frozenset()
    roles: roles_mod.Roles = roles_mod.Roles()
    handlers: tuple[Handler, ...] = field(default=())
    own_uid: int = field(default_factory=os.getuid)  # the uid authd runs as: always client and admin

    @property
    def base_dir(self) -> Path:
        return self.source.parent

    @property
    def daemon(self) -> cfg.Daemon:
        return self.config.daemon

    def path(self, value: str) -> Path:
        return cfg.resolve(self.base_dir, value)

    @property
    def socket_path(self) -> Path:
        return self.path(self.daemon.socket)

    def front_socket(self, section: str) -> Path | None:
        """Where the `saslauthd` or `dovecot` front end binds, or None if it is off."""
        value = getattr(self.config, section).socket
        return self.path(value) if value else None

    @property
    def state_dir(self) -> Path:
        return self.path(self.daemon.state_dir)

    def is_client(self, peer: Peer) -> bool:
        if peer.uid == self.own_uid or self.is_admin(peer):
            return True
        if self.client_uids is None or peer.uid in self.client_uids:
            return True
        return not self.client_gids.isdisjoint(peer.groups)

    def may_subscribe(self, peer: Peer) -> bool:
        """Events name users and addresses: only admins and the listed subscribers may stream them."""
        return self.is_admin(peer) or peer.uid in self.subscriber_uids or not self.subscriber_gids.isdisjoint(peer.groups)

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid == self.own_uid or peer.uid in self.admin_uids or not self.admin_gids.isdisjoint(peer.groups)

    def permits(self, service: cfg.Service, user: str, groups: Iterable[str] | None) -> bool:
        """Deny rules win; empty allow lists allow everyone; `*` matches any user. `groups`
        None (not looked up) fails closed where a rule reads them (see `reads_groups`)."""
        if groups is None:
            if reads_groups(service):
                return False
            groups = ()
        groups = set(groups)
        if user in service.deny_users or "*" in service.deny_users or groups & set(service.deny_groups):
            return False
        if not service.allow_users and not service.allow_groups:
            return True
        return user in service.allow_users or "*" in service.allow_users or bool(groups & set(service.allow_groups))


def reads_groups(service: cfg.Service) -> bool:
    """Whether `Policy.permits` needs the user's groups for `service`: a login that asks the
    worker to skip the lookup must not come here with rules that read them."""
    return bool(service.allow_groups or service.deny_groups)


def load(source: Path, generation: int, *, build: bool = True, state_dir: Path | None = None) -> Policy:
    """Parse, validate and (with `build`) construct handlers: the one routine behind start,
    SIGHUP, `authctl reload` and `authd check-config`.

    A reload passes the running daemon's `state_dir`: that setting needs a restart, and the new
    handlers must keep their state where the stores and `authctl lastlog` keep looking.
    """
    source = source.resolve()
    config = cfg.load(source)
    try:
        policy = Policy(
            config=config,
            source=source,
            generation=generation,
            services={s.name: s for s in config.service},
            client_uids=None if "*" in config.clients.users else _uids(config.clients.users, "clients.users"),
            client_gids=_gids(config.clients.groups, "clients.groups"),
            admin_uids=_uids(config.clients.admin_users, "clients.admin_users"),
            admin_gids=_gids(config.clients.admin_groups, "clients.admin_groups"),
            subscriber_uids=_uids(config.clients.subscribe_users, "clients.subscribe_users"),
            subscriber_gids=_gids(config.clients.subscribe_groups, "clients.subscribe_groups"),
            roles=roles_mod.build(config.roles, services={s.name for s in config.service}),
        )
        _check_system(policy)
        handlers = build_handlers(config.handler, HandlerContext(state_dir=state_dir or policy.state_dir, base_dir=policy.base_dir))
    except ConfigError as exc:
        raise cfg.located(exc, source) from None
    if not build:
        for handler in handlers:
            handler.close()
        handlers = []
    return replace(policy, handlers=tuple(handlers))


def restart_only_changes(old: Policy, new: Policy) -> list[str]:
    """Settings a reload cannot apply to a running daemon; reported, never half-applied."""
    keys = ("socket", "socket_mode", "socket_group", "state_dir", "workers", "worker_max_calls", "pam_keep_modules", "log_file",
            "event_log")
    changed = [f"daemon.{k}" for k in keys if getattr(old.daemon, k) != getattr(new.daemon, k) and not _same_path(old, new, k)]
    changed += [f"{s}.socket" for s in ("saslauthd", "dovecot") if old.front_socket(s) != new.front_socket(s)]
    return changed + metrics_restart_only(old.config.metrics, new.config.metrics, old.base_dir, new.base_dir)


def _same_path(old: Policy, new: Policy, key: str) -> bool:
    if key not in ("socket", "state_dir", "log_file"):
        return False
    a, b = getattr(old.daemon, key), getattr(new.daemon, key)
    return a is not None and b is not None and old.path(a) == new.path(b)


def _uids(principals: Iterable[Any], where: str) -> frozenset[int]:
    return _ids(principals, where, "user", lambda name: pwd.getpwnam(name).pw_uid)


def _gids(principals: Iterable[Any], where: str) -> frozenset[int]:
    return _ids(principals, where, "group", lambda name: grp.getgrnam(name).gr_gid)


def _ids(principals: Iterable[Any], where: str, kind: str, lookup: Callable[[str], int]) -> frozenset[int]:
    """Names or numeric ids to ids; a name NSS does not know is a config error."""
    ids = set()
    for i, principal in enumerate(principals):
        try:
            ids.add(principal if isinstance(principal, int) else lookup(principal))
        except KeyError:
            raise ConfigError(f"{where}[{i}]: no such {kind}") from None
    return frozenset(ids)


def _check_system(policy: Policy) -> None:
    for i, service in enumerate(policy.config.service):
        for key in ("allow_groups", "deny_groups"):
            _gids(getattr(service, key), f"service[{i}].{key}")
        if not pam_service_exists(service.pam_name):
            raise ConfigError(f"service[{i}].pam_service: no PAM service file {service.pam_name!r} in {', '.join(map(str, pam_dirs()))}")
    if policy.daemon.socket_group is not None:
        _gids([policy.daemon.socket_group], "daemon.socket_group")
    if policy.config.metrics.socket_group is not None:
        _gids([policy.config.metrics.socket_group], "metrics.socket_group")


def pam_dirs() -> list[Path]:
    """Where libpam looks for service files (pam_wrapper redirects it in tests)."""
    if os.environ.get("PAM_WRAPPER") == "1" and os.environ.get("PAM_WRAPPER_SERVICE_DIR"):
        return [Path(os.environ["PAM_WRAPPER_SERVICE_DIR"])]
    return [Path("/etc/pam.d"), Path("/usr/lib/pam.d")]


def pam_service_exists(name: str) -> bool:
    return "/" not in name and any((d / name).is_file() for d in pam_dirs())
