"""Shared fixtures: a pam_wrapper PAM environment and a real authd daemon on top of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .daemon import BASE_POLICY, PAM_SERVICE, PASSWORD, Daemon
from .pamenv import PamEnv, compile_pam_module


def pam_env(root: Path, users: tuple[str, ...] = ("alice", "bob")) -> PamEnv:
    """`users` (password PASSWORD) in PAM service `authd-test`, under `root`."""
    env = PamEnv.create(root)
    env.add_service(PAM_SERVICE)
    for user in users:
        env.add_user(user, PASSWORD, PAM_SERVICE)
    return env


@pytest.fixture
def pam(tmp_path: Path) -> PamEnv:
    """Users alice and bob (password PASSWORD) in PAM service `authd-test`."""
    return pam_env(tmp_path / "pam")


@pytest.fixture
def make_daemon(tmp_path: Path, pam: PamEnv) -> Iterator[Callable[..., Daemon]]:
    """Build (not start) daemons: `make_daemon(extra_toml, env={...})`.

    `extra` is appended to the base policy, i.e. into the `login` service table unless it opens
    another table; the service's failure delay is 0 unless `extra` sets one.
    """
    made: list[Daemon] = []

    def make(extra: str = "", *, base: str = BASE_POLICY, env: dict[str, str] | None = None, name: str = "d") -> Daemon:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        if "failure_delay" not in extra:
            extra = "failure_delay = 0.0\n" + extra
        daemon = Daemon(root, pam, base + extra, env=env)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.cleanup()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    """A running authd with the base policy."""
    return make_daemon().start()


@pytest.fixture(scope="session")
def crash_modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PAM modules that segfault, hang forever and call exit(), compiled with gcc."""
    out = tmp_path_factory.mktemp("pam-modules")
    sources = Path(__file__).parent / "pam" / "modules"
    return {name: compile_pam_module(sources / f"{name}.c", out) for name in ("segv", "hang", "exit")}


@pytest.fixture(scope="session", autouse=True)
def canary_written_nowhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """When the whole run is over, no file it produced may hold the canary password.

    That is every daemon's log and state dir, audit logs, dumps and handler output: everything
    under the session's temp root, except PAM's own inputs (a PamEnv's service and password
    files, where a test may register the canary as a real password). A hit fails the run as an
    error at teardown of its last test.
    """
    yield
    from .daemon import CANARY, scan_for

    base = tmp_path_factory.getbasetemp()
    pam_inputs = [passdb.parent for passdb in base.rglob("passdb") if (passdb.parent / "pam.d").is_dir()]
    hits = [hit for hit in scan_for(CANARY, base) if not any(Path(hit).is_relative_to(root) for root in pam_inputs)]
    if hits:
        pytest.fail(f"the canary password was written to {len(hits)} file(s): {hits[:20]}", pytrace=False)
