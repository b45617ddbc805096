"""authd.intake: when a connection of a uid with a full PAM queue may take a request, in memory.

The queue is a counter here; `room` is what the pool calls when a call leaves it. No sockets,
no sleeping: each step runs the loop until every connection that can move has moved.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from authd.intake import Intake

from .lockout.helpers import run


class Uids:
    """Each uid's PAM queue as a count, full at `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queued: Counter[int] = Counter()
        self.intake = Intake(lambda uid: self.queued[uid] >= self.limit)

    def leave(self, uid: int) -> None:
        """One call of `uid` leaves its queue (a worker took it), as the pool reports it."""
        self.queued[uid] -= 1
        self.intake.room(uid)


def full_uid(limit: int) -> tuple[Uids, list[str]]:
    """Uid 1's queue is full; the list records which connections took a request, in order."""
    uids = Uids(limit)
    uids.queued[1] = limit
    return uids, []


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def waiting_conn(uids: Uids, uid: int, name: str, took: list[str]) -> asyncio.Task[None]:
    """A connection that waits for its turn, then takes one request (which queues for PAM)."""

    async def conn() -> None:
        await uids.intake.wait(uid)
        took.append(name)
        uids.queued[uid] += 1
        uids.intake.room(uid)  # what the server does after every turn

    return asyncio.create_task(conn())


def test_a_uid_with_room_is_ready_and_a_full_one_is_not() -> None:
    uids = Uids(limit=2)
    uids.queued[1] = 2
    assert uids.intake.ready(0)
    assert not uids.intake.ready(1)


@run
async def test_each_call_that_leaves_lets_one_connection_in_in_arrival_order() -> None:
    uids, took = full_uid(limit=2)
    tasks = [waiting_conn(uids, 1, f"c{i}", took) for i in range(4)]
    await settle()
    assert took == [] and uids.intake.waiting() == 4
    uids.leave(1)
    await settle()
    assert took == ["c0"]  # one slot, one request: the queue is full again, nobody bounces
    uids.leave(1)
    uids.leave(1)
    await settle()
    assert took == ["c0", "c1", "c2"]
    assert not uids.intake.ready(1)  # c3 waits, and a newcomer would line up behind it
    uids.leave(1)
    await settle()
    assert took == ["c0", "c1", "c2", "c3"] and uids.intake.waiting() == 0
    await asyncio.gather(*tasks)


@run
async def test_another_uid_is_never_held_by_a_full_one() -> None:
    uids, took = full_uid(limit=2)
    flood = [waiting_conn(uids, 1, f"flood{i}", took) for i in range(3)]
    victim = waiting_conn(uids, 2, "victim", took)
    await settle()
    assert took == ["victim"]
    assert uids.intake.ready(2)
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, victim, return_exceptions=True)


@run
async def test_room_not_used_by_a_turn_is_passed_on_so_nobody_is_left_behind() -> None:
    """A connection let in that queues nothing (a session check, EOF) lets the next one in:
    no connection waits while its uid's queue has room and no call is left to free one."""
    uids, took = full_uid(limit=1)

    async def reads_eof(name: str) -> None:
        await uids.intake.wait(1)
        took.append(name)
        uids.intake.room(1)  # took nothing

    tasks = [asyncio.create_task(reads_eof(f"c{i}")) for i in range(5)]
    await settle()
    uids.leave(1)  # the last call: the queue is empty from here on
    await settle()
    assert took == [f"c{i}" for i in range(5)] and uids.intake.waiting() == 0
    await asyncio.gather(*tasks)


@run
async def test_a_connection_let_in_after_the_room_was_taken_waits_again_first_in_line() -> None:
    uids, took = full_uid(limit=1)
    tasks = [waiting_conn(uids, 1, f"c{i}", took) for i in range(2)]
    await settle()
    uids.queued[1] -= 1
    uids.intake.room(1)  # c0 is let in ...
    uids.queued[1] += 1  # ... but the slot is taken before it runs
    await settle()
    assert took == [] and uids.intake.waiting() == 2
    uids.leave(1)
    await settle()
    assert took == ["c0"]  # still ahead of c1
    uids.leave(1)
    await asyncio.gather(*tasks)
    assert took == ["c0", "c1"]


@run
async def test_a_connection_that_gives_up_leaves_the_line_and_passes_a_turn_it_was_given() -> None:
    uids, took = full_uid(limit=1)
    first = waiting_conn(uids, 1, "gone", took)
    second = waiting_conn(uids, 1, "c1", took)
    await settle()
    uids.leave(1)  # `gone` is let in ...
    first.cancel()  # ... and cancelled before it runs: its turn goes to c1
    await settle()
    assert took == ["c1"] and uids.intake.waiting() == 0
    await asyncio.gather(first, second, return_exceptions=True)


@run
async def test_a_turn_given_in_the_step_its_waiter_is_cancelled_goes_to_the_next_in_line() -> None:
    """A connection closed while waiting: its wait is cancelled, and in that same step (before
    its task runs and leaves the line) a call leaves the queue. The room goes to the next
    waiter, nothing raises; a drain in that step passes over the cancelled turn too."""
    uids, took = full_uid(limit=1)
    gone = waiting_conn(uids, 1, "gone", took)
    nxt = waiting_conn(uids, 1, "c1", took)
    last = waiting_conn(uids, 1, "c2", took)
    await settle()
    gone.cancel()
    uids.leave(1)  # `gone`'s turn is still first in line, and already cancelled
    await settle()
    assert took == ["c1"]
    third = waiting_conn(uids, 1, "c3", took)
    await settle()
    third.cancel()
    uids.intake.open_all()
    await asyncio.gather(gone, nxt, last, third, return_exceptions=True)
    assert took == ["c1", "c2"]


@run
async def test_a_drain_lets_every_waiting_connection_in_and_nobody_waits_after() -> None:
    uids, took = full_uid(limit=1)
    tasks = [waiting_conn(uids, 1, f"c{i}", took) for i in range(3)]
    await settle()
    uids.intake.open_all()
    await asyncio.gather(*tasks)
    assert sorted(took) == ["c0", "c1", "c2"]
    assert uids.intake.ready(1)  # full, but draining: every line is read and answered
