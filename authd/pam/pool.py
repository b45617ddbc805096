"""An asyncio pool of PAM worker processes.

PAM is blocking C that may crash, hang, call exit() or leak, so it runs in child processes
(``authd.pam.worker``) that the pool can kill and replace while the daemon sees no more than
one ``unavailable`` result. A call is one frame out and one frame back on a socketpair.
Children are reaped through pidfds on the event loop (no SIGCHLD handler, no watcher threads,
no pid-reuse races), and are spawned from the loop thread because PR_SET_PDEATHSIG is tied to
the thread that forked them. Callers waiting for a worker queue per peer uid and are served in
turn (``authd.pam.fairqueue``), so one local user's flood cannot hold everyone else's logins.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import msgspec
import structlog

from authd.errors import AuthdError
from authd.pam.binding import PamResult, validate
from authd.pam.fairqueue import FairQueue
from authd.pam.worker import HEADER, MAX_FRAME, frame

log = structlog.get_logger("authd.pam.pool")

START_TIMEOUT = 30.0  # a cold worker on a loaded host; not the per-call timeout
RETIRE_GRACE = 5.0  # a retired worker gets this long to exit on EOF before SIGKILL
RESPAWN_BACKOFF = (0.5, 30.0)

DropReason = Literal["crashed", "timed_out", "recycled", "cancelled", "closing"]

_encode_request = msgspec.msgpack.Encoder().encode
_decode_result = msgspec.msgpack.Decoder(PamResult).decode
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class _WorkerLost(Exception):
    """The worker went away or broke the protocol mid-call."""


class _CallTimeout(Exception):
    """The worker did not answer in time."""


class _QueueFull(Exception):
    """The caller's uid already has as many calls waiting as it may."""


