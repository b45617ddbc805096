"""authd.toml validation: strict keys, errors with file, line and key path, `check-config`."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from authd import config
from authd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(text, "authd.toml")
    return str(info.value)


def test_example_policy_is_valid() -> None:
    parsed = config.load(ROOT / "authd.toml")
    assert [s.name for s in parsed.service] == ["login"]
    assert parsed.service[0].pam_name == "login"


def test_packaged_policy_is_valid() -> None:
    """/etc/authd/authd.toml of the Debian package (the system stage checks it on a real host)."""
    parsed = config.load(ROOT / "debian" / "authd.toml")
    assert parsed.daemon.state_dir == "/var/lib/authd" and parsed.daemon.socket == "/run/authd/authd.sock"
    assert all(Path(h.path).is_absolute() for h in parsed.handler if getattr(h, "path", None))


def test_defaults_are_safe() -> None:
    parsed = config.parse('[[service]]\nname = "x"\n')
    assert parsed.daemon.socket_mode == 0o660
    assert parsed.daemon.limits.max_line == 64 * 1024
    assert parsed.clients.users == ["*"] and parsed.clients.admin_users == ["root"]
    assert parsed.service[0].pam_name == "x" and parsed.service[0].failure_delay == 2.0


def test_empty_or_truncated_file_is_rejected() -> None:
    assert "no [[service]]" in error_of("")
    assert "no [[service]]" in error_of("[daemon]\nworkers = 2\n")


def test_unknown_key_names_path_and_line() -> None:
    message = error_of('[daemon]\nsocket = "x"\n\n[[service]]\nname = "a"\n\n[[service]]\nname = "b"\nttl = 5\n')
    assert message.startswith("authd.toml:9: service[1].ttl:"), message
    assert "unknown field" in message


def test_wrong_type_names_path_and_line() -> None:
    message = error_of('[daemon]\nworkers = "many"\n')
    assert message.startswith("authd.toml:2: daemon.workers:"), message


def test_nested_table_error_line() -> None:
    message = error_of("[daemon]\n\n[daemon.limits]\nmax_line = 10\n")
    assert message.startswith("authd.toml:4: daemon.limits.max_line:"), message


def test_queue_bound_per_uid_is_validated() -> None:
    assert config.parse('[[service]]\nname = "x"\n').daemon.limits.max_queued_per_uid == 64
    message = error_of("[daemon.limits]\nmax_queued_per_uid = 0\n")
    assert message.startswith("authd.toml:2: daemon.limits.max_queued_per_uid:"), message
    assert "daemon.limits.max_queued_per_uid" in error_of('[daemon.limits]\nmax_queued_per_uid = "lots"\n')


def test_missing_required_field_points_at_table() -> None:
    message = error_of('[[service]]\nname = "a"\n[[service]]\npam_service = "x"\n')
    assert message.startswith("authd.toml:3: service[1]:"), message
    assert "name" in message


def test_toml_syntax_error_has_file_line_and_key() -> None:
    assert error_of("[daemon\nsocket = 1\n").startswith("authd.toml:1: Expected ']'")
    message = error_of('[[service]]\nname = "a"\n\n[daemon]\nsocket = \n')
    assert message.startswith("authd.toml:5: daemon.socket: Invalid value (column 10)"), message
    assert error_of("x = [1,\n").startswith("authd.toml:1: x: "), "an error at the end of the file"


def test_unknown_tables_name_path_and_line() -> None:
    assert error_of('[[service]]\nname = "a"\n\n[deamon]\nworkers = 1\n').startswith("authd.toml:4: deamon: ")
    message = error_of('[[service]]\nname = "a"\n[[service]]\nname = "b"\n[[service.extra]]\nx = 1\n')
    assert message.startswith("authd.toml:5: service[1].extra: "), message


@pytest.mark.parametrize(("limits", "line"), [("max_connections = 8\n", 1), ("max_connections = 20\nadmin_reserve = 20\n", 3)])
def test_admin_reserve_must_leave_room_for_other_clients(limits: str, line: int) -> None:
    message = error_of(f"[daemon.limits]\n{limits}\n[[service]]\nname = \"a\"\n")
    assert message.startswith(f"authd.toml:{line}: daemon.limits.admin_reserve: must be less than `max_connections`"), message
    assert config.parse('[daemon.limits]\nmax_connections = 8\nadmin_reserve = 0\n[[service]]\nname = "a"\n')


def test_duplicate_service_rejected() -> None:
    assert "duplicate service" in error_of('[[service]]\nname = "a"\n[[service]]\nname = "a"\n')


def test_errors_carry_no_values() -> None:
    message = error_of('[daemon]\nsocket_group = ["canary-secret"]\n')
    assert "canary-secret" not in message


@pytest.mark.parametrize(
    ("text", "code"), [("[[service]]\nname = 'login'\n", 0), ("", 1), ("[[service]]\nname = 'x'\nbogus = 1\n", 1),
                       ("not toml [", 1)]
)
def test_check_config_exit_codes(tmp_path: Path, text: str, code: int) -> None:
    path = tmp_path / "authd.toml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "authd", "check-config", "-c", str(path)], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == code, result.stderr
    if code:
        assert str(path) in result.stderr


def test_check_config_rejects_missing_pam_service_and_group(tmp_path: Path) -> None:
    path = tmp_path / "authd.toml"
    path.write_text('[[service]]\nname = "x"\npam_service = "no-such-pam-service"\n')
    result = subprocess.run([sys.executable, "-m", "authd", "check-config", "-c", str(path)], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1 and "service[0].pam_service" in result.stderr
    path.write_text('[[service]]\nname = "x"\npam_service = "login"\nallow_groups = ["no-such-group-zz"]\n')
    result = subprocess.run([sys.executable, "-m", "authd", "check-config", "-c", str(path)], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1 and "service[0].allow_groups[0]" in result.stderr


def _check_and_serve(path: Path) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    run = [sys.executable, "-m", "authd"]
    check = subprocess.run([*run, "check-config", "-c", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    serve = subprocess.run([*run, "serve", "-c", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    return check, serve


@pytest.mark.parametrize(("setting", "prepare", "says"), [
    ('state_dir = "state"', lambda d: (d / "state").mkdir(mode=0o777) or (d / "state").chmod(0o777),
     ":2: daemon.state_dir: "),
    ('log_file = "no-such-dir/authd.log"', lambda d: None, ":2: daemon.log_file: cannot open"),
    ('socket = "taken"', lambda d: (d / "taken").write_text(""), ":2: daemon.socket: "),
    ('socket = "shared/authd.sock"', lambda d: (d / "shared").mkdir() or (d / "shared").chmod(0o777), ":2: daemon.socket: "),
], ids=["state_dir_writable_by_others", "log_dir_missing", "socket_path_not_a_socket", "socket_dir_writable_by_others"])
def test_check_config_refuses_what_serve_refuses(tmp_path: Path, setting: str, prepare: Callable[[Path], object],
                                                 says: str) -> None:
    """`check-config` saying ok must mean `serve` starts: each of serve's start-up checks, both ways."""
    path = tmp_path / "authd.toml"
    path.write_text(f'[daemon]\n{setting}\n\n[[service]]\nname = "login"\n')
    prepare(tmp_path)
    check, serve = _check_and_serve(path)
    assert check.returncode == 1 and f"{path}{says}" in check.stderr, check.stderr
    assert serve.returncode == 1, serve.stderr


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_config_or_config_error(text: str) -> None:
    try:
        config.parse(text)
    except ConfigError:
        pass


