"""authd.pam.binding against real libpam, preloaded with pam_wrapper in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from authd.pam import binding

from ..pamenv import PamEnv

CANARY = "canary-Pw-7f3a9c"
SERVICE = "login-test"

# Runs binding.authenticate for each call read from stdin; results go to a file, not stdout,
# because PAM modules may print.
RUNNER = """
import json, sys, time
import msgspec
from authd.pam import binding
results = []
for call in json.load(sys.stdin):
    started = time.monotonic()
    try:
        result = msgspec.to_builtins(binding.authenticate(**call))
    except (ValueError, TypeError) as exc:
        result = {"error": type(exc).__name__, "message": str(exc)}
    result["elapsed"] = time.monotonic() - started
    results.append(result)
with open(sys.argv[1], "w") as f:
    json.dump(results, f)
"""


@pytest.fixture
def pam(tmp_path: Path) -> PamEnv:
    env = PamEnv.create(tmp_path / "pam")
    env.add_service(SERVICE)
    env.add_service("elsewhere")  # same passdb; alice's line names SERVICE, so acct_mgmt refuses
    env.add_user("alice", CANARY, SERVICE)
    return env


def run(pam: PamEnv, tmp_path: Path, *calls: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Run calls in a fresh pam_wrapper'd interpreter; return results and its stdout+stderr."""
    out = tmp_path / "results.json"
    output = pam.python(RUNNER, str(out), stdin=json.dumps(list(calls)))
    return json.loads(out.read_text()), output


def login(
    user: str = "alice", password: str = CANARY, service: str = SERVICE, **kw: str
) -> dict[str, Any]:
    return {"service": service, "user": user, "password": password, **kw}


def test_success(pam: PamEnv, tmp_path: Path) -> None:
    [result], _ = run(pam, tmp_path, login())
    assert result["outcome"] == "ok"
    assert (result["pam_code"], result["stage"], result["fail_delay"]) == (0, "acct_mgmt", 0.0)


def test_wrong_password_and_unknown_user_are_indistinguishable(pam: PamEnv, tmp_path: Path) -> None:
    wrong, unknown = (
        {k: v for k, v in r.items() if k != "elapsed"}
        for r in run(pam, tmp_path, login(password="nope"), login(user="mallory"))[0]
    )
    assert wrong == unknown
    assert wrong["outcome"] == "auth_failed" and wrong["stage"] == "authenticate"


def test_account_failure(pam: PamEnv, tmp_path: Path) -> None:
    [result], _ = run(pam, tmp_path, login(service="elsewhere"))
    assert result["outcome"] == "not_authorized"
    assert result["stage"] == "acct_mgmt"
    assert result["pam_code"] == binding.PAM_PERM_DENIED


def test_fail_delay_is_reported_not_slept(pam: PamEnv, tmp_path: Path) -> None:
    pam.add_faildelay_service("slow", 10.0)
    pam.add_user("alice", CANARY, "slow")
    (failed, ok), _ = run(pam, tmp_path, login(service="slow", password="no"), login(service="slow"))
    assert failed["outcome"] == "auth_failed"
    assert 5.0 <= failed["fail_delay"] < 15.0  # libpam's jitter: 0.5x to 1.5x
    assert failed["elapsed"] < 5.0  # had libpam slept, it would have been at least 5 s
    assert ok["outcome"] == "ok" and ok["fail_delay"] == 0.0


def test_rhost_and_ruser_reach_pam(pam: PamEnv, tmp_path: Path) -> None:
    pam.add_rhost_service("from-host", "192.0.2.7", ruser="relay")
    pam.add_user("alice", CANARY, "from-host")
    results, _ = run(
        pam,
        tmp_path,
        login(service="from-host", rhost="192.0.2.7", ruser="relay"),
        login(service="from-host", rhost="192.0.2.8", ruser="relay"),
        login(service="from-host", rhost="192.0.2.7", ruser="other"),
        login(service="from-host"),
    )
    assert [r["outcome"] for r in results] == ["ok", "auth_failed", "auth_failed", "auth_failed"]


def test_conversation_survives_hostile_module(
    pam: PamEnv, tmp_path: Path, modules: dict[str, Path]
) -> None:
    pam.add_module_service("probe", modules["conv"], ["password=conv-secret"])
    (ok, wrong), output = run(pam, tmp_path, login(service="probe", password="conv-secret"),
                              login(service="probe", password="other"))
    assert ok["outcome"] == "ok", output
    assert wrong["outcome"] == "auth_failed"


@pytest.mark.parametrize("field", ["service", "user", "password", "rhost", "ruser"])
def test_nul_byte_rejected_before_c(pam: PamEnv, tmp_path: Path, field: str) -> None:
    call = login(rhost="host", ruser="someone")
    call[field] = call[field] + "\0" + CANARY
    [result], output = run(pam, tmp_path, call)
    assert result["error"] == "ValueError"
    assert field in result["message"] and CANARY not in result["message"]
    assert CANARY not in output


def test_unencodable_password_rejected_without_echo() -> None:
    with pytest.raises(ValueError) as info:
        binding.c_string("password", "abc\udcff" + CANARY)
    assert CANARY not in str(info.value) and info.value.__context__ is None


def test_outcome_table() -> None:
    refusals = (
        binding.PAM_AUTH_ERR, binding.PAM_USER_UNKNOWN, binding.PAM_CRED_INSUFFICIENT,
        binding.PAM_MAXTRIES, binding.PAM_PERM_DENIED, binding.PAM_ACCT_EXPIRED,
        binding.PAM_NEW_AUTHTOK_REQD,
    )
    # before the password is proven, every refusal looks the same
    assert {binding.outcome_for("authenticate", code) for code in refusals} == {"auth_failed"}
    assert binding.outcome_for("authenticate", binding.PAM_AUTHINFO_UNAVAIL) == "unavailable"
    assert binding.outcome_for("acct_mgmt", binding.PAM_ACCT_EXPIRED) == "account_expired"
    assert binding.outcome_for("acct_mgmt", binding.PAM_NEW_AUTHTOK_REQD) == "password_expired"
    assert binding.outcome_for("acct_mgmt", binding.PAM_USER_UNKNOWN) == "not_authorized"
    assert binding.outcome_for("acct_mgmt", binding.PAM_SYSTEM_ERR) == "unavailable"
    assert binding.outcome_for("start", 0) == "unavailable"


def test_canary_never_leaves_the_transaction(pam: PamEnv, tmp_path: Path) -> None:
    pam.add_faildelay_service("slow", 0.1)
    results, output = run(pam, tmp_path, login(), login(service="elsewhere"), login(user="bob"),
                          login(service="slow", user="nobody"))
    assert CANARY not in json.dumps(results)
    assert CANARY not in output
