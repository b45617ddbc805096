"""A PAM worker process: ``python -m authd.pam.worker FD [--keep-modules]``.

Runs one PAM transaction at a time for the daemon, so a module that crashes, hangs or calls
exit() takes down this process and not the daemon. With ``--keep-modules`` it keeps the PAM
modules it has used loaded between transactions (``authd.pam.modulepins``). It talks over the inherited AF_UNIX stream
socket FD, never stdin/stdout (PAM modules may print), in frames of a 4-byte big-endian length
and a msgpack body: a ``Request`` in, a ``PamResult`` out. An empty frame once at start-up
says "ready". EOF on the socket means "exit". Imports stay minimal so a worker starts fast.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import struct
import sys

import msgspec

from authd.groups import user_groups
from authd.hardening import no_core_dumps
from authd.pam import binding
from authd.pam.binding import PamResult
from authd.pam.modulepins import ModulePins

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 20

# The daemon's lifecycle signals are for the daemon: a worker is ended by EOF or SIGKILL only.
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


class Request(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One authentication to run; sent as a msgpack array to keep frames small."""

    service: str
    user: str
    password: str
    rhost: str | None = None
    ruser: str | None = None
    account_only: bool = False  # skip pam_authenticate: the credential cache vouches for the password
    groups: bool = True  # look the user's groups up after a success (False: nobody will read them)

    def __repr__(self) -> str:
        return f"Request(service={self.service!r}, user={self.user!r}, rhost={self.rhost!r})"


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def _die_with_parent() -> None:
    """Have the kernel SIGKILL us if the daemon dies, even while a module is stuck in C."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _read_frame(stream) -> bytes | None:  # type: ignore[no-untyped-def]
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        return None
    body = stream.read(size)
    return body if len(body) == size else None


def _run(request: Request, pins: ModulePins | None) -> PamResult:
    try:
        result = binding.authenticate(
            request.service, request.user, request.password, request.rhost, request.ruser, request.account_only,
            on_start=pins.hold if pins is not None else None,
        )
        if result.ok and request.groups:
            return msgspec.structs.replace(result, groups=user_groups(request.user))
        return result
    except Exception as exc:  # str(exc) might echo an argument: report the type only
        detail = type(exc).__name__
        return PamResult(outcome="unavailable", pam_code=-1, stage="worker", detail=detail)


def serve(fd: int, *, keep_modules: bool = False) -> int:
    """Answer requests on ``fd`` until EOF."""
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)  # a helper spawned by a PAM module must not hold our socket
    stream = sock.makefile("rb")
    decode = msgspec.msgpack.Decoder(Request).decode
    encode = msgspec.msgpack.Encoder().encode
    binding.load()
    pins = ModulePins() if keep_modules else None
    sock.sendall(frame(b""))
    while (body := _read_frame(stream)) is not None:
        result = _run(decode(body), pins)
        del body  # drop the password as soon as PAM is done with it
        sock.sendall(frame(encode(result)))
        if pins is not None:
            pins.refresh()  # a module file replaced on disk: the next call loads the new one
    return 0


def main(argv: list[str]) -> int:
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    _die_with_parent()
    no_core_dumps()
    if len(argv) not in (2, 3) or not argv[1].isdigit() or argv[2:] not in ([], ["--keep-modules"]):
        print("usage: python -m authd.pam.worker FD [--keep-modules]", file=sys.stderr)
        return 2
    return serve(int(argv[1]), keep_modules=argv[2:] == ["--keep-modules"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
