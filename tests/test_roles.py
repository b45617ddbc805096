"""Roles in memory: `[roles.NAME]` validation with file:line errors, and the decision itself.

The groups used are ones every Debian system has (root, daemon, adm), resolved by the real NSS.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from authd import policy as policy_mod, roles
from authd.errors import ConfigError

SERVICES = '[[service]]\nname = "web"\npam_service = "login"\n\n[[service]]\nname = "mail"\npam_service = "login"\n'


def load(tmp_path: Path, text: str) -> policy_mod.Policy:
    path = tmp_path / "authd.toml"
    path.write_text(text + "\n" + SERVICES)
    return policy_mod.load(path, 7, build=False)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value).removeprefix(str(tmp_path / "authd.toml"))


def table(**spec: roles.RoleConfig) -> roles.Roles:
    return roles.build(spec, services={"web", "mail"})


def role(**fields: object) -> roles.RoleConfig:
    fields.setdefault("users", ["alice"])
    return roles.RoleConfig(**fields)  # type: ignore[arg-type]


# --- loading and validation ----------------------------------------------------------------


def test_roles_load_with_the_policy(tmp_path: Path) -> None:
    policy = load(tmp_path, '[roles.mail-admin]\nusers = ["alice", 0]\ngroups = ["adm", 1]\nservices = ["mail"]\n'
                            'permissions = ["mail.*", "webmail.admin.read"]\ndeny = ["mail.purge"]\n')
    (compiled,) = policy.roles.roles
    assert compiled.name == "mail-admin" and compiled.users == {"alice", "root"}  # uid 0 resolved to its name
    assert compiled.groups == {"adm", "daemon"} and compiled.services == {"mail"}
    assert compiled.allow == {"mail.*": 0, "webmail.admin.read": 1} and compiled.deny == {"mail.purge": 0}


def test_no_roles_is_default_deny(tmp_path: Path) -> None:
    policy = load(tmp_path, "")
    assert policy.roles.decide("root", ("root",), "web", "anything") == roles.Decision(False, "default")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[roles.a]\nusers = ["x"]\npermissions = ["ok", "Bad"]\n', r":3: roles\.a\.permissions\[1\]: invalid pattern"),
        ('[roles.a]\nusers = ["x"]\npermissions = ["a..b"]\n', r":3: roles\.a\.permissions\[0\]: invalid pattern"),
        ('[roles.a]\nusers = ["x"]\npermissions = ["a.*.b"]\n', r":3: roles\.a\.permissions\[0\]: invalid pattern"),
        ('[roles.a]\nusers = ["x"]\npermissions = ["a*"]\n', r":3: roles\.a\.permissions\[0\]: invalid pattern"),
        ('[roles.a]\nusers = ["x"]\npermissions = [".*"]\n', r":3: roles\.a\.permissions\[0\]: invalid pattern"),
        ('[roles.a]\nusers = ["x"]\npermissions = ["a"]\ndeny = ["b", "*.b"]\n', r":4: roles\.a\.deny\[1\]: invalid pattern"),
        ('[roles.a]\nusers = ["x"]\npermissions = ["a", "b", "a"]\n', r":3: roles\.a\.permissions\[2\]: duplicate of roles\.a\.permissions\[0\]"),
        ('[roles.a]\nusers = ["x"]\ngroups = ["root", "no-such-group-zz"]\npermissions = ["a"]\n', r":3: roles\.a\.groups\[1\]: no such group"),
        ('[roles.a]\ngroups = [4000000000]\npermissions = ["a"]\n', r":2: roles\.a\.groups\[0\]: no such group"),
        ('[roles.a]\nusers = [4000000000]\npermissions = ["a"]\n', r":2: roles\.a\.users\[0\]: no such uid"),
        ('[roles.a]\nusers = ["x"]\nservices = ["web", "nope"]\npermissions = ["a"]\n', r":3: roles\.a\.services\[1\]: no \[\[service\]\]"),
        ('[roles.a]\nusers = ["x"]\nservices = []\npermissions = ["a"]\n', r":3: roles\.a\.services: empty list"),
        ('[roles.a]\npermissions = ["a"]\n', r":1: roles\.a: applies to no one"),
        ('[roles.a]\nusers = ["x"]\n', r":1: roles\.a: grants and denies nothing"),
        ('[roles.a]\nusers = ["x"]\npermissions = ["a"]\nallow = ["b"]\n', r":4: roles\.a\.allow: .*unknown field"),
        ('[roles.a]\nusers = "x"\npermissions = ["a"]\n', r":2: roles\.a\.users: Expected `array`"),
        ('[roles.ok]\nusers = ["x"]\npermissions = ["a"]\n\n[roles.b]\nusers = [1.5]\n', r":6: roles\.b\.users\[0\]: Expected `int \| str`"),
        ('[roles."9lives"]\nusers = ["x"]\npermissions = ["a"]\n', r": roles: invalid role name '9lives'"),
        ("[roles]\na = 3\n", r":2: roles\.a: Expected `object`"),
    ],
)
def test_invalid_roles_are_refused_with_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    assert re.match(expected, error_of(tmp_path, text)), error_of(tmp_path, text)


def test_errors_do_not_quote_values(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[roles.a]\nusers = ["x"]\ngroups = ["canary-grp"]\npermissions = ["canary.Perm"]\n')
    assert "canary" not in message
    message = error_of(tmp_path, '[roles.a]\nusers = ["x"]\npermissions = ["canary.Perm"]\n')
    assert "canary" not in message


def test_long_patterns_are_refused() -> None:
    with pytest.raises(ConfigError, match="invalid pattern"):
        table(a=role(permissions=["a" * 255 + ".*"]))
    assert table(a=role(permissions=["a" * 254 + ".*"]))


# --- the decision ----------------------------------------------------------------------------


def test_deny_wins_and_names_the_rule() -> None:
    t = table(admin=role(groups=["adm"], permissions=["mail.*", "web.read"], deny=["mail.purge", "mail.queue.*"]))
    assert t.decide("alice", (), "web", "mail.send") == roles.Decision(True, "roles.admin.permissions[0]")
    assert t.decide("alice", (), "web", "mail.purge") == roles.Decision(False, "roles.admin.deny[0]")
    assert t.decide("alice", (), "web", "mail.queue.flush") == roles.Decision(False, "roles.admin.deny[1]")
    assert t.decide("alice", (), "web", "mail") == roles.Decision(False, "default"), "`mail.*` needs a further segment"
    assert t.decide("alice", (), "web", "web.read.all") == roles.Decision(False, "default")


def test_deny_of_one_role_beats_allow_of_another() -> None:
    t = table(users=role(users=["*"], permissions=["*"]), no_purge=role(groups=["adm"], deny=["mail.purge"]))
    assert t.decide("bob", (), "web", "mail.purge") == roles.Decision(True, "roles.users.permissions[0]")
    assert t.decide("bob", ("adm",), "web", "mail.purge") == roles.Decision(False, "roles.no_purge.deny[0]")


def test_roles_apply_by_user_group_and_service() -> None:
    t = table(ops=role(users=["alice"], groups=["adm"], services=["mail"], permissions=["mail.send"]))
    assert t.decide("alice", (), "mail", "mail.send").allowed
    assert t.decide("carol", ("adm", "root"), "mail", "mail.send").allowed
    assert not t.decide("carol", ("root",), "mail", "mail.send").allowed
    assert t.decide("alice", (), "web", "mail.send") == roles.Decision(False, "default"), "other service"


def test_first_matching_rule_in_file_order_is_reported() -> None:
    t = table(a=role(permissions=["x.y", "x.*", "*"]), b=role(permissions=["x.y"]))
    assert t.decide("alice", (), "web", "x.y").rule == "roles.a.permissions[0]"
    assert t.decide("alice", (), "web", "x.z").rule == "roles.a.permissions[1]"
    assert t.decide("alice", (), "web", "q").rule == "roles.a.permissions[2]"


def test_effective_patterns() -> None:
    t = table(a=role(permissions=["x.*", "b"], deny=["x.z"]), b=role(groups=["adm"], permissions=["b", "a"]), c=role(users=["zed"], permissions=["c"]))
    assert t.effective("alice", ("adm",), "web") == roles.Effective(roles=("a", "b"), permissions=("a", "b", "x.*"), deny=("x.z",))
    assert t.effective("nobody", (), "web") == roles.Effective((), (), ())


def test_grant_cache_is_bounded_and_per_generation() -> None:
    t = table(a=role(users=["*"], permissions=["x"]))
    for i in range(roles.MAX_GRANTS + 5):
        assert t.decide(f"user{i}", (), "web", "x").allowed
    assert 0 < len(t._grants) <= roles.MAX_GRANTS
    assert t.grant("user1", (), "web") is t.grant("user1", (), "web")
    assert table(a=role(users=["*"], permissions=["x"]))._grants == {}, "a new generation starts empty"


def test_decision_cache_is_bounded_and_answers_as_the_rules_do() -> None:
    t = table(a=role(users=["*"], permissions=["x.*"], deny=["x.secret"]))
    for i in range(roles.MAX_DECISIONS + 5):
        assert t.decide("alice", (), "web", f"x.p{i}").allowed
    assert 0 < len(t._decisions) <= roles.MAX_DECISIONS
    for _ in range(2):  # computed, then cached: the same answer
        assert t.decide("alice", (), "web", "x.secret") == roles.Decision(False, "roles.a.deny[0]")
        assert t.decide("alice", ("adm",), "web", "y") == roles.DENIED_BY_DEFAULT


@pytest.mark.parametrize(
    ("name", "ok"),
    [("mail", True), ("mail.send", True), ("a-b_c.0", True), ("", False), ("Mail", False), ("mail.", False),
     (".mail", False), ("mail..send", False), ("mail.*", False), ("*", False), ("m a", False), ("a" * 256, True),
     ("a" * 257, False), ("é", False), ("mail\n", False)],
)
def test_permission_grammar(name: str, ok: bool) -> None:
    assert roles.is_permission(name) is ok


def test_patterns_matching_a_permission() -> None:
    assert roles.patterns_matching("a.b.c") == ("a.b.c", "a.b.*", "a.*", "*")
    assert roles.patterns_matching("a") == ("a", "*")


# --- properties ------------------------------------------------------------------------------

segment = st.sampled_from(["a", "b", "c", "mail", "x-y", "0"])
permission = st.lists(segment, min_size=1, max_size=4).map(".".join)
pattern = st.one_of(permission, permission.map(lambda p: p + ".*"), st.just("*"))
groups = st.lists(st.sampled_from(["root", "daemon", "adm"]), max_size=2, unique=True)
users = st.lists(st.sampled_from(["alice", "bob", "*"]), max_size=2, unique=True)
role_spec = st.builds(
    roles.RoleConfig, users=users, groups=groups, services=st.one_of(st.none(), st.sampled_from([["web"], ["mail"]])),
    permissions=st.lists(pattern, max_size=4, unique=True), deny=st.lists(pattern, max_size=3, unique=True),
).filter(lambda r: (r.users or r.groups) and (r.permissions or r.deny))
policies = st.dictionaries(st.sampled_from(["r1", "r2", "r3", "r4"]), role_spec, max_size=4)
sessions = st.tuples(st.sampled_from(["alice", "bob", "carol"]), groups.map(tuple), st.sampled_from(["web", "mail"]))


def matches(pattern: str, permission: str) -> bool:
    """The oracle, written from the definition: `*` all; `p.*` one or more segments after p."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return permission.startswith(pattern[:-1]) and len(permission) > len(pattern) - 1
    return pattern == permission


