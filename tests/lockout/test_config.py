"""The [lockout] table: defaults, validation, and errors that name the key path."""

from __future__ import annotations

import tomllib

import pytest

from authd.errors import ConfigError
from authd.lockout import Limit, LockoutConfig, load_config


def test_defaults_are_safe_and_explicit() -> None:
    config = load_config(None)
    assert config == LockoutConfig()
    assert config.user == Limit(max_failures=5, interval=900, lock_time=600)
    assert config.rhost == Limit(max_failures=20, interval=900, lock_time=600)
    assert not config.progressive
    assert not config.exempt_root
    assert config.exempt_users == () and config.exempt_rhosts == ()
    assert config.max_keys == 100_000 and config.ipv6_prefix == 64


def test_full_table_from_toml() -> None:
    raw = tomllib.loads(
        """
        [lockout]
        user = { max_failures = 3, interval = 60, lock_time = 30 }
        rhost = { max_failures = 0 }
        progressive = true
        max_lock_time = 3600
        exempt_users = ["nagios"]
        exempt_rhosts = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "mail.example.org"]
        exempt_root = true
        """
    )
    config = load_config(raw["lockout"])
    assert config.user == Limit(max_failures=3, interval=60.0, lock_time=30.0)
    assert not config.rhost.enabled
    assert config.progressive and config.max_lock_time == 3600
    assert config.exempt_rhosts[-1] == "mail.example.org"


def test_permanent_lock_needs_explicit_flag() -> None:
    with pytest.raises(ConfigError, match=r"^lockout\.user: lock_time = 0 would never unlock"):
        load_config({"user": {"lock_time": 0}})
    with pytest.raises(ConfigError, match=r"^lockout\.rhost: permanent = true needs lock_time = 0"):
        load_config({"rhost": {"permanent": True}})
    config = load_config({"user": {"lock_time": 0, "permanent": True}})
    assert config.user.permanent


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"user": {"maxfailures": 3}}, r"^lockout\.user: Object contains unknown field `maxfailures`"),
        ({"bogus": 1}, r"^lockout: Object contains unknown field `bogus`"),
        ({"user": {"max_failures": "5"}}, r"^lockout\.user\.max_failures: Expected `int`"),
        ({"user": {"max_failures": -1}}, r"^lockout\.user\.max_failures: Expected `int` >= 0"),
        ({"rhost": {"interval": 0}}, r"^lockout\.rhost\.interval: Expected `float` > 0"),
        ({"rhost": {"interval": float("inf")}}, r"^lockout\.rhost: interval must be a finite"),
        ({"user": {"lock_time": float("nan")}}, r"^lockout\.user\.lock_time: Expected `float` >= 0"),
        ({"exempt_users": ["ok", 7]}, r"^lockout\.exempt_users\[1\]: Expected `str`, got `int`"),
        ({"exempt_users": [""]}, r"^lockout: exempt_users\[0\] is empty"),
        ({"exempt_rhosts": ["10.0.0.0/8", "10.0.0.300"]}, r"^lockout: exempt_rhosts\[1\] is not an IP"),
        ({"exempt_rhosts": ["10.0.0/8"]}, r"^lockout: exempt_rhosts\[0\] is not an IP address, CIDR"),
        ({"exempt_rhosts": ["bad host!"]}, r"^lockout: exempt_rhosts\[0\] is not an IP"),
        (
            {"progressive": True, "max_lock_time": 60, "user": {"lock_time": 120}},
            r"^lockout: user\.lock_time is longer than max_lock_time",
        ),
        ({"exempt_root": "yes"}, r"^lockout\.exempt_root: Expected `bool`"),
        ({"max_keys": 0}, r"^lockout\.max_keys: Expected `int` >= 1"),
        ({"max_keys": 1.5}, r"^lockout\.max_keys: Expected `int`"),
        ({"ipv6_prefix": 0}, r"^lockout\.ipv6_prefix: Expected `int` >= 1"),
        ({"ipv6_prefix": 129}, r"^lockout\.ipv6_prefix: Expected `int` <= 128"),
    ],
)
def test_invalid_tables_name_the_key_path(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(table)


def test_custom_path_prefix_for_embedding() -> None:
    with pytest.raises(ConfigError, match=r"^policy\.lockout\.user\.max_failures: "):
        load_config({"user": {"max_failures": 1.5}}, path="policy.lockout")
