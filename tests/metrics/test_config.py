"""The `[metrics]` table: off by default, loopback unless allowed, which keys need a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from authd import config
from authd.errors import ConfigError
from authd.metrics.config import MetricsConfig, Tcp, Unix, restart_only_changes

SERVICE = '[[service]]\nname = "login"\n'


def metrics(table: str) -> MetricsConfig:
    return config.parse(f"{SERVICE}[metrics]\n{table}\n").metrics


def error_of(table: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(f"{SERVICE}[metrics]\n{table}\n", "authd.toml")
    return str(info.value)


def test_off_by_default() -> None:
    parsed = config.parse(SERVICE).metrics
    assert parsed.listen is None and parsed.endpoint(Path("/etc/authd")) is None
    assert parsed.max_connections == 16 and parsed.timeout == 10.0 and parsed.socket_mode == 0o660


@pytest.mark.parametrize(("listen", "endpoint"), [
    ("127.0.0.1:9464", Tcp("127.0.0.1", 9464)),
    ("127.8.9.10:9464", Tcp("127.8.9.10", 9464)),
    ("[::1]:9464", Tcp("::1", 9464)),
    ("unix:/run/authd/metrics.sock", Unix(Path("/run/authd/metrics.sock"))),
    ("unix:metrics.sock", Unix(Path("/etc/authd/metrics.sock"))),  # beside authd.toml, like every relative path
])
def test_listen_forms(listen: str, endpoint: Tcp | Unix) -> None:
    assert metrics(f'listen = "{listen}"').endpoint(Path("/etc/authd")) == endpoint


def test_remote_addresses_need_allow_remote() -> None:
    for listen in ("0.0.0.0:9464", "192.0.2.1:9464", "[::]:9464"):
        assert error_of(f'listen = "{listen}"').startswith(
            "authd.toml:3: metrics: listen is not a loopback address; set allow_remote = true")
        assert metrics(f'listen = "{listen}"\nallow_remote = true').listen == listen


@pytest.mark.parametrize(("listen", "message"), [
    ("localhost:9464", "the host must be an IP address"),
    ("127.0.0.1", "listen must be `unix:PATH`, `IPV4:PORT` or `[IPV6]:PORT`"),
    ("127.0.0.1:", "listen must be"),
    ("127.0.0.1:65536", "listen must be"),
    ("127.0.0.1:+80", "listen must be"),
    ("::1:9464", "write an IPv6 address in brackets"),
    ("[127.0.0.1]:9464", "write an IPv6 address in brackets"),
    ("unix:", "`unix:` needs a socket path"),
])
def test_bad_listen_values_are_named_not_quoted(listen: str, message: str) -> None:
    error = error_of(f'listen = "{listen}"')
    assert error.startswith("authd.toml:3: metrics: ") and message in error
    assert listen not in error.removeprefix("authd.toml:3: metrics: ") or listen in message


def test_limits_are_bounded() -> None:
    assert "max_connections" in error_of("max_connections = 0")
    assert "max_connections" in error_of("max_connections = 100000")
    assert "timeout" in error_of("timeout = 0")
    assert "timeout" in error_of("timeout = inf")
    assert "unknown field `port`" in error_of("port = 9464")


def test_listen_and_socket_settings_need_a_restart_limits_do_not() -> None:
    base = Path("/etc/authd")
    old = metrics('listen = "unix:metrics.sock"\ntimeout = 5.0')
    assert restart_only_changes(old, metrics('listen = "unix:metrics.sock"\ntimeout = 1.0\nmax_connections = 2'), base, base) == []
    assert restart_only_changes(old, metrics('listen = "unix:/etc/authd/metrics.sock"'), base, base) == [], "same file"
    assert restart_only_changes(old, metrics('listen = "127.0.0.1:9464"'), base, base) == ["metrics.listen"]
    assert restart_only_changes(old, config.parse(SERVICE).metrics, base, base) == ["metrics.listen"]
    changed = metrics('listen = "unix:metrics.sock"\nsocket_mode = 0o600\nsocket_group = "root"')
    assert restart_only_changes(old, changed, base, base) == ["metrics.socket_mode", "metrics.socket_group"]
