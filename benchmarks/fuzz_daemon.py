"""Fuzz a running authd through its socket with mutated requests, and count what breaks.

    python -m benchmarks.fuzz_daemon [--seconds S | --inputs N] [--seed SEED] [--concurrency C]

A seeded mutator turns valid requests into hostile input: bit flips, truncation, inserted and
deleted bytes, invalid UTF-8, NULs, huge and boundary-sized fields, wrong types, unknown and
random ops, odd ids, deep nesting, non-object JSON, pipelined bursts of all of it, and clients
that hang up mid-line or before reading. Each input gets its own connection. The oracle:

- every complete line is answered by exactly one reply (blank lines by none; a line over
  `max_line` by one `too_large`, even if never completed), and every reply is one JSON object
  with an `id` (int, string or null), a boolean `ok`, and on failure a known error code and a
  message; the daemon closes the connection once the client has hung up;
- every `check_every` inputs and at the end: a fresh connection gets `hello` answered, the
  process is alive and `status` counts no `internal_errors`.

A failed oracle is a finding (a "crash"), kept with the input that caused it. The same seed
gives the same inputs. Standalone, this starts its own daemon over pam_wrapper + pam_matrix
and prints inputs tried, inputs/s and findings; tests/test_fuzz_daemon.py runs a short,
bounded session of the same harness.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from authd import protocol as p
from authd.client import AsyncClient, ClientError

ERROR_CODES = frozenset(v for k, v in vars(p).items() if k.isupper() and isinstance(v, str))
REPLY_TIMEOUT = 30.0
MAX_LINE = 65536

# Appended to the test policy's `login` service: short sessions so `sessions` replies stay
# small, a lockout to exercise, and handlers so events carry fuzzed values too.
POLICY_EXTRA = """
session_ttl = 5.0

[lockout]
user = { max_failures = 5, lock_time = 2.0 }
rhost = { max_failures = 20, lock_time = 2.0 }

[[handler]]
type = "audit"
path = "audit.jsonl"

