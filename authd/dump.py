"""SIGUSR1's session dump: a point-in-time JSON snapshot, written atomically, never a token.

Only the list of sessions is taken on the event loop (one C-level copy); reading their fields
and encoding happen in a thread in small chunks, so the loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from . import securefs
from .protocol import PublicSession
from .sessions import Session

PREFIX = "sessions-"
_CHUNK = 2000


async def dump_sessions(sessions: list[Session], state_dir: Path, keep: int, pid: int) -> tuple[Path, dict[str, int]]:
    return await asyncio.to_thread(_write, sessions, state_dir, keep, pid)


def _write(sessions: list[Session], state_dir: Path, keep: int, pid: int) -> tuple[Path, dict[str, int]]:
    now = time.time()
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    final = state_dir / f"{PREFIX}{stamp}.json"
    tmp = state_dir / f".{final.name}.tmp"
    by_service: Counter[str] = Counter()
    encoder = msgspec.json.Encoder()
    fd = securefs.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(b'{"generated_at":%s,"pid":%d,"count":%d,"sessions":[' % (encoder.encode(now), pid, len(sessions)))
            for start in range(0, len(sessions), _CHUNK):
                rows: list[PublicSession] = []
                for session in sessions[start : start + _CHUNK]:
                    by_service[session.service] += 1
                    rows.append(session.public())
                body = encoder.encode(rows)[1:-1]
                out.write(b"," + body if start and body else body)
            out.write(b'],"by_service":%s}\n' % encoder.encode(dict(by_service)))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _prune(state_dir, keep)
    return final, dict(by_service)


def _prune(state_dir: Path, keep: int) -> None:
    dumps = sorted(state_dir.glob(f"{PREFIX}*.json"))
    for old in dumps[:-keep]:
        old.unlink(missing_ok=True)
