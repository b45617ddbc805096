"""A small ctypes binding to libpam: one authentication transaction per call.

In-tree rather than python-pam because authd needs what generic bindings leave out: the
``PAM_FAIL_DELAY`` callback (so libpam reports its delay instead of sleeping in the worker),
``PAM_RHOST``/``PAM_RUSER``, a conversation that can never raise into C, and a result that says
which stage failed. Functions are resolved through the global symbol scope so a preloaded
pam_wrapper (tests) wins over libpam, exactly as it would for a C program.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
from collections.abc import Callable
from typing import Final, Literal

import msgspec

Outcome = Literal[
    "ok", "auth_failed", "account_expired", "password_expired", "not_authorized", "unavailable", "busy"
]
Stage = Literal["start", "authenticate", "acct_mgmt", "worker"]

PAM_SUCCESS: Final = 0
PAM_SYSTEM_ERR: Final = 4
PAM_PERM_DENIED: Final = 6
PAM_AUTH_ERR: Final = 7
PAM_CRED_INSUFFICIENT: Final = 8
PAM_AUTHINFO_UNAVAIL: Final = 9
PAM_USER_UNKNOWN: Final = 10
PAM_MAXTRIES: Final = 11
PAM_NEW_AUTHTOK_REQD: Final = 12
PAM_ACCT_EXPIRED: Final = 13
PAM_CONV_ERR: Final = 19
PAM_AUTHTOK_EXPIRED: Final = 27

PAM_RHOST: Final = 4
PAM_RUSER: Final = 8
PAM_FAIL_DELAY: Final = 10

PAM_DISALLOW_NULL_AUTHTOK: Final = 0x0001

PAM_PROMPT_ECHO_OFF: Final = 1
PAM_PROMPT_ECHO_ON: Final = 2
PAM_ERROR_MSG: Final = 3
PAM_TEXT_INFO: Final = 4
PAM_MAX_NUM_MSG: Final = 32

# What a PAM return code means to a client, by the stage that returned it. Before the password
# is proven (authenticate) every "no" is the same "auth_failed", so neither a missing user nor
# the state of an account can be probed without knowing the password; account_expired and the
# like are only disclosed by acct_mgmt. Codes not listed (PAM_AUTHINFO_UNAVAIL, PAM_SYSTEM_ERR,
# PAM_BUF_ERR, PAM_CONV_ERR, PAM_ABORT, PAM_SERVICE_ERR, PAM_OPEN_ERR, ...) mean PAM could not
# decide at all: "unavailable" at either stage.
#
#   code                       authenticate     acct_mgmt
OUTCOMES: Final[dict[int, tuple[Outcome, Outcome]]] = {
    PAM_SUCCESS:             ("ok",           "ok"),
    PAM_AUTH_ERR:            ("auth_failed",  "not_authorized"),
    PAM_USER_UNKNOWN:        ("auth_failed",  "not_authorized"),
    PAM_PERM_DENIED:         ("auth_failed",  "not_authorized"),
    PAM_CRED_INSUFFICIENT:   ("auth_failed",  "unavailable"),
    PAM_MAXTRIES:            ("auth_failed",  "unavailable"),
    PAM_ACCT_EXPIRED:        ("auth_failed",  "account_expired"),
    PAM_NEW_AUTHTOK_REQD:    ("auth_failed",  "password_expired"),
    PAM_AUTHTOK_EXPIRED:     ("auth_failed",  "password_expired"),
}  # fmt: skip


class PamResult(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How one PAM transaction ended; never carries the password.

    ``pam_code`` is libpam's return code, or -1 when PAM never answered (stage ``"worker"``:
    the pool's worker died, timed out or was shut down, or, outcome ``busy``, the caller's uid
    had too many calls waiting). ``fail_delay`` is the failure delay
    PAM asked for, in seconds, for the caller to apply; ``detail`` is pam_strerror's text.
    """

    outcome: Outcome
    pam_code: int
    stage: Stage
    fail_delay: float = 0.0
    detail: str = ""
    groups: tuple[str, ...] = ()  # the user's groups, filled in by the worker on success

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def outcome_for(stage: Stage, code: int) -> Outcome:
    """Map a PAM return code at ``stage`` to the client-visible outcome."""
    if stage == "authenticate":
        return OUTCOMES.get(code, ("unavailable", "unavailable"))[0]
    if stage == "acct_mgmt":
        return OUTCOMES.get(code, ("unavailable", "unavailable"))[1]
    return "unavailable"


