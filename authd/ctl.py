"""`authctl`: talk to a running authd from a shell. Passwords never come from argv."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from typing import Any

from . import __version__
from .client import DEFAULT_SERVICE, Client, ClientError, ReplyError, default_socket

Command = Callable[[Client, argparse.Namespace], dict[str, Any] | str]  # a str is printed as it is
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, help: str, args: Callable[[argparse.ArgumentParser], None] = lambda p: None) -> Callable[[Command], Command]:
    """Register a subcommand; other modules (lastlog, lockouts) add theirs the same way."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = (help, args, fn)
        return fn

    return register


EXIT_CODES = """exit status:
  0    authd answered ok (the reply is printed on stdout as JSON)
  1    authd answered with an error (the reply, with its "error" code, on stderr)
  2    nothing was asked: bad arguments, no password, or authd could not be reached
  130  interrupted

environment:
  AUTHD_SOCKET  the socket when -s is not given (else ./authd.sock if it exists,
                else /run/authd/authd.sock)"""


EMPTY_PASSWORD = "empty password (read from the first line of stdin when it is not a terminal); nothing sent"


class InputError(Exception):
    """The command line or stdin cannot make a request; nothing was sent."""


def read_password(prompt: str = "Password: ") -> str:
    """No-echo prompt on a terminal; otherwise the first line of stdin, without its line end.

    An empty password is refused here: PAM stacks differ on what they do with one (pam_unix's
    `nullok` lets a passwordless account in), and an empty stdin is almost always a mistake.
    """
    if sys.stdin.isatty():
        password = getpass.getpass(prompt)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise InputError(EMPTY_PASSWORD)
    return password


@command("hello", "server name, version, protocol, policy generation")
def _hello(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.hello()


def _auth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("user")
    p.add_argument("--service", default=DEFAULT_SERVICE, help=f"the [[service]] of authd.toml (default: {DEFAULT_SERVICE})")
    p.add_argument("--rhost")
    p.add_argument("--no-session", action="store_true", help="check the password only")


@command("auth", "authenticate USER (password from a no-echo prompt or stdin)", _auth_args)
def _auth(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.auth(a.user, read_password(), a.service, rhost=a.rhost, open_session=not a.no_session)


@command("session", "show the session of TOKEN", lambda p: p.add_argument("token"))
def _session(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.session(a.token)


@command("logout", "end the session of TOKEN", lambda p: p.add_argument("token"))
def _logout(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.logout(a.token)


@command("sessions", "list sessions (admin)", lambda p: p.add_argument("--user"))
def _sessions(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.sessions(a.user)


def _revoke_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="session_id")
    which.add_argument("--user")


@command("revoke", "revoke a session by --id, or all of a --user's (admin)", _revoke_args)
def _revoke(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.revoke(session_id=a.session_id, user=a.user)


@command("status", "counters, uptime, policy generation, queue depths (admin)")
def _status(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.status()


@command("pid", "the daemon's process id, for kill(1): kill -USR1 $(authctl pid) (admin)")
def _pid(c: Client, a: argparse.Namespace) -> str:
    return str(c.status()["pid"])


@command("reload", "reload authd.toml now; exits non-zero with the error if it is invalid (admin)")
def _reload(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.reload()


@command("metrics", "the Prometheus metrics, as a scrape of [metrics] listen would show them (admin)")
def _metrics(c: Client, a: argparse.Namespace) -> str:
    return str(c.metrics()["text"])


@command("lockouts", "current locks and failure counters (admin)")
def _lockouts(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.lockouts()


def _unlock_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("key", metavar="USER|RHOST")
    p.add_argument("--scope", choices=["user", "rhost"])


@command("unlock", "clear the lock and failures of USER or RHOST (admin)", _unlock_args)
def _unlock(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.unlock(a.key, a.scope)


@command("lastlog", "last login time, service, rhost and counts of USER (admin)", lambda p: p.add_argument("user"))
def _lastlog(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.lastlog(a.user)


def _cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["flush"])
    p.add_argument("user", nargs="?", help="only this user's entries")


@command("cache", "cache flush [USER]: drop credential-cache entries (admin)", _cache_args)
def _cache(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    return c.cache_flush(a.user)


def _events_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["status", "dead", "replay", "drop"], default="status")
    p.add_argument("handler", nargs="?", help="the handler's name (required for replay and drop)")
    p.add_argument("seqs", nargs="*", type=int, metavar="SEQ", help="only these dead letters (default: all)")


@command("events", "events [status | dead [HANDLER] | replay HANDLER [SEQ...] | drop HANDLER [SEQ...]] (admin)",
         _events_args)
def _events(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    if a.action in ("replay", "drop") and a.handler is None:
        raise SystemExit(f"authctl events {a.action}: name the handler")
    if a.action == "status":
        return c.call("events")
    if a.action == "dead":
        return c.call("events_dead", handler=a.handler)
    return c.call(f"events_{a.action}", handler=a.handler, seqs=a.seqs or None)


def _subscribe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--after", default="now", help="an event id, `now` (default) or `oldest`")
    p.add_argument("--events", nargs="+", metavar="PATTERN", help="event names, e.g. 'auth.*'")
    p.add_argument("--service", nargs="+", dest="services", metavar="SERVICE")


@command("subscribe", "print events as JSON lines as they happen (admin or [clients] subscribe_users)",
         _subscribe_args)
def _subscribe(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    for event in c.subscribe(after=a.after, events=a.events, services=a.services):
        print(event.to_json().decode(), flush=True)
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="authctl", description="Talk to a running authd.", epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"authctl {__version__}")
    parser.add_argument("-s", "--socket", default=None, help=f"authd socket (default: {default_socket()})")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        with Client(args.socket) as client:
            result = COMMANDS[args.command][2](client, args)
    except ReplyError as exc:
        exc.reply.pop("id", None)
        print(json.dumps(exc.reply, indent=2), file=sys.stderr)
        return 1
    except (ClientError, InputError) as exc:
        print(f"authctl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    try:
        if isinstance(result, str):
            print(result, end="" if result.endswith("\n") else "\n")  # metrics text ends in one
        else:
            result.pop("id", None)
            print(json.dumps(result, indent=2))
    except BrokenPipeError:  # `authctl status | head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
