"""Who is on the other end of a Unix socket, from the kernel (SO_PEERCRED, SO_PEERGROUPS)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return cls(pid, uid, gid, frozenset({gid, *_peer_groups(sock)}))

    def log_fields(self) -> dict[str, int]:
        return {"peer_pid": self.pid, "peer_uid": self.uid}


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """Supplementary groups of the peer as the kernel recorded them at connect time."""
    size = 64 * 4
    while size <= 65536 * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == 34:  # ERANGE: more groups than fit, try a larger buffer
                size *= 4
                continue
            return ()
        return struct.unpack(f"{len(raw) // 4}I", raw)
    return ()