class _Message(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_void_p)]


class _Response(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


_ConvFunc = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.POINTER(_Message)),
    ctypes.POINTER(ctypes.POINTER(_Response)),
    ctypes.c_void_p,
)
_DelayFunc = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)


class _Conv(ctypes.Structure):
    _fields_ = [("conv", _ConvFunc), ("appdata_ptr", ctypes.c_void_p)]


class _Lib:
    """libpam and the libc allocator, resolved once per process."""

    def __init__(self) -> None:
        ctypes.CDLL("libpam.so.0", mode=ctypes.RTLD_GLOBAL)
        scope = ctypes.CDLL(None)
        vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int

        self.pam_start = _fn(scope.pam_start, i, cp, cp, ctypes.POINTER(_Conv), ctypes.POINTER(vp))
        self.pam_set_item = _fn(scope.pam_set_item, i, vp, i, vp)
        self.pam_authenticate = _fn(scope.pam_authenticate, i, vp, i)
        self.pam_acct_mgmt = _fn(scope.pam_acct_mgmt, i, vp, i)
        self.pam_end = _fn(scope.pam_end, i, vp, i)
        self.pam_strerror = _fn(scope.pam_strerror, cp, vp, i)
        self.calloc = _fn(scope.calloc, vp, ctypes.c_size_t, ctypes.c_size_t)
        self.strdup = _fn(scope.strdup, vp, cp)
        self.strlen = _fn(scope.strlen, ctypes.c_size_t, vp)
        self.free = _fn(scope.free, None, vp)


def _fn(f, restype, *argtypes):  # type: ignore[no-untyped-def]
    f.restype = restype
    f.argtypes = argtypes
    return f


@functools.cache
def _lib() -> _Lib:
    return _Lib()


def load() -> None:
    """Load libpam now, so a worker that cannot find it fails at start-up, not mid-login."""
    _lib()


class _Transaction:
    """What the C callbacks need to see for one pam_start..pam_end."""

    __slots__ = ("user", "password", "fail_delay_usec")

    def __init__(self, user: bytes, password: bytes) -> None:
        self.user = user
        self.password = password
        self.fail_delay_usec = 0


# Callbacks find their transaction by the appdata_ptr key; the callbacks themselves are
# module-level so they outlive every transaction and cost nothing per call.
_transactions: dict[int, _Transaction] = {}
_keys = itertools.count(1)


def _converse(num_msg: int, msg, resp, appdata: int | None) -> int:  # type: ignore[no-untyped-def]
    try:
        tx = _transactions[appdata or 0]
        if not msg or not resp or not 0 < num_msg <= PAM_MAX_NUM_MSG:
            return PAM_CONV_ERR
        lib = _lib()
        array = lib.calloc(num_msg, ctypes.sizeof(_Response))
        if not array:
            return PAM_CONV_ERR
        replies = ctypes.cast(array, ctypes.POINTER(_Response))
        for i in range(num_msg):
            if not _answer(lib, tx, msg[i], replies[i]):
                _discard(lib, replies, num_msg)
                return PAM_CONV_ERR
        resp[0] = replies
        return PAM_SUCCESS
    except BaseException:  # nothing may unwind into libpam
        return PAM_CONV_ERR


def _answer(lib: _Lib, tx: _Transaction, message, reply) -> bool:  # type: ignore[no-untyped-def]
    if not message:
        return False
    style = message.contents.msg_style
    if style == PAM_PROMPT_ECHO_OFF:
        reply.resp = lib.strdup(tx.password)
        return bool(reply.resp)
    if style == PAM_PROMPT_ECHO_ON:
        reply.resp = lib.strdup(tx.user)
        return bool(reply.resp)
    return style in (PAM_ERROR_MSG, PAM_TEXT_INFO)


def _discard(lib: _Lib, replies, count: int) -> None:  # type: ignore[no-untyped-def]
    """Free a half-built reply array, wiping password copies first."""
    for i in range(count):
        if text := replies[i].resp:
            ctypes.memset(text, 0, lib.strlen(text))
            lib.free(text)
    lib.free(ctypes.cast(replies, ctypes.c_void_p))


