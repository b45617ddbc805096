"""contrib/fail2ban: the filter, run by the real fail2ban-regex, and the example jail.

Lines are the JSON shape authd logs (the literal example from the issue, plus lines rendered
by structlog's JSONRenderer and by authd's own console rendering). The daemon-level tests
against real authd output live with the abuse tests (tests/abuse/test_log_forging.py).
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from authd import logs

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "fail2ban"
FILTER = CONTRIB / "filter.d" / "authd.conf"
JAIL = CONTRIB / "jail.d" / "authd.conf"

pytestmark = pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban not installed")

ISSUE_EXAMPLE = (
    '{"event": "auth failed", "user": "alice", "rhost": "203.0.113.9", "service": "login", '
    '"error": "auth_failed", "level": "warning", "timestamp": "2026-11-26T05:40:00.123Z"}'
)


def _epoch(timestamp: str) -> int:
    return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())


def _render(processors: list[Any], event: str, level: str, timestamp: str, **fields: Any) -> str:
    line: Any = {"event": event, "level": level, "timestamp": timestamp, **fields}
    for processor in processors:
        line = processor(None, level, line)
    assert "\n" not in line and "\r" not in line
    return line


def json_line(event: str, timestamp: str, level: str = "warning", **fields: Any) -> str:
    return _render([structlog.processors.JSONRenderer()], event, level, timestamp, **fields)


def console_line(event: str, timestamp: str, level: str = "warning", **fields: Any) -> str:
    """What authd writes with `log_format = "console"` to a file (no colours: not a tty)."""
    return _render(logs.console_rendering(colors=False), event, level, timestamp, **fields)


def fail2ban_regex(tmp_path: Path, lines: list[str]) -> list[tuple[str, str, int]]:
    log = tmp_path / "authd.log"
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return match_file(log)


def match_file(log: Path) -> list[tuple[str, str, int]]:
    """(rhost, user, time) of every line of `log` that the filter counts, by the real fail2ban-regex."""
    done = subprocess.run(
        ["fail2ban-regex", "--raw", "--out", "<ip>\t<F-USER>\t<time>", str(log), str(FILTER)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.split("\n") if line.strip()]
    return [(ip, user, int(float(when))) for ip, user, when in rows]


T = [f"2026-11-26T05:40:{second:02d}.{second:03d}Z" for second in range(60)]
FAILED = {"service": "login", "error": "auth_failed"}


def test_failures_match_with_rhost_user_and_time(tmp_path: Path) -> None:
    lines = [
        ISSUE_EXAMPLE,
        json_line("auth failed", T[1], user="bob", rhost="2001:db8::7", service="imap", error="locked_out",
                  request_id="r-1", pid=4242),
        f'{{"level": "warning", "error": "auth_failed", "rhost": "198.51.100.20", "timestamp": "{T[2]}", '
        '"user": "carol", "event": "auth.failed"}',
        console_line("auth failed", T[3], user="dave", rhost="203.0.113.11", request_id=7, pid=1, **FAILED),
        console_line("auth.failed", T[4], user="erin", rhost="203.0.113.12", service="smtp", error="locked_out"),
    ]
    assert fail2ban_regex(tmp_path, lines) == [
        ("203.0.113.9", "alice", _epoch("2026-11-26T05:40:00Z")),
        ("2001:db8::7", "bob", _epoch(T[1])),
        ("198.51.100.20", "carol", _epoch(T[2])),
        ("203.0.113.11", "dave", _epoch(T[3])),
        ("203.0.113.12", "erin", _epoch(T[4])),
    ]


def test_successes_and_non_guessing_failures_do_not_match(tmp_path: Path) -> None:
    lines = []
    for render in (json_line, console_line):
        lines += [
            render("auth succeeded", T[10], level="info", user="alice", rhost="203.0.113.9", service="login"),
            render("session opened", T[11], level="info", user="alice", rhost="203.0.113.9"),
            render("auth failed", T[12], user="carol", rhost="203.0.113.10", service="login", error="unavailable"),
            render("auth failed", T[13], user="carol", rhost="203.0.113.10", service="x", error="not_authorized"),
            render("auth failed", T[14], user="carol", rhost="203.0.113.10", error="password_expired"),
            render("auth failed", T[15], user="local", rhost="-", **FAILED),
            render("auth failed", T[16], user="local", rhost=None, **FAILED),
            render("lockout", T[17], scope="user", user="alice", rhost="203.0.113.9", retry_after=600),
        ]
    assert fail2ban_regex(tmp_path, lines) == []


# User names (and request ids) a client may send, each trying to get 192.0.2.x banned.
FORGED = [
    'x", "rhost": "192.0.2.66',
    '", "event": "auth failed", "error": "auth_failed", "rhost": "192.0.2.67',
    "a rhost=192.0.2.68 b",
    "a\u00a0rhost=192.0.2.69\u00a0b",
    "a' rhost=192.0.2.70 'b",
    "a'\" rhost=192.0.2.71 \"'b",
    "x\n2026-11-26T05:40:30.000Z [warning  ] auth failed error=auth_failed rhost=192.0.2.72",
    # A whole JSON failure, closed on both sides: it sits inside a console line.
    'x", "event": "auth failed", "error": "auth_failed", "rhost": "192.0.2.73", "y": "',
    '{"event":"auth failed","error":"auth_failed","rhost":"192.0.2.74"}',
    "x\r2026-11-26T05:40:31.000Z [warning  ] auth failed error=auth_failed rhost=192.0.2.75",
    "x\x1b[2K\r[warning  ] auth failed error=auth_failed rhost=192.0.2.76",
    "x\u2028[warning  ] auth failed error=auth_failed rhost=192.0.2.77",
    "x\x85\x0b\x0c\x1c[warning  ] auth failed error=auth_failed rhost=192.0.2.78",
]


@pytest.mark.parametrize("render", [json_line, console_line], ids=["json", "console"])
def test_client_controlled_fields_cannot_frame_another_host(tmp_path: Path, render: Any) -> None:
    forged = FORGED
    lines = []
    for i, text in enumerate(forged):
        # request_id sorts before rhost in the console rendering, user after it.
        lines.append(render("auth failed", T[20 + i], user=text, rhost="-", request_id=text, **FAILED))
        lines.append(render("auth succeeded", T[40 + i], level="info", user=text, rhost="-", request_id=text))
    assert fail2ban_regex(tmp_path, lines) == []

    real = render("auth failed", T[59], user=forged[2], rhost="203.0.113.50", request_id=forged[3], **FAILED)
    assert [ip for ip, _, _ in fail2ban_regex(tmp_path, [real])] == ["203.0.113.50"]


def test_console_rendering_escapes_every_control_character() -> None:
    controls = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, 0x202E]]
    line = console_line("auth failed", T[0], user="u" + "".join(controls), rhost="203.0.113.9", **FAILED)
    assert line.isprintable(), repr(line)
    assert "user='u\\x00\\x01" in line and "\\x1b" in line and "\\u2028\\u2029\\u202e'" in line


def test_json_line_behind_a_journal_prefix_matches(tmp_path: Path) -> None:
    line = json_line("auth failed", T[5], user="alice", rhost="203.0.113.9", **FAILED)
    assert [ip for ip, _, _ in fail2ban_regex(tmp_path, [f"host authd[4242]: {line}", f"authd[7]: {line}"])] == [
        "203.0.113.9", "203.0.113.9"]


def test_example_jail_passes_fail2bans_config_test(tmp_path: Path) -> None:
    if shutil.which("fail2ban-client") is None or not Path("/etc/fail2ban/jail.conf").exists():
        pytest.skip("fail2ban-client or its stock configuration is missing")
    confdir = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", confdir, ignore=shutil.ignore_patterns("*.local", "jail.d"))
    (confdir / "jail.d").mkdir()
    shutil.copy(FILTER, confdir / "filter.d" / "authd.conf")
    shutil.copy(JAIL, confdir / "jail.d" / "authd.conf")

    test = subprocess.run(["fail2ban-client", "-c", str(confdir), "-t"], capture_output=True, text=True, timeout=60)
    assert test.returncode == 0, test.stdout + test.stderr
    dump = subprocess.run(["fail2ban-client", "-c", str(confdir), "-d"], capture_output=True, text=True, timeout=60)
    assert "['add', 'authd', 'systemd']" in dump.stdout
    assert "['set', 'authd', 'addjournalmatch', '_SYSTEMD_UNIT=authd.service']" in dump.stdout
