"""The outbox: events committed before replies, cursors across restarts, retries, dead letters, retention."""

from __future__ import annotations

import asyncio
import contextvars
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from authd.events import AUTH_FAILED, AUTH_SUCCEEDED, Event, EventBus, Handler, HandlerError
from authd.events.outbox import RETRY_WRITE, Outbox
from authd.events.retention import Retention

from ..clock import ManualClock
from ..filesystems import fill, tmpfs
from .conftest import eventually, run


class Flaky(Handler):
    """Fails retryably while `down` is set; records what it delivered."""

    def __init__(self, name: str = "webhook", *, max_age: float | None = 3600.0, **options: Any) -> None:
        super().__init__(name=name, max_age=max_age, retry_backoff=1.0, **options)
        self.down = True
        self.calls = 0
        self.got: list[str] = []

    async def handle(self, event: Event) -> None:
        self.calls += 1
        if self.down:
            raise HandlerError("receiver down", retry=True)
        self.got.append(event.id)


class Gated(Handler):
    """Delivers one event per `allow`; the next one waits in its thread."""

    def __init__(self, name: str, permits: threading.Semaphore) -> None:
        super().__init__(name=name)
        self.permits = permits
        self.got: list[str] = []

    def handle(self, event: Event) -> None:
        self.permits.acquire()
        self.got.append(event.id)