def _on_fail_delay(status: int, usec: int, appdata: int | None) -> None:
    try:
        tx = _transactions.get(appdata or 0)
        if tx is not None and status != PAM_SUCCESS:
            tx.fail_delay_usec = usec
    except BaseException:  # nothing may unwind into libpam
        pass


_CONVERSE = _ConvFunc(_converse)
_ON_FAIL_DELAY = _DelayFunc(_on_fail_delay)
_ON_FAIL_DELAY_PTR = ctypes.cast(_ON_FAIL_DELAY, ctypes.c_void_p)


def c_string(name: str, value: str) -> bytes:
    """UTF-8 bytes for C; errors name the field, never the value (it may be a password)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str")
    try:
        raw = value.encode()
    except UnicodeEncodeError:
        raw = None
    if raw is None:  # raised out here so no exception in the chain holds the value
        raise ValueError(f"{name} is not valid UTF-8")
    if b"\0" in raw:
        raise ValueError(f"{name} contains a NUL byte")
    return raw


def _c_args(
    service: str, user: str, password: str, rhost: str | None, ruser: str | None
) -> tuple[bytes, bytes, bytes, list[tuple[int, bytes]]]:
    items = [
        (item, c_string(name, value))
        for item, name, value in ((PAM_RHOST, "rhost", rhost), (PAM_RUSER, "ruser", ruser))
        if value is not None
    ]
    c_password = c_string("password", password)
    return c_string("service", service), c_string("user", user), c_password, items


def validate(
    service: str, user: str, password: str, rhost: str | None = None, ruser: str | None = None
) -> None:
    """Raise the ValueError/TypeError ``authenticate`` would, without loading libpam."""
    _c_args(service, user, password, rhost, ruser)


def authenticate(
    service: str,
    user: str,
    password: str,
    rhost: str | None = None,
    ruser: str | None = None,
    account_only: bool = False,
    on_start: Callable[[str], None] | None = None,
) -> PamResult:
    """Run pam_authenticate then pam_acct_mgmt for ``user`` under ``service``.

    With ``account_only`` (a credential-cache hit: the password was proven recently) only
    pam_acct_mgmt runs, so expiry, pam_access and pam_time still apply.

    Blocks for as long as the PAM modules do and never sleeps out the failure delay: the delay
    PAM asked for is returned in ``fail_delay`` for the caller to apply. Raises ValueError or
    TypeError for unusable arguments (NUL bytes, non-strings) before touching C.
    ``on_start(service)`` runs once pam_start has loaded the service's modules, before any of
    them is called (``authd.pam.modulepins`` keeps them loaded from there).
    """
    c_service, c_user, c_password, items = _c_args(service, user, password, rhost, ruser)
    items.append((PAM_FAIL_DELAY, _ON_FAIL_DELAY_PTR))  # type: ignore[arg-type]
    tx = _Transaction(c_user, c_password)
    lib = _lib()
    key = next(_keys)
    conv = _Conv(_CONVERSE, key)
    handle = ctypes.c_void_p()
    _transactions[key] = tx
    try:
        code = lib.pam_start(c_service, c_user, ctypes.byref(conv), ctypes.byref(handle))
        if code != PAM_SUCCESS:  # libpam has already freed the handle
            return _result(lib, None, "start", code, tx)
        try:
            if on_start is not None:
                on_start(service)
            for item, value in items:
                code = lib.pam_set_item(handle, item, value)
                if code != PAM_SUCCESS:
                    return _result(lib, handle, "start", code, tx)
            code = PAM_SUCCESS if account_only else lib.pam_authenticate(handle, PAM_DISALLOW_NULL_AUTHTOK)
            if code != PAM_SUCCESS:
                return _result(lib, handle, "authenticate", code, tx)
            code = lib.pam_acct_mgmt(handle, PAM_DISALLOW_NULL_AUTHTOK)
            return _result(lib, handle, "acct_mgmt", code, tx)
        finally:
            lib.pam_end(handle, code)
    finally:
        del _transactions[key]


def _result(
    lib: _Lib, handle: ctypes.c_void_p | None, stage: Stage, code: int, tx: _Transaction
) -> PamResult:
    text = lib.pam_strerror(handle, code)
    return PamResult(
        outcome=outcome_for(stage, code),
        pam_code=code,
        stage=stage,
        fail_delay=tx.fail_delay_usec / 1_000_000,
        detail=text.decode(errors="replace") if text else f"PAM error {code}",
    )
