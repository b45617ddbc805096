"""The `[metrics]` table: where the Prometheus endpoint listens, and its limits.

Off unless `listen` is set. A TCP address must be an IP literal (no DNS lookup at load) and
loopback unless `allow_remote = true`: the endpoint has no authentication or TLS, and what it
shows (login rates, failures, locks) helps an attacker tune a password-guessing run.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from ..securefs import resolve

UNIX_PREFIX = "unix:"


@dataclass(frozen=True)
class Tcp:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Unix:
    path: Path

    def __str__(self) -> str:
        return f"{UNIX_PREFIX}{self.path}"


Endpoint = Tcp | Unix


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """`listen`, `socket_mode` and `socket_group` need a restart; the limits (`max_connections`,
    `timeout`) apply to connections accepted after a reload."""

    listen: str | None = None
    allow_remote: bool = False
    socket_mode: Annotated[int, Meta(ge=0, le=0o777)] = 0o660
    socket_group: str | None = None
    max_connections: Annotated[int, Meta(gt=0, le=1024)] = 16
    timeout: Annotated[float, Meta(gt=0)] = 10.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.timeout):
            raise ValueError("timeout must be a finite number of seconds")
        if self.listen is None:
            return
        address = parse_listen(self.listen)
        if isinstance(address, Tcp) and not self.allow_remote and not ipaddress.ip_address(address.host).is_loopback:
            raise ValueError("listen is not a loopback address; set allow_remote = true to serve metrics to other hosts")

    def endpoint(self, base_dir: Path) -> Endpoint | None:
        """Where to listen, with a relative socket path taken from the config file's directory."""
        if self.listen is None:
            return None
        address = parse_listen(self.listen)
        if isinstance(address, Unix):
            return Unix(resolve(base_dir, str(address.path)))
        return address


def parse_listen(value: str) -> Endpoint:
    """`unix:PATH`, `IPV4:PORT` or `[IPV6]:PORT`; ValueError (naming no value) otherwise."""
    if value.startswith(UNIX_PREFIX):
        path = value[len(UNIX_PREFIX):]
        if not path or "\0" in path:
            raise ValueError("listen: `unix:` needs a socket path")
        return Unix(Path(path))
    host, sep, port = value.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError("listen must be `unix:PATH`, `IPV4:PORT` or `[IPV6]:PORT`")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        version = 6
    else:
        version = 4
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("listen: the host must be an IP address (`127.0.0.1`, `[::1]`), not a name") from None
    if ip.version != version:
        raise ValueError("listen: write an IPv6 address in brackets, `[::1]:PORT`")
    return Tcp(str(ip), int(port))


def restart_only_changes(old: MetricsConfig, new: MetricsConfig, old_base: Path, new_base: Path) -> list[str]:
    keys = []
    if old.endpoint(old_base) != new.endpoint(new_base):
        keys.append("metrics.listen")
    keys += [f"metrics.{k}" for k in ("socket_mode", "socket_group") if getattr(old, k) != getattr(new, k)]
    return keys
