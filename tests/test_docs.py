"""Every code block in the README and docs/ that is meant to run is run here.

TOML blocks are validated as authd.toml (a fragment gets a minimal `[[service]]` added), JSON
blocks are decoded (an event as an `Event`), and each Python block is executed by the check
registered for it below, against a real daemon where it talks to one. A Python block that no
check claims fails the suite, so a new example cannot be left untested. A block preceded by
`<!-- not run: REASON -->` is exempt, with its reason in the source. Shell blocks are
transcripts of commands against a running daemon or the machine; the README's commands are run
in a pristine container by the system stage.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import re
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from authd.config import parse
from authd.events import Event, HandlerContext

from .daemon import PASSWORD, Daemon

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
_EXEMPT = re.compile(r"<!-- not run: [^>]+ -->\s*$")
MINIMAL_SERVICE = '\n[[service]]\nname = "login"\n'


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(lang: str) -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            before = text[: match.start()]
            if match.group(1) == lang and not _EXEMPT.search(before.rstrip("\n") + "\n"):
                found.append(Block(path, before.count("\n") + 1, lang, match.group(2)))
    return found


@pytest.mark.parametrize("block", blocks("toml"), ids=str)
def test_toml_blocks_are_valid_authd_toml(block: Block) -> None:
    if "[project" in block.text:  # a plugin's pyproject.toml, not authd's
        assert tomllib.loads(block.text)
        return
    text = block.text if "[[service]]" in block.text else block.text + MINIMAL_SERVICE
    parse(text, str(block))


@pytest.mark.parametrize("block", blocks("json"), ids=str)
def test_json_blocks_decode(block: Block) -> None:
    value = msgspec.json.decode(block.text.encode())
    if isinstance(value, dict) and "name" in value and "id" in value:
        msgspec.convert(value, Event)


def test_the_logrotate_example_is_the_packaged_file() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    start = text.index("```\n/var/log/authd/") + 4
    assert text[start : text.index("```\n", start)] == (ROOT / "debian" / "authd.logrotate").read_text()


# -- Python blocks: one check per example, found by a line only that example has ---------------

Check = Callable[[dict[str, Any], Any], None]
CHECKS: dict[str, Check] = {}


def check(marker: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS[marker] = fn
        return fn

    return register


def test_every_python_block_has_a_check() -> None:
    unclaimed = [str(b) for b in blocks("python") if not [m for m in CHECKS if m in b.text]]
    assert not unclaimed, f"python blocks that no test runs (add a check, or mark `<!-- not run: why -->`): {unclaimed}"


@pytest.mark.parametrize("block", blocks("python"), ids=str)
def test_python_block(block: Block, request: pytest.FixtureRequest) -> None:
    claims = [fn for marker, fn in CHECKS.items() if marker in block.text]
    if not claims:
        pytest.skip("unclaimed; reported by test_every_python_block_has_a_check")
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(block.text, str(block), "exec"), namespace)
    claims[0](namespace, request)


@check("def login(user: str, password: str)")
def _client_example(ns: dict[str, Any], request: pytest.FixtureRequest) -> None:
    daemon: Daemon = request.getfixturevalue("daemon")
    request.getfixturevalue("monkeypatch").chdir(daemon.sock_dir)  # the example says "authd.sock"
    token = ns["login"]("alice", PASSWORD)
    assert token
    assert asyncio.run(ns["whoami"](token)) == "alice"
    assert ns["login"]("alice", "wrong") is None


@check("def verify(body: bytes, header: str, key: bytes)")
def _webhook_verify(ns: dict[str, Any], request: pytest.FixtureRequest) -> None:
    body, key = b'{"name":"auth.failed"}', b"k"
    good = "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
    assert ns["verify"](body, good, key)
    assert not ns["verify"](body + b" ", good, key)


@check("def on_login(event: Event)")
def _python_handler(ns: dict[str, Any], request: pytest.FixtureRequest) -> None:
    ns["on_login"](Event.create("auth.succeeded", user="alice", service="imap"))


@check("class SlackNotifier")
def _plugin(ns: dict[str, Any], request: pytest.FixtureRequest) -> None:
    tmp: Path = request.getfixturevalue("tmp_path")
    with _http_sink() as (url, bodies):
        (tmp / "slack.url").write_text(url + "\n")
        notifier = ns["SlackNotifier"](HandlerContext(state_dir=tmp, base_dir=tmp), webhook_url_file="slack.url")
        notifier(Event.create("auth.locked_out", user="alice", service="imap", rhost="192.0.2.7"))
        notifier.reopen()
        notifier.close()
    assert msgspec.json.decode(bodies[0]) == {"channel": "#auth", "text": "auth.locked_out: alice via imap from 192.0.2.7"}


@check("def remember_login(event: Event)")
def _receivers(ns: dict[str, Any], request: pytest.FixtureRequest) -> None:
    receivers = ns["receivers"]
    assert [r.fn for r in receivers._receivers] == [ns["remember_login"], ns["alert"]]
    login = Event.create("auth.succeeded", user="alice", service="webmail", rhost="192.0.2.7")
    assert [r.wants(login) for r in receivers._receivers] == [True, False]
    ns["remember_login"](login)
    asyncio.run(ns["alert"](Event.create("auth.locked_out", user="alice")))


class _Sink(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes]

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class _http_sink:  # noqa: N801 (used as a context manager)
    def __enter__(self) -> tuple[str, list[bytes]]:
        handler = type("Sink", (_Sink,), {"bodies": []})
        self.server = http.server.HTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_port}/hook", handler.bodies

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
