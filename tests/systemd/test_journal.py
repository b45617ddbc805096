"""On journald's stream, every log line carries its `<N>` priority; elsewhere, none does."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

from ..daemon import Daemon

PRIORITY = re.compile(rb"^<(\d)>(\{.*\})$")


def test_lines_carry_their_priority_on_the_journal_stream(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    d.log.touch()
    st = os.stat(d.log)  # the daemon's stderr is this file: make it "the journal's stream"
    d.extra_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    d.start()
    assert d.auth("alice", "wrong")["error"] == "auth_failed"
    d.stop()
    lines = [PRIORITY.match(line) for line in d.log.read_bytes().splitlines() if line.startswith((b"<", b"{"))]
    assert lines and all(lines), "every structured line is prefixed"
    by_level = {json.loads(m.group(2))["level"]: int(m.group(1)) for m in lines if m}
    assert by_level["info"] == 6 and by_level["warning"] == 4, by_level


def test_no_prefix_elsewhere(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(env={"JOURNAL_STREAM": "1:1"}).start()  # set, but not our stderr
    d.stop()
    assert not [line for line in d.log.read_bytes().splitlines() if line.startswith(b"<")]
    assert d.log_lines("ready")
