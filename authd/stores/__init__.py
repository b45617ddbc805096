"""Where sessions and lockout state live: the interfaces the daemon uses, and the factory.

The auth core, the ops and the lifecycle only see the async protocols below; `build`
picks the backend `[store] backend` names. "sqlite" (the default) is one host's in-memory
tables written through to SQLite in the state dir; "redis" shares sessions and the lockout
budget across every host pointing at the same Redis, so a fleet behaves as one authd.

A backend that cannot reach its storage raises `StoreUnavailable`: callers answer
`unavailable` (never `invalid_session`, which would log users out), and nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ..lockout import Attempt, LockInfo, Locked, LockoutConfig
from ..lockout.table import Scope
from ..sessions import Session


class StoreUnavailable(Exception):
    """The shared store did not answer (down, slow, refusing); the request is not decided."""


class SessionStore(Protocol):
    """Issued sessions, by token (only its SHA-256 is kept), id and user."""

    persist_error: str | None  # why state is not being kept durably right now (for `status`)
    in_memory: bool  # lookups answer from memory, needing no task of their own (`authd.eager`)

    def __len__(self) -> int: ...

    def state(self) -> dict[str, Any]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, *, user: str, groups: Iterable[str], service: str, rhost: str | None, ttl: float,
                     idle_timeout: float) -> tuple[Session, str]: ...

    async def make_room(self, *, user: str, service: str, limit: int, evict_oldest: bool) -> list[Session]: ...

    async def lookup(self, token: str, *, touch: bool = True) -> Session | None: ...

    async def remove_token(self, token: str) -> Session | None: ...

    async def revoke(self, *, session_id: str | None = None, user: str | None = None) -> list[Session]: ...

    async def list(self, user: str | None = None) -> list[Session]: ...

    async def all(self) -> list[Session]: ...

    async def sweep(self, now: float) -> list[Session]:
        """Remove expired sessions; each one is returned by exactly one call, fleet-wide."""
        ...


class LockoutStore(Protocol):
    """Failure budgets reserved before PAM: at most `max_failures` distinct guesses reach it."""

    @property
    def config(self) -> LockoutConfig: ...

    @property
    def storage_error(self) -> str | None: ...

    def stats(self) -> dict[str, Any]: ...

    def census(self) -> dict[Scope, tuple[int, int]]:
        """Keys held and keys locked now, per scope, in this process (cheap: for every scrape)."""
        ...

    @property
    def locks_imposed(self) -> Mapping[Scope, int]: ...

    def configure(self, config: LockoutConfig) -> None: ...

    async def begin(self, user: str, rhost: str | None, password: str) -> Attempt | Locked: ...

    def untouched(self, user: str, rhost: str | None) -> bool:
        """True only if no budget of this user or rhost holds a failure, a lock or a guess in
        PAM, and there is room to track them, known without waiting (a store that would have
        to ask elsewhere says False)."""
        ...

    async def finish(self, attempt: Attempt, success: bool) -> tuple[Locked, ...]: ...

    async def cancel(self, attempt: Attempt) -> None: ...

    async def lockouts(self) -> list[LockInfo]: ...

    async def unlock(self, name: str, scope: Scope | None = None) -> bool: ...

    async def close(self) -> None: ...


class CacheDrops(Protocol):
    """Drops of credential-cache entries that other hosts' caches must see (`revoke --user`,
    `unlock`, `cache flush`). A login that may use the cache asks for the user's `mark` first;
    an entry vouches only under the mark it was stored with."""

    shared: bool  # False: one host, whose own cache is all there is (marks are always None)

    async def mark(self, user: str) -> Any: ...

    async def drop(self, user: str | None) -> None:
        """Count a drop of `user`'s entries (None: everyone's) where every host sees it."""
        ...


def build(policy: Any) -> tuple[SessionStore, LockoutStore, CacheDrops]:
    """The stores `[store]` names, built (not yet started) for `policy` (an `authd.policy.Policy`)."""
    from ..lockout import Lockout
    from ..sessions import SessionStore as SessionTable
    from .local import LocalCacheDrops, LocalLockout, LocalSessions

    config = policy.config.store
    local = Lockout(policy.config.lockout, policy.state_dir / "lockout.db")
    if config.backend == "sqlite":
        return LocalSessions(SessionTable(policy.state_dir / "sessions.db")), LocalLockout(local), LocalCacheDrops()
    from .redis import connect

    return connect(policy, local)