def applies(spec: roles.RoleConfig, user: str, groups: tuple[str, ...], service: str) -> bool:
    return (spec.services is None or service in spec.services) and ("*" in spec.users or user in spec.users or bool(set(spec.groups) & set(groups)))


@settings(max_examples=200, deadline=None)
@given(policies, sessions, permission)
def test_decision_agrees_with_the_definition(spec: dict[str, roles.RoleConfig], session: tuple[str, tuple[str, ...], str], perm: str) -> None:
    user, grps, service = session
    decision = table(**spec).decide(user, grps, service, perm)
    live = [s for s in spec.values() if applies(s, user, grps, service)]
    denied = any(matches(p, perm) for s in live for p in s.deny)
    allowed = any(matches(p, perm) for s in live for p in s.permissions)
    assert decision.allowed == (allowed and not denied)  # deny wins; what nothing grants is denied
    if denied:
        assert re.fullmatch(r"roles\.r\d\.deny\[\d\]", decision.rule)
    elif not allowed:
        assert decision.rule == "default"
    if decision.rule != "default":  # the rule named really matches
        name, kind, index = re.fullmatch(r"roles\.(\w+)\.(\w+)\[(\d)\]", decision.rule).groups()  # type: ignore[union-attr]
        assert matches(getattr(spec[name], kind)[int(index)], perm)


@settings(max_examples=100, deadline=None)
@given(policies, sessions, permission)
def test_a_deny_added_anywhere_applicable_refuses(spec: dict[str, roles.RoleConfig], session: tuple[str, tuple[str, ...], str], perm: str) -> None:
    user, grps, service = session
    spec = dict(spec, zz=roles.RoleConfig(users=[user], deny=[perm]))
    decision = table(**spec).decide(user, grps, service, perm)
    assert not decision.allowed and ".deny[" in decision.rule


@settings(max_examples=200, deadline=None)
@given(st.lists(pattern, min_size=1, max_size=5, unique=True), permission)
def test_pattern_semantics(patterns: list[str], perm: str) -> None:
    t = table(r=role(permissions=patterns))
    assert t.decide("alice", (), "web", perm).allowed == any(matches(p, perm) for p in patterns)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20))
def test_any_string_is_a_pattern_or_refused(text: str) -> None:
    try:
        t = table(r=role(permissions=[text]))
    except ConfigError as exc:
        assert str(exc).startswith("roles.r.permissions[0]: invalid pattern")
        return
    assert roles.is_pattern(text) and t.roles[0].allow == {text: 0}
