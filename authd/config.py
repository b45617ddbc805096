"""authd.toml: strict schema, loading, and the line locator behind its error messages.

Loading is pure (file in, frozen structs out) so that `authd check-config`, SIGHUP and
`authctl reload` share one code path; checks that need the running system (groups, PAM
service files) live in `authd.policy`.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from .cache import CacheConfig
from .errors import ConfigError
from .events.config import HandlerConfig
from .lockout import LockoutConfig
from .metrics import MetricsConfig
from .roles import RoleConfig
from .securefs import resolve as resolve
from .stores.config import StoreConfig

Seconds = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(gt=0)]
Principal = str | int  # a user or group, by name or by numeric id


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Limits(_Section):
    max_line: Annotated[int, msgspec.Meta(ge=256)] = 64 * 1024
    max_connections: Positive = 1024
    max_connections_per_uid: Positive = 256
    admin_reserve: Annotated[int, msgspec.Meta(ge=0)] = 8  # of max_connections, kept for admin peers
    max_inflight: Positive = 32
    max_queued_per_uid: Positive = 64
    idle_timeout: Seconds = 300.0
    request_timeout: Seconds = 30.0
    write_buffer: Annotated[int, msgspec.Meta(ge=4096)] = 1024 * 1024


class Daemon(_Section):
    socket: str = "authd.sock"
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o660
    socket_group: str | None = None
    state_dir: str = "state"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_file: str | None = None
    workers: Annotated[int, msgspec.Meta(ge=0)] = 0
    worker_max_calls: Positive = 10_000
    pam_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    pam_keep_modules: bool = True  # workers keep PAM modules loaded between calls (authd.pam.modulepins)
    drain_timeout: Annotated[float, msgspec.Meta(gt=0)] = 20.0
    dump_keep: Positive = 5
    event_queue: Positive = 1000
    handler_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    event_log: bool = True  # false: events live in memory only, as before the outbox (a crash loses them)
    event_log_max_age: Annotated[float, msgspec.Meta(gt=0)] = 7 * 86400.0
    event_log_max_events: Annotated[int, msgspec.Meta(ge=1000)] = 1_000_000
    sweep_interval: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    limits: Limits = Limits()


class Clients(_Section):
    """Which peers (by SO_PEERCRED uid/gid) may connect, and which may use admin ops.

    The uid the daemon runs as is always both: it owns the state anyway.
    """

    users: list[Principal] = msgspec.field(default_factory=lambda: ["*"])
    groups: list[Principal] = []
    admin_users: list[Principal] = msgspec.field(default_factory=lambda: ["root"])
    admin_groups: list[Principal] = []
    subscribe_users: list[Principal] = []  # may stream events (`subscribe`); admins always may
    subscribe_groups: list[Principal] = []


class Service(_Section):
    name: str
    pam_service: str | None = None
    allow_users: list[str] = []
    allow_groups: list[str] = []
    deny_users: list[str] = []
    deny_groups: list[str] = []
    session_ttl: Annotated[float, msgspec.Meta(gt=0)] = 8 * 3600.0
    idle_timeout: Seconds = 3600.0
    failure_delay: Seconds = 2.0
    max_sessions_per_user: Positive = 100
    session_limit: Literal["refuse", "evict_oldest"] = "evict_oldest"

    @property
    def pam_name(self) -> str:
        return self.pam_service or self.name


class Saslauthd(_Section):
    """Cyrus saslauthd's protocol on its own socket (off unless `socket` is set or systemd
    passes a socket named `saslauthd`). `services` maps a request's service (`smtp`, `imap`)
    to a [[service]] name; unmapped ones are looked up as they are. `append_realm` does what
    saslauthd -r does: login `u` with realm `r` becomes user `u@r`."""

    socket: str | None = None
    services: dict[str, str] = {}
    append_realm: bool = False


class Dovecot(_Section):
    """Dovecot's auth-client protocol on its own socket (Postfix, Exim). `require_secured`
    refuses the plaintext mechanisms (PLAIN, LOGIN) on connections the client did not mark
    `secured` (TLS), as Dovecot's `disable_plaintext_auth` does."""

    socket: str | None = None
    services: dict[str, str] = {}
    require_secured: bool = False


class Config(_Section):
    daemon: Daemon = Daemon()
    clients: Clients = Clients()
    service: list[Service] = []
    lockout: LockoutConfig = LockoutConfig()
    handler: list[HandlerConfig] = []
    saslauthd: Saslauthd = Saslauthd()
    dovecot: Dovecot = Dovecot()
    cache: CacheConfig = CacheConfig()
    metrics: MetricsConfig = MetricsConfig()
    store: StoreConfig = StoreConfig()
    roles: dict[str, RoleConfig] = {}


