"""The auth decision in memory: a stand-in PAM pool, a clock the test drives, real lockout,
sessions and events. No subprocess, no socket, no sleeping."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authd import config as cfg
from authd.authflow import AuthCore
from authd.cache import CredentialCache
from authd.events.model import Event
from authd.lockout import Lockout
from authd.outcome import AuthRequest, Outcome
from authd.pam.binding import PamResult
from authd.peer import Peer
from authd.policy import Policy
from authd.sessions import SessionStore
from authd.stores.local import LocalLockout, LocalSessions

from ..clock import ManualClock

PASSWORD = "correct horse"
PEER = Peer(pid=4242, uid=1000, gid=1000, groups=frozenset({1000}))
POLICY = """
[[service]]
name = "login"
pam_service = "login-pam"
failure_delay = 2.0
"""


def run(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 20.0))

    return wrapper


@dataclass
class FakePam:
    """Implements the pool's interface (`authenticate`, `account`) over a dict of passwords.

    `account_result` is what the account phase answers; `unavailable` makes every call fail
    as a dead worker would, `busy` as a full queue of the caller's uid would; while `hold`
    is an unset event, `authenticate` waits for it (guesses in PAM at once). Calls are
    recorded (never their passwords), with the queue they asked for in `queues` and whether
    they asked for the groups in `group_lookups` (a success without them carries none).
    """

    users: dict[str, str] = field(default_factory=lambda: {"alice": PASSWORD, "bob": PASSWORD})
    groups: tuple[str, ...] = ("staff",)
    account_result: str = "ok"
    unavailable: bool = False
    busy: bool = False
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)
    queues: list[tuple[int, int]] = field(default_factory=list)
    group_lookups: list[bool] = field(default_factory=list)  # per call: were the groups asked for
    hold: asyncio.Event | None = None

    async def authenticate(self, service: str, user: str, password: str, rhost: str | None = None,
                           ruser: str | None = None, *, uid: int, max_queued: int, groups: bool = True) -> PamResult:
        self.calls.append(("authenticate", user, rhost))
        self.queues.append((uid, max_queued))
        self.group_lookups.append(groups)
        if self.hold is not None:
            await self.hold.wait()
        if failed := self._worker_trouble():
            return failed
        if self.users.get(user) != password:
            return PamResult(outcome="auth_failed", pam_code=7, stage="authenticate", fail_delay=0.5)
        return self._account(user, groups)

    async def account(self, service: str, user: str, rhost: str | None = None, ruser: str | None = None, *,
                      uid: int, max_queued: int, groups: bool = True) -> PamResult:
        self.calls.append(("account", user, rhost))
        self.queues.append((uid, max_queued))
        self.group_lookups.append(groups)
        return self._worker_trouble() or self._account(user, groups)

    def _worker_trouble(self) -> PamResult | None:
        if self.busy:
            return PamResult(outcome="busy", pam_code=-1, stage="worker", detail="queue full")
        if self.unavailable:
            return PamResult(outcome="unavailable", pam_code=-1, stage="worker", detail="gone")
        return None

    def _account(self, user: str, groups: bool) -> PamResult:
        if self.account_result != "ok":
            return PamResult(outcome=self.account_result, pam_code=13, stage="acct_mgmt")  # type: ignore[arg-type]
        return PamResult(outcome="ok", pam_code=0, stage="acct_mgmt", groups=self.groups if groups else ())

    def count(self, kind: str) -> int:
        return sum(1 for call in self.calls if call[0] == kind)


def policy(text: str = POLICY, generation: int = 1) -> Policy:
    config = cfg.parse(text)
    return Policy(config=config, source=Path("/nonexistent/authd.toml"), generation=generation,
                  services={s.name: s for s in config.service}, client_uids=None, client_gids=frozenset(),
                  admin_uids=frozenset(), admin_gids=frozenset())


class Harness:
    """An AuthCore wired to in-memory parts; `events`, `delays` and `pam.calls` record what it did."""

    def __init__(self, tmp: Path, text: str = POLICY, **core: Any) -> None:
        self.clock = ManualClock()
        self.policy = policy(text)
        self.pam = FakePam()
        self.lockout = Lockout(self.policy.config.lockout, tmp / "lockout.db", clock=self.clock)
        self.sessions = SessionStore(tmp / "sessions.db")
        self.sessions.open()
        self.events: list[Event] = []
        self.delays: list[float] = []
        self.counters: Counter[str] = Counter()
        self.cache = CredentialCache(self.policy.config.cache, clock=self.clock)
        self.core = AuthCore(policy=lambda: self.policy, pam=self.pam, lockout=LocalLockout(self.lockout), sessions=LocalSessions(self.sessions),
                             cache=self.cache,
                             emit=self.events.append, counters=self.counters, delay=self._delay, clock=self.clock, **core)

    async def _delay(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.clock.advance(seconds)

    async def auth(self, user: str = "alice", password: str = PASSWORD, **fields: Any) -> Outcome:
        fields.setdefault("service", "login")
        return await self.core.decide(PEER, AuthRequest(user=user, password=password, **fields))

    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def close(self) -> None:
        self.sessions.close()
        self.lockout.close()
