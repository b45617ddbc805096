"""``[[handler]]`` tables: strict decoding, and build_handlers' checks before any swap."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from authd.errors import ConfigError
from authd.events import HandlerContext, build_handlers

from .conftest import decode
from .conftest import from_toml as build

SECRET = "s3cr3t-do-not-print"


ALL = """
[[handler]]
type = "audit"
path = "audit.jsonl"

[[handler]]
type = "lastlog"
events = ["auth.*"]

[[handler]]
type = "webhook"
url = "https://hooks.example.org/authd?x=1"
events = ["auth.failed", "auth.locked_out"]

[[handler]]
type = "mail"
from = "authd <authd@example.org>"
to = "{user}@example.org"
subject = "Welcome, {user}"
body = "First login via {service} from {rhost} at {time}."

[[handler]]
type = "exec"
command = ["true"]
services = ["imap"]

[[handler]]
type = "python"
name = "json"
callable = "json:dumps"
"""


def test_every_type_builds_without_touching_the_disk(ctx: HandlerContext) -> None:
    handlers = build(ALL, ctx)
    assert [h.name for h in handlers] == ["audit", "lastlog", "webhook", "mail", "exec", "json"]
    assert handlers[1].events == ("auth.*",) and handlers[4].services == frozenset({"imap"})
    assert not (ctx.base_dir / "audit.jsonl").exists() and not ctx.state_dir.exists()


def test_configs_are_frozen_and_strict() -> None:
    (cfg,) = decode('[[handler]]\ntype = "audit"\npath = "a"\n')
    with pytest.raises(AttributeError):
        cfg.path = "b"  # type: ignore[misc]
    for toml, where in [
        ('[[handler]]\ntype = "audit"\npath = "a"\nbogus = 1\n', "unknown field `bogus`"),
        ('[[handler]]\ntype = "telepathy"\n', "Invalid value 'telepathy'"),
        ('[[handler]]\ntype = "audit"\n', "missing required field `path`"),
        ('[[handler]]\ntype = "audit"\npath = "a"\nevents = []\n', "$.handler[0].events"),
        ('[[handler]]\ntype = "exec"\ncommand = ["true"]\nservices = []\n', "$.handler[0].services"),
        ('[[handler]]\ntype = "webhook"\nurl = "http://x"\ntimeout = 0\n', "$.handler[0].timeout"),
    ]:
        with pytest.raises(msgspec.ValidationError, match=None) as info:
            decode(toml)
        assert where in str(info.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('type = "audit"\npath = "a"\nevents = ["auht.*"]', "handler[1].events[0]: 'auht.*' matches no event"),
        ('type = "lastlog"', "handler[1].name: 'lastlog' is already used by handler[0]"),
        ('type = "audit"\npath = "audit.jsonl/a.log"', "handler[1].path:"),
        ('type = "audit"\npath = "a"\nmode = 0o666', "handler[1].mode: an audit log must not be world-writable"),
        ('type = "python"\ncallable = "no_such_module_xyz:f"', "handler[1].callable: cannot load: ModuleNotFoundError"),
        ('type = "python"\ncallable = "json:nope"', "handler[1].callable: cannot load: AttributeError"),
        ('type = "python"\ncallable = "json"', "handler[1].callable: cannot load: ValueError"),
        ('type = "python"\ncallable = "json:__doc__"', "handler[1].callable: str object is not callable"),
        ('type = "python"\ncallable = "json:dumps"\nentry_point = "x"', "handler[1]: set exactly one of"),
        ('type = "python"\ncallable = "json:dumps"\noptions = {a = 1}', "handler[1].options: only used with factory"),
        ('type = "python"\ncallable = "json:loads"\nfactory = true', "handler[1]: factory failed: TypeError"),
        ('type = "webhook"\nurl = "ftp://example.org/"', "handler[1].url:"),
        ('type = "webhook"\nurl = "http://u:pw@example.org/"', "handler[1].url: no credentials"),
        ('type = "webhook"\nurl = "http://example.org:99999/"', "handler[1].url:"),
        ('type = "webhook"\nurl = "http://example.org/"\nheaders = {"X-A" = "1\\r\\nX-B: 2"}', "handler[1].headers.X-A"),
        ('type = "webhook"\nurl = "http://example.org/"\nheaders = {"Content-Length" = "1"}', "handler[1].headers: Content-Length is set by authd"),
        ('type = "webhook"\nurl = "http://example.org/"\nheaders = {"bad name" = "1"}', "handler[1].headers: 'bad name'"),
        ('type = "webhook"\nurl = "http://example.org/"\nca_file = "ca.pem"', "handler[1].ca_file: only meaningful for https"),
        ('type = "webhook"\nurl = "http://example.org/"\nsecret_file = "missing.key"', "handler[1].secret_file: cannot read"),
        ('type = "webhook"\nurl = "http://example.org/"\nsecret_env = "AUTHD_TEST_UNSET_VAR"', "handler[1].secret_env: environment variable AUTHD_TEST_UNSET_VAR"),
        (f'type = "webhook"\nurl = "http://example.org/"\nsecret = "{SECRET}"\nsecret_env = "X"', "handler[1]: set only one of secret, secret_env"),
        ('type = "exec"\ncommand = ["no-such-program-xyz"]', "handler[1].command[0]: 'no-such-program-xyz' is not an executable"),
        ('type = "exec"\ncommand = ["./audit.jsonl"]', "handler[1].command[0]: './audit.jsonl' is not an executable"),
        ('type = "exec"\ncommand = ["true"]\nenv = {AUTHD_USER = "x"}', "handler[1].env: invalid variable name 'AUTHD_USER'"),
        ('type = "mail"\nfrom = "a@b"\nto = "{user}@b"\nsubject = "{password}"\nbody = ""', "handler[1].subject: unknown placeholder {password}"),
        ('type = "mail"\nfrom = "a@b"\nto = "{user}@b"\nsubject = "{user.__class__}"\nbody = ""', "handler[1].subject: unknown placeholder"),
        ('type = "mail"\nfrom = "a@b"\nto = "{user}@b"\nsubject = "x"\nbody = "{"', "handler[1].body:"),
        ('type = "mail"\nfrom = "nobody"\nto = "{user}@b"\nsubject = "x"\nbody = ""', "handler[1].from: 'nobody' is not a mail address"),
        ('type = "mail"\nfrom = "a@b"\nto = "x, y@b"\nsubject = "x"\nbody = ""', "handler[1].to:"),
        ('type = "mail"\nfrom = "a@b"\nto = "{user}@b"\nsubject = "x"\nbody = ""\nusername = "u"', "handler[1]: username and password_file"),
        ('type = "mail"\nfrom = "a@b"\nto = "{user}@b"\nsubject = "x"\nbody = ""\nusername = "u"\npassword_env = "PATH"', "handler[1].tls: ca_file and SMTP AUTH need"),
        ('type = "mail"\nfrom = "a@b"\nto = "{user}@b"\nsubject = "x"\nbody = ""\ntls = "starttls"\nca_file = "audit.jsonl"', "handler[1].ca_file:"),
    ],
)
def test_build_errors_name_the_key(ctx: HandlerContext, toml: str, message: str) -> None:
    ctx.base_dir.joinpath("audit.jsonl").write_text("")
    configs = decode(f'[[handler]]\ntype = "lastlog"\n\n[[handler]]\n{toml}\n')
    with pytest.raises(ConfigError) as info:
        build_handlers(configs, ctx)
    assert message in str(info.value)
    assert SECRET not in str(info.value)


def test_two_handlers_of_a_type_need_names(ctx: HandlerContext) -> None:
    twice = '[[handler]]\ntype = "lastlog"\n{}\n[[handler]]\ntype = "lastlog"\n{}\n'
    with pytest.raises(ConfigError, match=r"handler\[1\].name"):
        build(twice.format("", ""), ctx)
    handlers = build(twice.format('name = "a"', 'name = "b"'), ctx)
    assert [h.name for h in handlers] == ["a", "b"]


def test_secrets_come_from_file_or_environment_and_never_show(ctx: HandlerContext) -> None:
    key = ctx.base_dir / "hook.key"
    key.write_text(SECRET + "\n")
    os.environ["AUTHD_TEST_HOOK_SECRET"] = SECRET
    try:
        (from_file, from_env, inline) = build(
            '[[handler]]\nname = "f"\ntype = "webhook"\nurl = "http://h/"\nsecret_file = "hook.key"\n'
            '[[handler]]\nname = "e"\ntype = "webhook"\nurl = "http://h/"\nsecret_env = "AUTHD_TEST_HOOK_SECRET"\n'
            f'[[handler]]\nname = "i"\ntype = "webhook"\nurl = "http://h/"\nsecret = "{SECRET}"\n',
            ctx,
        )
    finally:
        del os.environ["AUTHD_TEST_HOOK_SECRET"]
    assert from_file.secret == from_env.secret == inline.secret == SECRET.encode()
    (cfg,) = decode(f'[[handler]]\ntype = "webhook"\nurl = "http://h/"\nsecret = "{SECRET}"\n')
    assert SECRET not in repr(cfg) and SECRET not in repr(inline)


def test_relative_paths_resolve_against_the_config_dir(ctx: HandlerContext, tmp_path: Path) -> None:
    script = tmp_path / "hooks" / "notify"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (audit, exec_) = build(
        '[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n'
        '[[handler]]\ntype = "exec"\ncommand = ["hooks/notify", "--flag"]\n',
        ctx,
    )
    assert audit.path == tmp_path / "audit.jsonl"
    assert exec_.argv == [str(script), "--flag"]