def parse(text: str, source: str = "authd.toml") -> Config:
    """Parse and validate TOML text; errors name the source, line and key path, never a value."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_located(str(exc), text, source)) from None
    except ValueError:  # tomllib's int() of a number over Python's 4300-digit limit
        raise ConfigError(f"{source}: a number has too many digits") from None
    except RecursionError:
        raise ConfigError(f"{source}: arrays or tables nested too deeply") from None
    try:
        _convert_roles(raw, text, source)
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_located(str(exc), text, source)) from None
    except RecursionError:
        raise ConfigError(f"{source}: arrays or tables nested too deeply") from None
    if not config.service:
        # An empty or truncated file (a SIGHUP while an editor rewrites it) must not become a
        # policy that refuses every login.
        raise ConfigError(f"{source}: no [[service]] defined; authd would refuse every login")
    _check_services(config, text, source)
    _check_limits(config, text, source)
    return config


def load(path: str | os.PathLike[str]) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc.__class__.__name__}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse(text, str(path))


_LEADING_PATH = re.compile(r"^([A-Za-z_][\w-]*(?:\[\d+\])?(?:\.[A-Za-z_][\w-]*(?:\[\d+\])?)*): ")


def located(exc: ConfigError, source: Path) -> ConfigError:
    """Prefix `file:line:` to an error that starts with a key path (checks made after parsing)."""
    message = str(exc)
    match = _LEADING_PATH.match(message)
    if not match:
        return exc if message.startswith(str(source)) else ConfigError(f"{source}: {message}")
    try:
        line = find_line(source.read_text(encoding="utf-8"), match.group(1))
    except (OSError, UnicodeDecodeError):
        line = None
    return ConfigError(f"{source}:{line}: {message}" if line else f"{source}: {message}")


def _check_services(config: Config, text: str, source: str) -> None:
    seen: set[str] = set()
    for i, service in enumerate(config.service):
        if service.name in seen:
            path = f"service[{i}].name"
            raise ConfigError(_located(f"duplicate service name - at `$.{path}`", text, source))
        seen.add(service.name)
        if "\0" in service.name or not service.name:
            raise ConfigError(_located(f"invalid service name - at `$.service[{i}].name`", text, source))
    for section in ("saslauthd", "dovecot"):
        for name, target in getattr(config, section).services.items():
            if target not in seen:
                raise ConfigError(_located(f"no [[service]] named like this - at `$.{section}.services.{name}`", text, source))


def _check_limits(config: Config, text: str, source: str) -> None:
    limits = config.daemon.limits
    if limits.admin_reserve >= limits.max_connections:
        message = "must be less than `max_connections`, or no other client could connect - at `$.daemon.limits.admin_reserve`"
        raise ConfigError(_located(message, text, source))


def _convert_roles(raw: dict[str, object], text: str, source: str) -> None:
    """Convert each `[roles.NAME]` on its own first: msgspec reports an error inside a table of
    tables at `$.roles[...]`, which would not say which role is wrong."""
    roles = raw.get("roles")
    if not isinstance(roles, dict):
        return
    for name, body in roles.items():
        try:
            msgspec.convert(body, RoleConfig)
        except msgspec.ValidationError as exc:
            message = str(exc)
            message = message.replace(" - at `$", f" - at `$.roles.{name}", 1) if " - at `$" in message else f"{message} - at `$.roles.{name}`"
            raise ConfigError(_located(message, text, source)) from None


_PATH = re.compile(r" - at `\$\.?([^`]*)`")


def _located(message: str, text: str, source: str) -> str:
    """Turn msgspec's `... - at `$.a[1].b`` into `source:LINE: a[1].b: ...`."""
    match = _PATH.search(message)
    unknown = _UNKNOWN.search(message)
    if not match and not unknown:
        return f"{source}: {message}"
    key_path = match.group(1) if match else ""  # an unknown top-level table has no `$` path
    if unknown:
        key_path = f"{key_path}.{unknown.group(1)}" if key_path else unknown.group(1)
    detail = message[: match.start()] + message[match.end() :] if match else message
    line = find_line(text, key_path)
    where = f"{source}:{line}" if line else source
    return f"{where}: {key_path}: {detail}"


_SYNTAX_AT = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


def _syntax_located(message: str, text: str, source: str) -> str:
    """tomllib's `... (at line 3, column 9)` as `source:3: daemon.socket: ... (column 9)`.

    The key path is named when the line is a `key = value` line; for a broken table header
    the line says enough.
    """
    match = _SYNTAX_AT.search(message)
    if not match:
        return f"{source}: {message}"
    lines = text.splitlines()
    lineno = int(match.group(1)) if match.group(1) else max(len(lines), 1)
    detail = message[: match.start()] + (f" (column {match.group(2)})" if match.group(2) else " (at end of file)")
    table = ""
    for line in lines[: lineno - 1]:
        if header := _HEADER.match(line):
            table = header.group(2).strip()
    key = _KEY.match(lines[lineno - 1]) if lineno <= len(lines) else None
    if key is None:
        return f"{source}:{lineno}: {detail}"
    name = key.group(1).strip("\"'")
    return f"{source}:{lineno}: {f'{table}.{name}' if table else name}: {detail}"


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]#]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')\s*=")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


def find_line(text: str, key_path: str) -> int | None:
    """Best-effort 1-based line of a key path like `service[1].session_ttl`.

    Follows table headers and counts array-of-tables entries: enough to point an operator at
    the right line, which is all an error message needs. Falls back to the enclosing table.
    """
    counts: dict[str, int] = {}
    table = ""
    best: int | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if header := _HEADER.match(line):
            name = ""
            parts = [part.strip().strip("\"'") for part in header.group(2).split(".")]
            for i, part in enumerate(parts):
                name = f"{name}.{part}" if name else part
                if i < len(parts) - 1 and name in counts:  # [[service.x]] belongs to the last [[service]]
                    name = f"{name}[{counts[name]}]"
            if header.group(1) == "[[":
                counts[name] = counts.get(name, -1) + 1
                name = f"{name}[{counts[name]}]"
            here = table = name
        elif key := _KEY.match(line):
            name = key.group(1).strip("\"'")
            here = f"{table}.{name}" if table else name
        else:
            continue
        if here == key_path or here.startswith(key_path + "["):
            return lineno
        if key_path.startswith((here + ".", here + "[")):
            best = lineno
    return best