class _Worker(asyncio.Protocol):
    """One child process and our end of its socket; at most one request outstanding."""

    def __init__(self, proc: subprocess.Popen[bytes], pidfd: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.pidfd: int | None = pidfd
        self.calls = 0
        self.dropped: DropReason | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._reply: asyncio.Future[bytes] | None = None
        self._gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._reply = asyncio.get_running_loop().create_future()  # the "ready" frame

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            end = HEADER.size + size
            if size > MAX_FRAME or self._reply is None:
                self._fail("oversized reply" if size > MAX_FRAME else "unrequested reply")
                return
            if len(self._buffer) < end:
                return
            body = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            reply, self._reply = self._reply, None
            if not reply.done():
                reply.set_result(body)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("worker went away")

    def _fail(self, why: str) -> None:
        self._gone = True
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(_WorkerLost(why))
        if self._transport is not None:
            self._transport.close()

    async def ready(self, timeout: float) -> None:
        if await self._await_reply(timeout) != b"":
            raise _WorkerLost("bad handshake")

    async def call(self, fields: tuple[str | None | bool, ...], timeout: float) -> PamResult:
        if self._gone or self._transport is None:
            raise _WorkerLost("worker went away")
        self._reply = asyncio.get_running_loop().create_future()
        self._transport.write(frame(_encode_request(fields)))
        try:
            return _decode_result(await self._await_reply(timeout))
        except msgspec.MsgspecError:
            raise _WorkerLost("undecodable reply") from None

    async def _await_reply(self, timeout: float) -> bytes:
        reply = self._reply
        assert reply is not None
        expire = asyncio.get_running_loop().call_later(timeout, _expire, reply)
        try:
            return await reply
        finally:
            expire.cancel()

    def kill(self) -> None:
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def hang_up(self) -> None:
        """Close our end: the worker sees EOF and exits by itself."""
        self._gone = True
        if self._transport is not None:
            self._transport.close()

    def reap(self) -> int:
        """Collect the exit status once the pidfd says the process is gone."""
        assert self.pidfd is not None
        asyncio.get_running_loop().remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = None
        status = self.proc.wait()
        self._fail("worker went away")
        self.exited.set_result(status)
        return status


def _expire(reply: asyncio.Future[bytes]) -> None:
    if not reply.done():
        reply.set_exception(_CallTimeout())


class PamPool:
    """Runs ``binding.authenticate`` in ``size`` worker processes; callers beyond that queue.

    Waiting callers queue per ``uid`` (the peer's), FIFO within a uid, and free workers go to
    the uids in turn; a uid that already has ``max_queued`` calls waiting gets ``busy`` at
    once. ``authenticate`` never raises for PAM or worker trouble: a worker that dies or exceeds
    ``timeout`` costs that one call an ``unavailable`` result (stage ``"worker"``) and is
    replaced in the background. Waiting for a free worker is bounded by ``timeout`` too.
    Workers retire after ``max_calls`` calls; with ``keep_modules`` they keep the PAM modules
    they have used loaded until then (``authd.pam.modulepins``). ``env`` is layered over ``os.environ`` for the
    workers. The pool never sleeps out ``fail_delay``: that is the caller's job.

    ``room``, if set, is called with the uid each time a call leaves that uid's queue (for a
    worker, or given up): the server reads no requests of a uid whose queue is full
    (``authd.intake``) and resumes on it.
    """

    def __init__(
        self,
        *,
        size: int,
        max_calls: int = 10_000,
        timeout: float = 10.0,
        keep_modules: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if size < 1 or max_calls < 1 or timeout <= 0:
            raise ValueError("size and max_calls must be >= 1 and timeout > 0")
        self.size = size
        self.max_calls = max_calls
        self.timeout = timeout
        self.keep_modules = keep_modules
        self._env = {**os.environ, **(env or {})}
        self._env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, self._env.get("PYTHONPATH")) if p
        )
        self._all: set[_Worker] = set()  # every child not yet reaped
        self._workers: set[_Worker] = set()  # in service: idle or busy
        self._idle: list[_Worker] = []  # LIFO: hot workers stay hot
        self._waiters: FairQueue[int | None, asyncio.Future[_Worker | None]] = FairQueue()
        self._spawners: set[asyncio.Task[None]] = set()
        self._spawn_lock = asyncio.Lock()
        self._inflight = 0
        self._quiet: asyncio.Future[None] | None = None
        self._closing = False
        self._closed = False
        self.room: Callable[[int | None], None] | None = None
        self._counts = dict.fromkeys(
            ("calls", "crashed", "timed_out", "recycled", "spawned", "spawn_failed", "refused_busy"), 0
        )

    async def start(self) -> None:
        """Spawn the workers and wait until each is ready; AuthdError if one cannot start."""
        results = await asyncio.gather(
            *(self._spawn() for _ in range(self.size)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, _Worker):
                self._enlist(result)
        if errors := [r for r in results if isinstance(r, BaseException)]:
            await self.close(0)
            raise AuthdError(f"PAM worker failed to start: {errors[0]}")

    async def authenticate(
        self,
        service: str,
        user: str,
        password: str,
        rhost: str | None = None,
        ruser: str | None = None,
        *,
        uid: int | None = None,
        max_queued: int | None = None,
        groups: bool = True,
    ) -> PamResult:
        """Authenticate in a worker, waiting in ``uid``'s queue if none is free; outcome
        ``busy`` if ``uid`` already has ``max_queued`` calls waiting (None: no bound). With
        ``groups`` False a success comes back without the user's groups (no NSS lookup).
        Raises only ValueError/TypeError, for unusable arguments."""
        validate(service, user, password, rhost, ruser)
        return await self._submit((service, user, password, rhost, ruser, False, groups), uid, max_queued)

    async def account(
        self,
        service: str,
        user: str,
        rhost: str | None = None,
        ruser: str | None = None,
        *,
        uid: int | None = None,
        max_queued: int | None = None,
        groups: bool = True,
    ) -> PamResult:
        """Only the account phase (pam_acct_mgmt) in a worker: for a credential-cache hit.
        Queued like ``authenticate``."""
        validate(service, user, "", rhost, ruser)
        return await self._submit((service, user, "", rhost, ruser, True, groups), uid, max_queued)

    async def _submit(self, fields: tuple[str | None | bool, ...], uid: int | None, max_queued: int | None) -> PamResult:
        if self._closed or (self._closing and not self._workers):
            return _unavailable("PAM pool is closed")
        self._inflight += 1
        try:
            return await self._call(fields, uid, max_queued)
        finally:
            self._inflight -= 1
            if self._quiet is not None and self._inflight == 0 and not self._quiet.done():
                self._quiet.set_result(None)

    async def _call(self, fields: tuple[str | None | bool, ...], uid: int | None, max_queued: int | None) -> PamResult:
        try:
            worker = await self._acquire(uid, max_queued)
        except _QueueFull:
            self._counts["refused_busy"] += 1
            return PamResult(outcome="busy", pam_code=-1, stage="worker", detail="too many calls waiting for this uid")
        if worker is None:
            return _unavailable("PAM pool is closed" if self._closed else "no PAM worker free")
        lost: DropReason | None = "cancelled"
        try:
            result = await worker.call(fields, self.timeout)
            lost = None
        except _CallTimeout:
            lost = "timed_out"
            return _unavailable(f"PAM call timed out after {self.timeout:g}s")
        except _WorkerLost as exc:
            lost = "crashed"
            return _unavailable(f"PAM worker died: {exc}")
        finally:
            if lost is not None:
                self._drop(worker, lost)
            else:
                self._counts["calls"] += 1
                worker.calls += 1
                if worker.calls >= self.max_calls:
                    self._drop(worker, "recycled")
                else:
                    self._release(worker)
        return result

    async def _acquire(self, uid: int | None, max_queued: int | None) -> _Worker | None:
        if self._idle and not self._waiters:
            return self._idle.pop()
        waiter: asyncio.Future[_Worker | None] = asyncio.get_running_loop().create_future()
        if not self._waiters.push(uid, waiter, max_queued):
            raise _QueueFull
        try:
            async with asyncio.timeout(self.timeout):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                if (worker := waiter.result()) is not None:
                    self._release(worker)  # handed over just as we gave up: pass it on
            elif self._waiters.remove(uid, waiter):
                self._left(uid)
            if isinstance(exc, TimeoutError):
                return None
            raise

    def _release(self, worker: _Worker) -> None:
        """Give a healthy worker to the next waiter in turn, else park it (retire it if closing)."""
        if worker not in self._workers:
            return
        while self._waiters:
            uid, waiter = self._waiters.pop_turn()
            self._left(uid)
            if not waiter.done():
                waiter.set_result(worker)
                return
        if self._closing:
            self._drop(worker, "closing")
        else:
            self._idle.append(worker)

    def _left(self, uid: int | None) -> None:
        if self.room is not None:
            self.room(uid)

    def _drop(self, worker: _Worker, reason: DropReason) -> None:
        """Take a worker out of service (once) and start its replacement."""
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        worker.dropped = reason
        if reason in ("recycled", "closing"):
            worker.hang_up()
            asyncio.get_running_loop().call_later(RETIRE_GRACE, worker.kill)
        else:
            worker.kill()
        if reason in self._counts:
            self._counts[reason] += 1
        if reason == "timed_out":
            log.warning("pam_worker_timed_out", pid=worker.pid, timeout=self.timeout)
        if not self._closing or self._waiters:
            task = asyncio.get_running_loop().create_task(self._respawn())
            self._spawners.add(task)
            task.add_done_callback(self._spawners.discard)

    async def _respawn(self) -> None:
        delay, limit = RESPAWN_BACKOFF
        while not self._closed:
            try:
                worker = await self._spawn()
            except Exception as exc:
                log.error("pam_worker_spawn_failed", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, limit)
                continue
            self._enlist(worker)
            return

    async def _spawn(self) -> _Worker:
        # One worker starts at a time: a crash storm cannot become a fork storm, and
        # pam_wrapper (in tests) picks its per-process temp dir racily.
        async with self._spawn_lock:
            return await self._start_worker()

    async def _start_worker(self) -> _Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "authd.pam.worker", str(child.fileno()),
                 *(["--keep-modules"] if self.keep_modules else [])],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # a PAM module's chatter has no terminal to go to
                env=self._env,
                start_new_session=True,
            )
        except Exception:
            parent.close()
            self._counts["spawn_failed"] += 1
            raise
        finally:
            child.close()
        loop = asyncio.get_running_loop()
        worker = _Worker(proc, os.pidfd_open(proc.pid))
        self._all.add(worker)
        loop.add_reader(worker.pidfd, self._on_exit, worker)
        try:
            await loop.create_unix_connection(lambda: worker, sock=parent)
        except BaseException:
            parent.close()
            worker.kill()
            raise
        try:
            await worker.ready(START_TIMEOUT)
        except BaseException as exc:
            worker.hang_up()
            worker.kill()
            if not isinstance(exc, Exception):
                raise
            self._counts["spawn_failed"] += 1
            raise AuthdError(_not_ready(worker, exc)) from None
        self._counts["spawned"] += 1
        return worker

    def _enlist(self, worker: _Worker) -> None:
        if self._closed:
            worker.kill()
            return
        self._workers.add(worker)
        self._release(worker)

    def _on_exit(self, worker: _Worker) -> None:
        status = worker.reap()
        self._all.discard(worker)
        if worker.dropped == "crashed" or (worker.dropped is None and worker in self._workers):
            log.warning("pam_worker_died", pid=worker.pid, status=status, calls=worker.calls)
            self._drop(worker, "crashed")  # no-op if its caller already did

    async def close(self, timeout: float) -> None:
        """Stop taking new calls; let those in flight or queued finish and the workers exit
        cleanly for up to ``timeout`` seconds; then SIGKILL whatever is left and reap it all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._closing = True
        for worker in list(self._idle):
            self._drop(worker, "closing")
        if self._inflight:
            self._quiet = loop.create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._quiet
            except TimeoutError:
                log.warning("pam_pool_drain_timeout", inflight=self._inflight)
        if self._all and not self._closed:
            exits = [w.exited for w in self._all]
            await asyncio.wait(exits, timeout=max(0, deadline - loop.time()))
        self.kill()
        if self._all:
            await asyncio.wait([w.exited for w in self._all], timeout=RETIRE_GRACE)

    def kill(self) -> None:
        """SIGKILL every worker now; calls in flight and queued return ``unavailable``."""
        self._closing = self._closed = True
        for task in list(self._spawners):
            task.cancel()
        for worker in self._all:
            worker.kill()
        self._workers.clear()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.pop()
            if not waiter.done():
                waiter.set_result(None)

    def queued(self, uid: int | None) -> int:
        """Calls of ``uid`` waiting for a worker now."""
        return self._waiters.queued(uid)

    def pids(self) -> list[int]:
        """Process ids of the workers in service (for status output and tests)."""
        return sorted(w.pid for w in self._workers)

    def stats(self) -> dict[str, int]:
        idle = len(self._idle)
        return {
            "size": self.size,
            "idle": idle,
            "busy": len(self._workers) - idle,
            "waiting": len(self._waiters),
            "waiting_uids": self._waiters.keys(),
            **self._counts,
        }


def _unavailable(detail: str) -> PamResult:
    return PamResult(outcome="unavailable", pam_code=-1, stage="worker", detail=detail)


def _not_ready(worker: _Worker, exc: Exception) -> str:
    if isinstance(exc, _CallTimeout):
        return f"worker {worker.pid} not ready after {START_TIMEOUT:g}s"
    status = worker.proc.poll()
    if status is not None:
        return f"worker {worker.pid} exited with status {status} before it was ready"
    return f"worker {worker.pid} not ready: {exc}"
