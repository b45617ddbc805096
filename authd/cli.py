"""`authd`: serve, check-config, --version."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import structlog

from . import __version__, logs, preflight, systemd
from . import policy as policy_mod
from .dovecot.listener import Dovecot
from .errors import AuthdError, ConfigError
from .events import model as events
from .hardening import no_core_dumps
from .lifecycle import Lifecycle
from .metrics.server import MetricsServer
from .native import Native
from .ops import Context
from .runtime import Runtime, prepare_state_dir
from .saslauthd.listener import Saslauthd
from .server import Server

DEFAULT_CONFIG = os.environ.get("AUTHD_CONFIG", "authd.toml")
Ready = Callable[[str | None], None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="authd", description="PAM authentication daemon for Unix sockets.")
    parser.add_argument("--version", action="version", version=f"authd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the daemon")
    serve_p.add_argument("-c", "--config", default=DEFAULT_CONFIG, type=Path)
    serve_p.add_argument("--daemon", action="store_true", help="detach (for hosts without systemd)")
    serve_p.add_argument("--pidfile", type=Path, help="with --daemon: a locked pidfile")
    check_p = sub.add_parser("check-config", help="validate authd.toml and exit 0 (valid) or 1")
    check_p.add_argument("-c", "--config", default=DEFAULT_CONFIG, type=Path)
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
    if args.daemon:
        return serve_daemonized(args.config, args.pidfile)
    return serve(args.config)


def check_config(path: Path) -> int:
    """The policy load of a start or reload, then what `serve` needs of the machine."""
    try:
        policy = policy_mod.load(path, 0, build=False)
        preflight.check(policy)
    except ConfigError as exc:
        print(f"authd: {exc}", file=sys.stderr)
        return 1
    services, handlers = len(policy.services), len(policy.config.handler)
    print(f"{policy.source}: ok ({services} service{'s' * (services != 1)}, {handlers} handler{'s' * (handlers != 1)})")
    return 0


def serve(path: Path, ready: Ready | None = None, daemon_log: Path | None = None) -> int:
    """Load the policy, then run until drained. `ready` hears once: None when serving, or why not.

    `daemon_log` (from `--daemon`) is where fds 1 and 2 go, reopened on SIGHUP.
    """
    ready = ready or (lambda error: None)
    try:
        policy = policy_mod.load(path, 1)
    except ConfigError as exc:
        print(f"authd: {exc}", file=sys.stderr)
        ready(str(exc))
        return 1
    daemon = policy.daemon
    log_file = policy.path(daemon.log_file) if daemon.log_file else daemon_log
    try:
        logs.configure(level=daemon.log_level, fmt=daemon.log_format, path=str(log_file) if log_file else None,
                       std=daemon_log is not None)
    except (OSError, ConfigError) as exc:
        message = str(exc) if isinstance(exc, ConfigError) else f"daemon.log_file: cannot open {log_file}: {exc.strerror}"
        print(f"authd: {message}", file=sys.stderr)
        ready(message)
        return 1
    try:
        return asyncio.run(_run(policy, ready))
    except AuthdError as exc:
        structlog.get_logger("authd").error("cannot start", error=str(exc))
        print(f"authd: {exc}", file=sys.stderr)
        ready(str(exc))
        return 1


async def _run(policy: policy_mod.Policy, ready: Ready) -> int:
    no_core_dumps()
    rt = Runtime(policy)
    server = Server(rt)
    lifecycle = Lifecycle(rt, server)
    metrics = MetricsServer(rt, lifecycle)
    lifecycle.install_signal_handlers()
    await rt.start()
    try:
        inherited = systemd.listen_fds()
        native = inherited.get("authd") or inherited.get("unknown") or [None]
        await server.listen(Native(Context(rt, lifecycle)), policy.socket_path, native[0])
        for front in (Saslauthd(rt.core), Dovecot(rt.core)):
            sock = (inherited.get(front.name) or [None])[0]
            path = policy.front_socket(front.name)
            if sock is not None or path is not None:
                await server.listen(front, path, sock)
        await metrics.listen()
        await metrics.serve()  # before the auth sockets: a client that is answered finds every socket up
        await server.serve()
    except BaseException:
        server.stop_accepting()
        metrics.close()
        await rt.pam.close(0)
        raise
    rt.emit(events.DAEMON_STARTED, generation=policy.generation)
    structlog.get_logger("authd").info("ready", pid=os.getpid(), generation=policy.generation, socket=str(policy.socket_path))
    ready(None)
    try:
        return await lifecycle.run()
    finally:
        metrics.close()  # after the drain: a scrape can watch it


def serve_daemonized(path: Path, pidfile: Path | None) -> int:
    from .daemonize import run_daemon

    try:
        policy = policy_mod.load(path, 0, build=False)
    except ConfigError as exc:
        print(f"authd: {exc}", file=sys.stderr)
        return 1
    try:
        prepare_state_dir(policy)
    except ConfigError as exc:
        print(f"authd: {exc}", file=sys.stderr)
        return 1
    daemon = policy.daemon
    log_file = policy.path(daemon.log_file) if daemon.log_file else policy.state_dir / "authd.log"
    return run_daemon(  # the pidfile is not resolved: a symlink there is refused, never followed
        lambda ready: serve(path.resolve(), ready, daemon_log=log_file),
        pidfile=pidfile or policy.state_dir / "authd.pid",
        log_file=log_file,
        working_directory=policy.base_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