_values = st.recursive(
    st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["name", "socket", "max_line", "x"]), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["daemon", "clients", "service", "lockout", "handler", "zzz"]), _values, max_size=3))
def test_any_toml_document_gives_config_or_config_error(doc: dict[str, object]) -> None:
    text = _to_toml(doc)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    try:
        config.parse(text)
    except ConfigError as exc:
        assert str(exc).startswith("authd.toml")


def _to_toml(doc: dict[str, object]) -> str:
    return "\n".join(f"{key} = {_inline(value)}" for key, value in doc.items())


def _inline(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{k} = {_inline(v)}" for k, v in value.items()) + "}"


# Each once escaped config.parse as RecursionError or ValueError, and a SIGHUP with it killed the daemon.
PATHOLOGICAL = {
    "deep-array": "x = " + "[" * 5000 + "]" * 5000 + "\n",
    "deep-inline-table": "x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n",
    "huge-integer": "[daemon]\nworkers = 1" + "0" * 5000 + "\n",
    "deep-in-a-known-key": "[daemon]\nsocket = " + "[" * 5000 + "]" * 5000 + "\n",
}


@pytest.mark.parametrize("text", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_pathological_toml_gives_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(text)
    assert str(info.value).startswith("authd.toml")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["[", "{a = ", "[[", "{"]), st.integers(min_value=1, max_value=3000), st.booleans())
def test_nesting_of_any_depth_gives_config_or_config_error(opener: str, depth: int, closed: bool) -> None:
    closer = {"[": "]", "{a = ": "}", "[[": "]]", "{": "}"}[opener]
    text = "x = " + opener * depth + ("1" + closer * depth if closed else "") + "\n"
    try:
        config.parse(text)
    except ConfigError:
        pass