def committed_ids(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT id FROM events ORDER BY seq")]


def test_an_event_is_committed_before_durable_returns(tmp_path: Path) -> None:
    async def main() -> None:
        bus = EventBus(Outbox(tmp_path / "events.db"))
        await bus.start()

        async def request() -> Event:
            event = Event.create(AUTH_SUCCEEDED, user="alice")
            bus.emit(event)
            await bus.durable()
            return event

        events = await asyncio.gather(*(request() for _ in range(50)))
        assert set(committed_ids(tmp_path / "events.db")) == {e.id for e in events}
        await bus.close(5)

    run(main())


def test_a_request_that_emitted_nothing_does_not_wait() -> None:
    async def main() -> None:
        bus = EventBus()
        await bus.start()
        bus.emit(Event.create(AUTH_FAILED))  # this task's event, not yet committed
        assert not bus.settled()

        async def quiet() -> None:  # another request, in a context of its own, that emitted nothing
            await bus.durable()

        task = asyncio.create_task(quiet(), context=contextvars.Context())
        await asyncio.sleep(0)  # its first step: it did not wait for the commit
        assert task.done() and not bus.settled()
        await bus.close(5)

    run(main())


def test_undelivered_events_are_delivered_after_a_restart_exactly_from_the_cursor(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    permits = threading.Semaphore(4)  # four are delivered, the fifth blocks in its thread
    sent = [Event.create(AUTH_SUCCEEDED, user=f"u{i}") for i in range(10)]

    async def first() -> None:
        bus = EventBus(Outbox(path))
        slow = Gated("audit", permits)
        bus.set_handlers([slow])
        await bus.start()
        for event in sent:
            bus.emit(event)
        await eventually(lambda: len(slow.got) == 4)
        with capture_logs() as logs:
            assert await bus.close(0.2) == 6
        assert [r["undelivered"] for r in logs if r["event"] == "events not delivered at close"] == [6]

    async def second() -> list[str]:
        bus = EventBus(Outbox(path))
        resumed = Gated("audit", threading.Semaphore(100))
        bus.set_handlers([resumed])
        await bus.start()
        await eventually(lambda: len(resumed.got) == 6)
        assert await bus.close(5) == 0
        return resumed.got

    run(first())
    permits.release()  # let the stuck thread of the first bus end
    assert run(second()) == [e.id for e in sent[4:]]


def test_a_new_handler_starts_with_the_next_event_and_a_removed_ones_cursor_is_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    async def main() -> None:
        bus = EventBus(Outbox(path))
        await bus.start()
        bus.emit(Event.create(AUTH_SUCCEEDED))
        late = Flaky("late")
        late.down = False
        bus.set_handlers([late])
        bus.emit(Event.create(AUTH_FAILED))
        await eventually(lambda: late.got)
        assert [await bus.outbox.seq_of(i) for i in late.got] == [2]
        bus.set_handlers([])
        await eventually(lambda: "late" not in bus.outbox.cursors)
        await bus.close(5)

    run(main())


def test_retryable_failures_back_off_hold_later_events_and_succeed_in_order() -> None:
    clock = ManualClock(time.time())  # the events are made now

    async def main() -> None:
        bus = EventBus(clock=clock)
        hook = Flaky()
        bus.set_handlers([hook])
        await bus.start()
        sent = [Event.create(AUTH_SUCCEEDED, user=f"u{i}") for i in range(3)]
        for event in sent:
            bus.emit(event)
        delays = []
        for attempt in range(5):  # 1, 2, 4, 8, 16 seconds apart
            await eventually(lambda: clock.sleeping == 1)
            waited = min(t for t, f in clock._sleepers if not f.done()) - clock.now
            delays.append(waited)
            assert hook.got == []
            hook.down = attempt < 4  # the receiver is back for the sixth try
            clock.advance(waited)
        assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
        await eventually(lambda: len(hook.got) == 3)
        assert hook.got == [e.id for e in sent]
        counters = bus.stats()["handlers"]["webhook"]
        assert counters["retried"] == 5 and counters["delivered"] == 3 and counters["dead"] == 0
        assert await bus.close(5) == 0

    run(main())


def test_an_event_older_than_max_age_becomes_a_dead_letter_and_can_be_replayed() -> None:
    clock = ManualClock(time.time())  # the events are made now

    async def main() -> None:
        bus = EventBus(clock=clock)
        hook = Flaky(max_age=10.0)
        bus.set_handlers([hook])
        await bus.start()
        old = Event(name=AUTH_SUCCEEDED, id="a" * 32, time=clock.now, user="alice")
        bus.emit(old)
        with capture_logs() as logs:
            for _ in range(10):
                if bus.stats()["handlers"]["webhook"]["dead"]:
                    break
                await eventually(lambda: clock.sleeping == 1 or bus.stats()["handlers"]["webhook"]["dead"])
                clock.advance(8.0)
            await eventually(lambda: bus.stats()["handlers"]["webhook"]["dead"] == 1)
        assert [r["event_id"] for r in logs if r["event"] == "giving up on an event; kept as a dead letter"] == [old.id]
        await eventually(lambda: bus.outbox.cursors.get("webhook") == 1)
        (dead,) = await bus.outbox.dead_letters()
        assert dead["handler"] == "webhook" and dead["event"]["id"] == old.id and dead["error"] == "receiver down"
        hook.down = False
        replayed = await bus.outbox.take_dead("webhook", None)
        bus.worker("webhook").replay(replayed)
        await eventually(lambda: hook.got == [old.id])
        assert await bus.outbox.dead_letters() == []
        assert await bus.close(5) == 0

    run(main())


def test_a_final_failure_is_not_retried() -> None:
    class Refuses(Flaky):
        async def handle(self, event: Event) -> None:
            self.calls += 1
            raise HandlerError("HTTP 404")

    async def main() -> None:
        bus = EventBus(clock=ManualClock(time.time()))
        hook = Refuses()
        bus.set_handlers([hook])
        await bus.start()
        bus.emit(Event.create(AUTH_SUCCEEDED))
        bus.emit(Event.create(AUTH_SUCCEEDED))
        await eventually(lambda: hook.calls == 2)
        assert bus.stats()["handlers"]["webhook"]["failed"] == 2 and bus.stats()["handlers"]["webhook"]["retried"] == 0
        assert await bus.close(5) == 0

    run(main())


def test_stopping_while_retrying_leaves_the_event_in_the_log(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    async def first() -> None:
        bus = EventBus(Outbox(path), clock=ManualClock(time.time()))
        bus.set_handlers([Flaky()])
        await bus.start()
        bus.emit(Event.create(AUTH_SUCCEEDED, user="alice"))
        await eventually(lambda: bus.stats()["handlers"]["webhook"]["retried"] == 1)
        assert await bus.close(5) == 1

    async def second() -> list[str]:
        bus = EventBus(Outbox(path))
        hook = Flaky()
        hook.down = False
        bus.set_handlers([hook])
        await bus.start()
        await eventually(lambda: hook.got)
        assert await bus.close(5) == 0
        return hook.got

    run(first())
    assert len(run(second())) == 1


def test_retention_prunes_by_count_and_counts_what_was_never_delivered(tmp_path: Path) -> None:
    permits = threading.Semaphore(0)

    async def main() -> None:
        outbox = Outbox(tmp_path / "events.db", Retention(max_age=3600.0, max_events=1000))
        bus = EventBus(outbox, queue_size=10)
        stuck = Gated("audit", permits)
        bus.set_handlers([stuck])
        await bus.start()
        for i in range(1500):
            bus.emit(Event.create(AUTH_SUCCEEDED, user=f"u{i}"))
        with capture_logs() as logs:
            await outbox.run(lambda db: outbox._prune())
        (row,) = [r for r in logs if r["event"] == "events pruned before every handler delivered them"]
        assert row["pruned_undelivered"] == 500 and outbox.stats()["pruned_undelivered"] == 500
        assert await outbox.run(lambda db: db.execute("SELECT count(*) FROM events").fetchone()[0]) == 1000
        await bus.close(0.1)

    try:
        run(main())
    finally:
        permits.release(2000)


def test_an_unwritable_log_never_holds_a_reply_back(tmp_path: Path) -> None:
    (tmp_path / "events.db").mkdir()  # not a file: the log cannot be opened

    async def main() -> None:
        outbox = Outbox(tmp_path / "events.db")
        with capture_logs() as logs:
            bus = EventBus(outbox)
        assert outbox.storage_error and any(r["event"].startswith("event log cannot be opened") for r in logs)
        got: list[str] = []

        async def audit(event: Event) -> None:
            got.append(event.id)

        from authd.events import FunctionHandler

        bus.set_handlers([FunctionHandler(audit, name="audit")])
        await bus.start()
        event = Event.create(AUTH_SUCCEEDED)
        bus.emit(event)
        await bus.durable()
        await eventually(lambda: got == [event.id])
        assert bus.stats()["log"]["storage_error"]
        await bus.close(5)

    run(main())


async def _until_full(bus: EventBus, fs: Path, emitted: list[Event]) -> Path:
    """Fill `fs`, then emit until a commit needs a page the disk no longer has."""
    filler = fill(fs)
    for _ in range(500):
        emitted.append(Event.create(AUTH_SUCCEEDED, user="alice"))
        bus.emit(emitted[-1])
        await bus.durable()
        if bus.outbox.storage_error:
            break
    assert bus.outbox.storage_error and "full" in bus.outbox.storage_error
    return filler


async def _behind(path: Path, permits: threading.Semaphore,
                  retry_clock: Callable[[], float] = time.monotonic) -> tuple[EventBus, Gated, list[Event]]:
    """A bus whose handler, held by `permits`, has two events queued and three to read back
    from the log; and those five events."""
    bus = EventBus(Outbox(path, retry_clock=retry_clock), queue_size=2)
    behind = Gated("audit", permits)
    bus.set_handlers([behind])
    await bus.start()
    emitted = [Event.create(AUTH_SUCCEEDED, user="zoe") for _ in range(5)]
    for event in emitted:
        bus.emit(event)
    await bus.durable()
    return bus, behind, emitted


async def _fault(bus: EventBus, fs: Path, emitted: list[Event]) -> Path:
    """Fill the disk, then emit 20 events more than the log can take."""
    filler = await _until_full(bus, fs, emitted)
    for _ in range(20):
        emitted.append(Event.create(AUTH_SUCCEEDED, user="bob"))
        bus.emit(emitted[-1])
    return filler


def test_a_full_disk_holds_no_reply_back_while_the_writer_waits_to_retry(tmp_path: Path) -> None:
    """A failed write releases its replies; the events emitted before the writer's next try
    do not wait for it either; once it writes again, replies wait for their commit again, and
    none of the events is lost."""
    with tmpfs(tmp_path / "fs") as fs:
        path = fs / "events.db"

        async def main() -> None:
            retry_clock = ManualClock()
            bus = EventBus(Outbox(path, retry_clock=retry_clock))
            await bus.start()
            emitted: list[Event] = []
            filler = await _until_full(bus, fs, emitted)
            for _ in range(5):
                emitted.append(Event.create(AUTH_SUCCEEDED, user="bob"))
                bus.emit(emitted[-1])
                assert bus.settled(), "not held until the writer's next try"
                await bus.durable()
            filler.unlink()
            retry_clock.advance(RETRY_WRITE)
            emitted.append(Event.create(AUTH_SUCCEEDED, user="carol"))
            bus.emit(emitted[-1])  # wakes the writer, whose try is due
            await eventually(lambda: not bus.outbox.unwritable)
            assert committed_ids(path) == [event.id for event in emitted]
            emitted.append(Event.create(AUTH_SUCCEEDED, user="dave"))
            bus.emit(emitted[-1])
            assert not bus.settled(), "a reply waits for its commit again"
            await bus.durable()
            assert committed_ids(path)[-1] == emitted[-1].id
            await bus.close(5)

        run(main())


def test_a_handler_reading_the_log_back_delivers_what_the_log_holds_and_waits_for_the_rest(tmp_path: Path) -> None:
    """A handler that fell behind reads its events back from the log. During a fault it
    delivers what the log holds; those a full disk has not taken yet it waits for, through
    failed tries, instead of passing them by."""
    permits = threading.Semaphore(0)
    with tmpfs(tmp_path / "fs") as fs:
        path = fs / "events.db"

        async def main() -> None:
            retry_clock = ManualClock()
            bus, behind, emitted = await _behind(path, permits, retry_clock)
            filler = await _fault(bus, fs, emitted)
            permits.release(1000)
            in_the_log = committed_ids(path)
            assert 5 <= len(in_the_log) < len(emitted)
            await eventually(lambda: behind.got == in_the_log)
            assert await asyncio.wait_for(bus.outbox.first_seq(), 4) == 1, "a read does not wait for the next try"
            retry_clock.advance(RETRY_WRITE)
            emitted.append(Event.create(AUTH_SUCCEEDED, user="carol"))
            bus.emit(emitted[-1])
            await bus.outbox.run(lambda db: None)  # runs after the try this emit made due, which fails: the disk is still full
            assert bus.outbox.unwritable and behind.got == in_the_log
            filler.unlink()
            retry_clock.advance(RETRY_WRITE)
            emitted.append(Event.create(AUTH_SUCCEEDED, user="dave"))
            bus.emit(emitted[-1])  # wakes the writer, whose try is due and succeeds
            await eventually(lambda: len(behind.got) == len(emitted))
            assert behind.got == [event.id for event in emitted]
            await bus.close(5)

        run(main())


def test_a_handler_replaced_during_a_fault_delivers_nothing_its_successor_does(tmp_path: Path) -> None:
    """A reload hands a handler that waits for the log over to its successor: once the log is
    back, each event reaches one of the two, not both."""
    old_permits, new_permits = threading.Semaphore(0), threading.Semaphore(1000)
    with tmpfs(tmp_path / "fs") as fs:
        path = fs / "events.db"

        async def main() -> None:
            retry_clock = ManualClock()
            bus, old, emitted = await _behind(path, old_permits, retry_clock)
            filler = await _fault(bus, fs, emitted)
            old_permits.release(1000)
            in_the_log = committed_ids(path)
            await eventually(lambda: old.got == in_the_log)  # and now it waits for the log
            new = Gated("audit", new_permits)
            bus.set_handlers([new])
            filler.unlink()
            retry_clock.advance(RETRY_WRITE)
            emitted.append(Event.create(AUTH_SUCCEEDED, user="dave"))
            bus.emit(emitted[-1])
            await eventually(lambda: len(old.got) + len(new.got) >= len(emitted))
            await bus.close(5)
            assert old.got == in_the_log, "the replaced handler delivered nothing more"
            assert old.got + new.got == [event.id for event in emitted]

        run(main())


def test_a_stop_during_a_fault_does_not_wait_for_what_the_log_cannot_take(tmp_path: Path) -> None:
    permits = threading.Semaphore(0)
    with tmpfs(tmp_path / "fs") as fs:
        path = fs / "events.db"

        async def main() -> None:
            bus, behind, emitted = await _behind(path, permits, ManualClock())  # no try falls due by itself
            filler = await _fault(bus, fs, emitted)
            permits.release(1000)
            in_the_log = committed_ids(path)
            await eventually(lambda: behind.got == in_the_log)
            with capture_logs() as logs:
                undelivered = await asyncio.wait_for(bus.close(3600), 30)  # not held for the drain's hour
            assert undelivered == 0, "nothing is promised for after a restart that the log does not hold"
            (given_up,) = [r for r in logs if r["event"] == "event log not writable at close; events not written"]
            assert given_up["unwritten"] >= 20
            filler.unlink()

        run(main())


def test_a_dead_letter_whose_error_text_sqlite_cannot_bind_is_kept(tmp_path: Path) -> None:
    async def main() -> None:
        bus = EventBus(Outbox(tmp_path / "events.db"))
        await bus.start()
        event = Event.create(AUTH_SUCCEEDED, user="alice")
        seq = bus.outbox.append(event)
        bus.outbox.add_dead("webhook", seq, 3, "receiver said \udc80")  # a lone surrogate, as from a bad decode
        (dead,) = await bus.outbox.dead_letters()
        assert dead["error"] == "receiver said ?" and dead["event"]["id"] == event.id
        bus.emit(Event.create(AUTH_SUCCEEDED, user="bob"))
        await bus.durable()
        assert bus.outbox.storage_error is None
        await bus.close(5)

    run(main())


def test_close_gives_up_on_a_log_that_still_cannot_be_written(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs") as fs:

        async def main() -> None:
            bus = EventBus(Outbox(fs / "events.db"))
            await bus.start()
            await _until_full(bus, fs, [])
            for _ in range(3):
                bus.emit(Event.create(AUTH_SUCCEEDED, user="bob"))
            with capture_logs() as logs:
                await asyncio.wait_for(bus.close(5), 30)
            (given_up,) = [r for r in logs if r["event"] == "event log not writable at close; events not written"]
            assert given_up["unwritten"] >= 3 and bus.outbox.unwritten_dropped == given_up["unwritten"]

        run(main())


def test_an_event_that_cannot_be_encoded_is_left_out_and_counted(tmp_path: Path) -> None:
    """No front end lets one through (they all decode strict UTF-8); if one came, the log
    goes on without it."""
    path = tmp_path / "events.db"

    async def main() -> None:
        bus = EventBus(Outbox(path))
        await bus.start()
        good = [Event.create(AUTH_SUCCEEDED, user="alice"), Event.create(AUTH_SUCCEEDED, user="bob")]
        with capture_logs() as logs:
            bus.emit(good[0])
            bus.emit(Event.create(AUTH_SUCCEEDED, user="lone \udc80 surrogate"))
            bus.emit(good[1])
            await asyncio.wait_for(bus.durable(), 30)
        assert any(r["event"] == "event cannot be written; left out of the log" for r in logs)
        assert bus.outbox.stats()["unwritten_dropped"] == 1 and bus.outbox.storage_error is None
        assert committed_ids(path) == [event.id for event in good]
        await bus.close(5)

    run(main())


def test_if_the_writer_dies_nothing_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the writer thread ends it: replies, jobs (one in the very batch that broke it
    too), close, and a handler that was reading the log back must not hang or spin on it."""
    permits = threading.Semaphore(0)

    async def main() -> None:
        bus, behind, _ = await _behind(tmp_path / "events.db", permits)

        def broken(batch: Any) -> bool:
            raise RuntimeError("a bug in the writer")

        monkeypatch.setattr(bus.outbox, "_write", broken)
        with capture_logs() as logs:
            bus.emit(Event.create(AUTH_SUCCEEDED, user="bob"))
            with pytest.raises(RuntimeError, match="closed"):
                await asyncio.wait_for(bus.outbox.first_seq(), 30)  # in the batch that broke it
            await asyncio.wait_for(bus.durable(), 30)
        assert any(r["event"].startswith("event log writer crashed") for r in logs)
        assert bus.outbox.unwritable and "crashed" in (bus.outbox.storage_error or "")
        permits.release(1000)
        await eventually(lambda: not bus.stats()["handlers"]["audit"]["lag"])
        assert bus.stats()["handlers"]["audit"]["dropped"] >= 1
        await _live_again(bus, behind)

    run(main())


async def _live_again(bus: EventBus, behind: Gated) -> None:
    """With the log's writer dead, the handler takes a new event from memory; close ends."""
    late = Event.create(AUTH_SUCCEEDED, user="carol")
    bus.emit(late)
    await eventually(lambda: behind.got[-1:] == [late.id])
    await asyncio.wait_for(bus.close(5), 30)


def test_a_handler_removed_during_a_fault_leaves_no_cursor_behind(tmp_path: Path) -> None:
    """Its cursor, not yet written when it was removed, is not written back once the disk is."""
    with tmpfs(tmp_path / "fs") as fs:
        path = fs / "events.db"

        async def main() -> None:
            retry_clock = ManualClock()
            bus = EventBus(Outbox(path, retry_clock=retry_clock))
            audit = Gated("audit", threading.Semaphore(1000))
            bus.set_handlers([audit])
            await bus.start()
            emitted: list[Event] = []
            filler = await _until_full(bus, fs, emitted)
            await eventually(lambda: audit.got == [event.id for event in emitted])  # its cursor moved, unwritten
            bus.set_handlers([])
            await eventually(lambda: "audit" not in bus.outbox.cursors)  # its worker ended: forgotten
            filler.unlink()
            retry_clock.advance(RETRY_WRITE)
            bus.emit(Event.create(AUTH_SUCCEEDED, user="bob"))
            await eventually(lambda: not bus.outbox.unwritable)
            await bus.close(5)
            with sqlite3.connect(path) as db:
                assert db.execute("SELECT handler FROM cursors").fetchall() == []

        run(main())


def test_a_handler_whose_read_the_dying_writer_never_ran_delivers_from_memory_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    permits, inside, crash = threading.Semaphore(0), threading.Event(), threading.Event()

    async def main() -> None:
        bus, behind, _ = await _behind(tmp_path / "events.db", permits)

        def broken(batch: Any) -> bool:
            inside.set()
            crash.wait(30)
            raise RuntimeError("a bug in the writer")

        monkeypatch.setattr(bus.outbox, "_write", broken)
        bus.emit(Event.create(AUTH_SUCCEEDED, user="bob"))
        await eventually(inside.is_set)  # the writer holds that batch
        permits.release(1000)
        await eventually(lambda: bus.outbox._pending.jobs)  # the handler's read waits behind it
        with capture_logs() as logs:
            crash.set()
            await eventually(lambda: bus.outbox.stopped and not bus.stats()["handlers"]["audit"]["lag"])
        assert not any(r["event"] == "handler worker crashed" for r in logs)
        await _live_again(bus, behind)

    run(main())


def test_an_event_that_cannot_be_encoded_is_counted_once_through_failed_tries(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs") as fs:
        path = fs / "events.db"

        async def main() -> None:
            retry_clock = ManualClock()
            bus = EventBus(Outbox(path, retry_clock=retry_clock))
            await bus.start()
            emitted: list[Event] = []
            filler = await _until_full(bus, fs, emitted)
            dropped = bus.outbox.unwritten_dropped
            bus.emit(Event.create(AUTH_SUCCEEDED, user="lone \udc80 surrogate"))
            for _ in range(3):  # tries that fail: the disk is still full
                retry_clock.advance(RETRY_WRITE)
                emitted.append(Event.create(AUTH_SUCCEEDED, user="bob"))
                bus.emit(emitted[-1])
                await bus.outbox.run(lambda db: None)
            filler.unlink()
            retry_clock.advance(RETRY_WRITE)
            emitted.append(Event.create(AUTH_SUCCEEDED, user="carol"))
            bus.emit(emitted[-1])
            await eventually(lambda: not bus.outbox.unwritable)
            assert bus.outbox.unwritten_dropped == dropped + 1
            assert committed_ids(path) == [event.id for event in emitted]
            await bus.close(5)

        run(main())


def test_a_sequence_number_is_never_given_out_twice(tmp_path: Path) -> None:
    """Even when the events that held the highest numbers are gone (pruned, or left out)
    while a cursor or a dead letter still names them: a handler would skip the new event."""
    path = tmp_path / "events.db"

    async def main() -> list[int]:
        bus = EventBus(Outbox(path))
        await bus.start()
        for _ in range(3):
            bus.emit(Event.create(AUTH_SUCCEEDED, user="alice"))
        await bus.durable()
        await bus.close(5)
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM events WHERE seq > 1")
            db.execute("INSERT INTO cursors VALUES ('audit', 2)")
            db.execute("INSERT INTO dead VALUES ('webhook', 3, 1, 'gone', 0)")
        again = EventBus(Outbox(path))
        await again.start()
        seqs = [again.outbox.append(Event.create(AUTH_SUCCEEDED, user="bob")) for _ in range(2)]
        await again.close(5)
        return seqs

    assert run(main()) == [4, 5]
