"""`[store]`: bad values are refused with a clear error; the fleet key must be private."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from authd.config import parse
from authd.errors import ConfigError
from authd.stores.redis import read_secret

SERVICE = '\n[[service]]\nname = "login"\n'


@pytest.mark.parametrize("line", ['backend = "mysql"', 'prefix = "a b"', "timeout = 0", "timeout = 61",
                                  'on_store_error = "open"', "near_cache = -1", "connections = 0", "lease = 0"])
def test_bad_store_settings_are_refused(line: str) -> None:
    with pytest.raises(ConfigError, match="store"):
        parse(f"[store]\n{line}\n{SERVICE}")


def test_the_default_is_sqlite() -> None:
    assert parse(SERVICE).store.backend == "sqlite"


def test_the_fleet_key_must_be_private_long_enough_and_no_symlink(tmp_path: Path) -> None:
    key = tmp_path / "fleet.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_secret(key)
    key.chmod(0o600)
    assert len(read_secret(key)) == 32
    (tmp_path / "link").symlink_to(key)
    with pytest.raises(ConfigError, match="symbolic link"):
        read_secret(tmp_path / "link")
    key.write_bytes(b"short")
    with pytest.raises(ConfigError, match="at least 32"):
        read_secret(key)
    with pytest.raises(ConfigError, match="cannot open"):
        read_secret(tmp_path / "missing")