[[handler]]
type = "lastlog"
"""
LIMITS = "[daemon.limits]\nwrite_buffer = 67108864\n\n"  # every reply is read: a cut-off would be a finding

OPS = ["hello", "auth", "session", "logout", "sessions", "revoke", "status", "reload", "lockouts", "unlock", "lastlog"]


def corpus(password: str, canary: str) -> list[dict[str, Any]]:
    """Valid requests of every op; the canary is the password of every failing login."""
    return [
        {"id": 1, "op": "hello"},
        {"id": 2, "op": "auth", "user": "alice", "password": password, "service": "login"},
        {"id": 3, "op": "auth", "user": "bob", "password": password, "service": "login", "open_session": False},
        {"id": "w", "op": "auth", "user": "alice", "password": canary, "service": "login", "rhost": "203.0.113.9"},
        {"id": 5, "op": "auth", "user": "mallory", "password": canary, "service": "login", "rhost": "2001:db8::1",
         "ruser": "m"},
        {"id": 6, "op": "auth", "user": "alice", "password": canary, "service": "imap"},
        {"id": 7, "op": "session", "token": "A" * 43},
        {"id": 8, "op": "logout", "token": "not-a-token"},
        {"id": 9, "op": "sessions", "user": "alice"},
        {"id": 10, "op": "revoke", "session_id": "abc"},
        {"id": 11, "op": "status"},
        {"id": 12, "op": "lockouts"},
        {"id": 13, "op": "unlock", "key": "alice", "scope": "user"},
        {"id": 14, "op": "lastlog", "user": "bob"},
        {"id": 15, "op": "reload"},
    ]


@dataclass(frozen=True)
class Input:
    data: bytes
    hang_up: int | None = None  # send this many bytes, then close without reading


class Mutator:
    """Deterministic for a seed: the n-th input is always the same."""

    def __init__(self, seed: int, requests: list[dict[str, Any]], max_line: int = MAX_LINE) -> None:
        self.rng = random.Random(seed)
        self.requests = requests
        self.max_line = max_line

    def next(self) -> Input:
        roll = self.rng.random()
        if roll < 0.15:
            lines = b"".join(self.line() for _ in range(self.rng.choice([2, 3, 5, 10, 40, 100])))
            return Input(lines)
        if roll < 0.25:
            data = self.line()
            return Input(data, hang_up=self.rng.randrange(len(data) + 1))
        return Input(self.line())

    def line(self) -> bytes:
        roll = self.rng.random()
        if roll < 0.1:
            return self.encode(self.request())
        if roll < 0.5:
            request = self.request()
            for _ in range(self.rng.randint(1, 3)):
                self.mutate_fields(request)
            return self.encode(request)
        if roll < 0.8:
            data = bytearray(self.encode(self.request()))
            for _ in range(self.rng.randint(1, 4)):
                self.mutate_bytes(data)
            return bytes(data)
        return self.oddity()

    def request(self) -> dict[str, Any]:
        return dict(self.rng.choice(self.requests))

    def encode(self, obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode() + b"\n"

    def value(self) -> Any:
        rng = self.rng
        return rng.choice([
            None, True, False, 0, -1, 2**63, -(2**63) - 1, 2**200, 1.5, float("1e308"), "", "x",
            "\0", "a\0b", "\ud800", "\U0001f600" * 10, "é" * 300, "x" * 255, "x" * 256, "x" * 257,
            "y" * 4096, "y" * 4097, "z" * rng.choice([self.max_line - 40, self.max_line + 10, 3 * self.max_line]),
            [], [1, "2", None], {}, {"op": "hello"}, "alice", "root", "login", "203.0.113.9",
            rng.choice(OPS), "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(1, 40))),
        ])

    def mutate_fields(self, request: dict[str, Any]) -> None:
        rng = self.rng
        keys = list(request) or ["id"]
        choice = rng.random()
        if choice < 0.35:
            request[rng.choice(keys)] = self.value()
        elif choice < 0.5:
            request.pop(rng.choice(keys), None)
        elif choice < 0.65:
            request[rng.choice(["extra", "admin", "ID", "op ", "password", "token", "key", "scope"])] = self.value()
        elif choice < 0.8:
            request["op"] = rng.choice([*OPS, "", "HELLO", "auth\0", "__class__", "x" * 300])
        else:
            request["id"] = rng.choice([None, True, 1.0, -0, 2**64, "", "i" * 256, "i" * 257, "\0", [1], {"a": 1}])

    def mutate_bytes(self, data: bytearray) -> None:
        rng = self.rng
        if not data:
            data.extend(b"{")
        at = rng.randrange(len(data))
        choice = rng.random()
        if choice < 0.25:
            data[at] ^= 1 << rng.randrange(8)
        elif choice < 0.4:
            del data[at:]
            data.extend(rng.choice([b"", b"\n"]))
        elif choice < 0.55:
            data[at:at] = rng.choice([b"\0", b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\n", b"\r", b'"', b"\\",
                                      b"\\u0000", b"{", b"}", b"[", b",", b":", bytes([rng.randrange(256)])])
        elif choice < 0.7:
            del data[at : at + rng.randrange(1, 16)]
        elif choice < 0.85:
            end = min(len(data), at + rng.randrange(1, 32))
            data[at:at] = data[at:end] * rng.randrange(2, 50)
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))

    def oddity(self) -> bytes:
        rng = self.rng
        depth = rng.choice([64, 1000, 20000])
        return rng.choice([
            b"\n", b"   \t \n", b"\r\n", b"\xef\xbb\xbf" + self.encode({"id": 1, "op": "hello"}),
            b"null\n", b"[]\n", b'"hello"\n', b"1\n", b"{}\n", b'{"id":1}\n', b'{"op":"hello"}\n',
            b'{"id":1,"op":"hello","x":' + b"[" * depth + b"]" * depth + b"}\n",
            b'{"id":1,"op":"hello","x":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}\n",
            b'{"id":' + b"9" * rng.choice([20, 400, 5000]) + b',"op":"hello"}\n',
            b'{"id":1,"op":"hello","id":2}\n',
            b'{"id":1,"op":"hello"' + b" " * (self.max_line - 20) + b"}\n",
            b'{"id":1,"op":"hello","p":"' + b"q" * (self.max_line - 28) + b'"}\n',
            b'{"id":1,"op":"hello","p":"' + b"q" * (self.max_line - 27) + b'"}\n',
            b"x" * (self.max_line + 1),
            b"\0" * rng.randrange(1, 100) + b"\n",
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\n",
        ])


def expected_replies(data: bytes, max_line: int) -> int:
    """How many replies a daemon that has seen `data`, then EOF, owes (see protocol.Decoder)."""
    *complete, tail = data.split(b"\n")
    owed = sum(1 for line in complete if len(line) > max_line or line.strip())
    return owed + (len(tail) > max_line)


def check_replies(data: bytes, raw: bytes, max_line: int) -> str | None:
    """The oracle for one input: None if the replies are right, else what is wrong."""
    if raw and not raw.endswith(b"\n"):
        return "reply not newline-terminated"
    replies = raw.split(b"\n")[:-1] if raw else []
    for line in replies:
        try:
            reply = msgspec.json.decode(line)
        except msgspec.DecodeError:
            return f"reply is not JSON: {line[:200]!r}"
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool) or "id" not in reply:
            return f"reply is not an object with id and ok: {line[:200]!r}"
        if isinstance(reply["id"], bool) or not isinstance(reply["id"], int | str | None):
            return f"reply id has a wrong type: {line[:200]!r}"
        if not reply["ok"] and (reply.get("error") not in ERROR_CODES or not isinstance(reply.get("message"), str)):
            return f"error reply without a known code and a message: {line[:200]!r}"
    owed = expected_replies(data, max_line)
    if len(replies) != owed:
        return f"{len(replies)} replies for {owed} complete lines"
    return None


@dataclass
class Finding:
    number: int
    input: Input
    problem: str


@dataclass
class Report:
    tried: int = 0
    replies: int = 0
    seconds: float = 0.0
    health_checks: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tried / self.seconds if self.seconds else 0.0


class Fuzzer:
    """Drives the daemon at `socket` with `Mutator` inputs, `concurrency` connections at a time."""

    def __init__(self, socket: Path, mutator: Mutator, *, alive: Callable[[], bool], concurrency: int = 8,
                 check_every: int = 250, max_line: int = MAX_LINE) -> None:
        self.socket = socket
        self.mutator = mutator
        self.alive = alive
        self.concurrency = concurrency
        self.check_every = check_every
        self.max_line = max_line
        self.report = Report()

    async def run(self, *, inputs: int | None = None, seconds: float | None = None) -> Report:
        started = time.monotonic()
        deadline = started + seconds if seconds is not None else float("inf")
        pending: set[asyncio.Task[None]] = set()
        number = 0
        while (inputs is None or number < inputs) and time.monotonic() < deadline:
            if len(pending) >= self.concurrency:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            item = self.mutator.next()
            number += 1
            pending.add(asyncio.create_task(self._try(number, item)))
            if number % self.check_every == 0:
                await self._health(number)
            if not self.alive():
                break
        if pending:
            await asyncio.wait(pending)
        await self._health(number)
        self.report.tried = number
        self.report.seconds = time.monotonic() - started
        return self.report

    async def _try(self, number: int, item: Input) -> None:
        try:
            problem = await asyncio.wait_for(self._send(item), REPLY_TIMEOUT)
        except TimeoutError:
            problem = f"no EOF within {REPLY_TIMEOUT:g}s"
        except (ConnectionError, OSError) as exc:
            problem = None if item.hang_up is not None else f"connection failed: {exc!r}"
        if problem is not None:
            self.report.findings.append(Finding(number, item, problem))

    async def _send(self, item: Input) -> str | None:
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        try:
            if item.hang_up is not None:
                writer.write(item.data[: item.hang_up])
                writer.transport.abort()
                return None
            received = asyncio.create_task(reader.read())
            try:
                view = memoryview(item.data)
                for start in range(0, len(view), 16384):  # a big input arrives in pieces
                    writer.write(view[start : start + 16384])
                    await writer.drain()
                writer.write_eof()
                raw = await received
            finally:
                received.cancel()
                await asyncio.gather(received, return_exceptions=True)
            self.report.replies += raw.count(b"\n")
            return check_replies(item.data, raw, self.max_line)
        finally:
            writer.close()

    async def _health(self, number: int) -> None:
        self.report.health_checks += 1
        if not self.alive():
            self.report.findings.append(Finding(number, Input(b""), "daemon process died"))
            return
        try:
            async with AsyncClient(self.socket) as client:
                await asyncio.wait_for(client.hello(), REPLY_TIMEOUT)
                status = await asyncio.wait_for(client.status(), REPLY_TIMEOUT)
        except (ClientError, OSError, TimeoutError) as exc:
            self.report.findings.append(Finding(number, Input(b""), f"health check failed: {exc!r}"))
            return
        if errors := status["counters"].get("internal_errors"):
            self.report.findings.append(Finding(number, Input(b""), f"status counts {errors} internal_errors"))


def describe(finding: Finding) -> str:
    data = finding.input.data
    shown = repr(data[:300]) + (f"... ({len(data)} bytes)" if len(data) > 300 else "")
    hang_up = f", hang up after {finding.input.hang_up} bytes" if finding.input.hang_up is not None else ""
    return f"#{finding.number}: {finding.problem}\n    input{hang_up}: {shown}"


def main(argv: list[str] | None = None) -> int:
    from tests.daemon import BASE_POLICY, CANARY, PAM_SERVICE, PASSWORD, Daemon
    from tests.pamenv import PamEnv

    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz_daemon", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    parser.add_argument("--inputs", type=int, help="stop after this many inputs instead")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="default: the current time")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--findings", type=Path, help="where failing inputs are saved (default: the scratch dir)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="authd-fuzz-"))
    pam = PamEnv.create(root / "pam")
    pam.add_service(PAM_SERVICE)
    for user in ("alice", "bob"):
        pam.add_user(user, PASSWORD, PAM_SERVICE)
    policy = BASE_POLICY.replace("[clients]", LIMITS + "[clients]").replace('log_level = "debug"', 'log_level = "info"')
    (root / "d").mkdir()
    daemon = Daemon(root / "d", pam, policy + "failure_delay = 0.0\n" + POLICY_EXTRA)
    print(f"seed {args.seed}; daemon in {daemon.root}")
    try:
        daemon.start()
        mutator = Mutator(args.seed, corpus(PASSWORD, CANARY))
        fuzzer = Fuzzer(daemon.socket, mutator, alive=lambda: daemon.proc is not None and daemon.proc.poll() is None,
                        concurrency=args.concurrency)
        seconds = None if args.inputs else args.seconds
        report = asyncio.run(fuzzer.run(inputs=args.inputs, seconds=seconds))
        alive = daemon.proc is not None and daemon.proc.poll() is None
        status = daemon.call("status") if alive else {}
        tracebacks = daemon.output().count("Traceback") + sum("exception" in line for line in daemon.log_lines())
        leaked = CANARY in daemon.output()
    finally:
        daemon.cleanup()
    print(f"inputs tried:   {report.tried}")
    print(f"inputs/s:       {report.rate:.0f}")
    print(f"replies read:   {report.replies}")
    print(f"health checks:  {report.health_checks}")
    print(f"findings:       {len(report.findings)}")
    print(f"daemon:         {'alive' if alive else 'DEAD'}, internal_errors "
          f"{status.get('counters', {}).get('internal_errors', 0)}, tracebacks in log {tracebacks}, "
          f"canary in log {'YES' if leaked else 'no'}")
    if report.findings:
        saved = args.findings or root / "findings"
        saved.mkdir(parents=True, exist_ok=True)
        for finding in report.findings[:20]:
            print(describe(finding))
        for finding in report.findings:
            (saved / f"seed{args.seed}-{finding.number}.bin").write_bytes(finding.input.data)
        print(f"failing inputs saved in {saved}/")
    failed = bool(report.findings) or not alive or bool(tracebacks) or leaked
    if failed:
        print(f"the daemon's log and state are in {daemon.root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
