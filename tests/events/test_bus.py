"""The bus: per-handler order and isolation, timeouts, overflow, drain, swap, loop blocking."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from structlog.testing import capture_logs

from authd.events import (
    AUTH_SUCCEEDED,
    EVENT_NAMES,
    SESSION_OPENED,
    Event,
    EventBus,
    FunctionHandler,
    Handler,
)

from .conftest import eventually, run


def ev(name: str = AUTH_SUCCEEDED, **fields: Any) -> Event:
    return Event.create(name, **fields)


def fn(receiver: Any, events: str | list[str] = "*", **options: Any) -> FunctionHandler:
    """A function as a configured handler, as `[[handler]] type = "python"` makes one."""
    patterns = [events] if isinstance(events, str) else events
    return FunctionHandler(receiver, name=options.pop("name", None) or receiver.__name__, events=patterns, **options)


class Recorder(Handler):
    """A configured-style handler: records ids, optionally waits on a gate first."""

    def __init__(self, name: str, gate: threading.Event | None = None) -> None:
        super().__init__(name=name)
        self.gate = gate
        self.got: list[str] = []
        self.closed = False

    def handle(self, event: Event) -> None:
        if self.gate is not None:
            self.gate.wait()
        self.got.append(event.id)

    def close(self) -> None:
        self.closed = True


def test_order_is_preserved_per_handler_sync_and_async() -> None:
    async def main() -> None:
        bus = EventBus()
        got_sync: list[str] = []
        got_async: list[str] = []

        def sync_receiver(event: Event) -> None:
            got_sync.append(event.id)

        async def async_receiver(event: Event) -> None:
            await asyncio.sleep(0)
            got_async.append(event.id)

        bus.set_handlers([fn(sync_receiver), fn(async_receiver)])
        await bus.start()
        sent = [ev(user=f"u{i}") for i in range(300)]
        for event in sent:
            bus.emit(event)
        assert await bus.close(20) == 0
        assert got_sync == got_async == [e.id for e in sent]

    run(main())


def test_patterns_and_sender_filter() -> None:
    async def main() -> None:
        bus = EventBus()
        seen: dict[str, list[str]] = {"auth": [], "some": [], "imap": []}
        bus.set_handlers([
            fn(lambda e: seen["auth"].append(e.name), "auth.*", name="auth"),
            fn(lambda e: seen["some"].append(e.name), [SESSION_OPENED, "daemon.*"], name="some"),
            fn(lambda e: seen["imap"].append(e.service), AUTH_SUCCEEDED, services=["imap"], name="imap"),
        ])  # fmt: skip
        await bus.start()
        for name in EVENT_NAMES:
            bus.emit(ev(name, service="imap"))
        bus.emit(ev(AUTH_SUCCEEDED, service="smtp"))
        await bus.close(20)
        assert seen["auth"] == ["auth.succeeded", "auth.failed", "auth.locked_out", "auth.succeeded"]
        assert seen["some"] == ["session.opened", "daemon.started", "daemon.draining", "daemon.stopped"]
        assert seen["imap"] == ["imap"]

    run(main())


def test_a_raising_handler_is_counted_and_isolated() -> None:
    async def main() -> None:
        bus = EventBus()
        good: list[str] = []

        def boom(event: Event) -> None:
            raise RuntimeError("boom")

        async def async_boom(event: Event) -> None:
            raise ValueError("async boom")

        def exits(event: Event) -> None:
            raise SystemExit(3)

        async def async_exits(event: Event) -> None:
            raise SystemExit(4)

        bus.set_handlers([*map(fn, (boom, async_boom, exits, async_exits)), fn(lambda e: good.append(e.id), name="good")])
        await bus.start()
        with capture_logs() as logs:
            for _ in range(5):
                bus.emit(ev())
            assert await bus.close(20) == 0
        stats = bus.stats()["handlers"]
        for name in ("boom", "async_boom", "exits", "async_exits"):
            assert stats[name]["failed"] == 5 and stats[name]["delivered"] == 0
        assert stats["good"]["delivered"] == 5 and len(good) == 5
        assert bus.stats()["totals"]["failed"] == 20
        raised = [r for r in logs if r["event"] == "handler raised"]
        assert {r["handler"] for r in raised} == {"boom", "async_boom", "exits", "async_exits"}

    run(main())


def test_slow_and_hanging_handlers_block_nothing_and_time_out() -> None:
    release = threading.Event()
    slow_done: list[str] = []

    def slow(event: Event) -> None:
        time.sleep(5)
        slow_done.append(event.id)

    def hangs(event: Event) -> None:
        release.wait()

    async def async_hangs(event: Event) -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        bus = EventBus(handler_timeout=0.5)
        fast: list[str] = []
        bus.set_handlers([fn(slow), fn(hangs), fn(async_hangs), fn(lambda e: fast.append(e.id), name="fast")])
        await bus.start()
        sent = [ev() for _ in range(3)]
        for event in sent:
            bus.emit(event)  # returns at once: the slow handler has not even finished one event
        assert slow_done == []
        await eventually(lambda: len(fast) == 3)
        assert fast == [e.id for e in sent] and slow_done == []

        def timed_out(name: str) -> int:
            return bus.stats()["handlers"][name]["timed_out"]

        await eventually(lambda: timed_out("async_hangs") == 3)
        await eventually(lambda: timed_out("slow") >= 1 and timed_out("hangs") >= 1)
        with capture_logs() as logs:
            undelivered = await bus.close(0.5)
        late = {r["handler"]: r["undelivered"] for r in logs if r["event"] == "handler has undelivered events; delivered after restart"}
        assert late["hangs"] == 3  # one stuck in its thread, two queued behind it
        assert undelivered == sum(late.values()) >= 3
        stats = bus.stats()["handlers"]
        assert stats["fast"]["delivered"] == 3 and stats["hangs"]["delivered"] == 0

    try:
        run(main())
    finally:
        release.set()


def test_async_handlers_fall_back_to_the_bus_timeout() -> None:
    async def main() -> None:
        bus = EventBus(handler_timeout=0.2)

        async def hangs(event: Event) -> None:
            await asyncio.sleep(3600)

        bus.set_handlers([fn(hangs)])
        await bus.start()
        bus.emit(ev())
        bus.emit(ev())
        await eventually(lambda: bus.stats()["handlers"]["hangs"]["timed_out"] == 2)
        assert await bus.close(5) == 0

    run(main())


def test_a_full_queue_spills_to_the_log_and_loses_nothing() -> None:
    gate = threading.Event()
    got: list[str] = []
    got_small: list[str] = []

    def gated(event: Event) -> None:
        gate.wait()
        got.append(event.id)

    async def main() -> None:
        bus = EventBus(queue_size=5)
        bus.set_handlers([fn(gated), fn(lambda e: got_small.append(e.id), name="small", queue_size=2)])
        sent = [ev() for _ in range(20)]
        with capture_logs() as logs:
            for event in sent:  # before start(): nothing runs yet
                bus.emit(event)
        stats = bus.stats()
        assert stats["handlers"]["gated"] == {
            "delivered": 0, "failed": 0, "dropped": 0, "timed_out": 0, "retried": 0, "dead": 0, "blocked_loop": 0,
            "queued": 5, "lag": 20,
        }  # fmt: skip
        assert stats["handlers"]["small"]["queued"] == 2 and stats["totals"]["dropped"] == 0
        behind = [r for r in logs if r["event"] == "handler behind; reading its events back from the log"]
        assert sorted(r["handler"] for r in behind) == ["gated", "small"]  # logged once, not per event
        await bus.start()
        gate.set()
        assert await bus.close(20) == 0
        assert got == got_small == [e.id for e in sent]
        assert bus.stats()["totals"]["delivered"] == 40

    try:
        run(main())
    finally:
        gate.set()


def test_close_flushes_queues_and_reports_what_it_could_not_deliver() -> None:
    gate = threading.Event()

    async def main() -> None:
        bus = EventBus()
        flushed: list[str] = []

        async def slowish(event: Event) -> None:
            await asyncio.sleep(0.005)
            flushed.append(event.id)

        stuck = Recorder("stuck", gate)
        bus.set_handlers([fn(slowish), stuck])
        await bus.start()
        for _ in range(50):
            bus.emit(ev())
        with capture_logs() as logs:
            undelivered = await bus.close(1.0)
        assert len(flushed) == 50
        assert undelivered == 50 and stuck.got == []  # 1 in flight + 49 queued
        assert any(r["event"] == "events not delivered at close" and r["undelivered"] == 50 for r in logs)
        bus.emit(ev())  # after close: discarded, counted, never raises
        assert bus.stats()["totals"]["dropped"] == 1

    try:
        run(main())
    finally:
        gate.set()


def test_set_handlers_swaps_and_old_handlers_finish_their_queue() -> None:
    gate = threading.Event()

    async def main() -> None:
        bus = EventBus()
        old = Recorder("old", gate)
        bus.set_handlers([old])
        await bus.start()
        before = [ev() for _ in range(3)]
        for event in before:
            bus.emit(event)
        new = Recorder("new")
        bus.set_handlers([new])
        after = [ev() for _ in range(2)]
        for event in after:
            bus.emit(event)
        await eventually(lambda: len(new.got) == 2)
        assert old.got == [] and set(bus.stats()["handlers"]) == {"old", "new"}
        gate.set()
        await eventually(lambda: old.closed)
        assert old.got == [e.id for e in before] and new.got == [e.id for e in after]
        stats = bus.stats()
        assert list(stats["handlers"]) == ["new"] and stats["totals"]["delivered"] == 5
        assert await bus.close(20) == 0 and new.closed

    try:
        run(main())
    finally:
        gate.set()


def test_a_reloaded_handler_takes_over_where_its_predecessor_was() -> None:
    gate = threading.Event()

    async def main() -> None:
        bus = EventBus()
        old, new = Recorder("webhook", gate), Recorder("webhook")
        bus.set_handlers([old])
        await bus.start()
        sent = [ev() for _ in range(4)]
        for event in sent:
            bus.emit(event)
        await eventually(lambda: bus.worker("webhook").current is not None)  # the first is in hand
        bus.set_handlers([new])
        gate.set()  # the old one settles its event: the new one goes on after it
        await eventually(lambda: len(new.got) == 3 and old.closed)
        assert old.got == [sent[0].id] and new.got == [e.id for e in sent[1:]]  # each once
        assert bus.stats()["handlers"]["webhook"]["delivered"] == 4
        assert await bus.close(5) == 0

    try:
        run(main())
    finally:
        gate.set()


def test_a_predecessor_stuck_past_its_timeout_does_not_hold_up_its_successor() -> None:
    gate = threading.Event()

    async def main() -> None:
        bus = EventBus(handler_timeout=0.2)
        old, new = Recorder("webhook", gate), Recorder("webhook")
        bus.set_handlers([old])
        await bus.start()
        sent = [ev() for _ in range(3)]
        for event in sent:
            bus.emit(event)
        await eventually(lambda: bus.worker("webhook").current is not None)
        bus.set_handlers([new])
        await eventually(lambda: len(new.got) == 3)  # from the stuck one's event: at least once
        assert new.got == [e.id for e in sent] and old.got == []
        gate.set()
        await eventually(lambda: old.closed)
        assert bus.outbox.cursors["webhook"] == 3  # the stuck one's late verdict moved nothing back
        assert await bus.close(5) == 0

    try:
        run(main())
    finally:
        gate.set()


def test_a_removed_handler_gets_a_deadline_for_its_queue() -> None:
    gate = threading.Event()

    async def main() -> None:
        bus = EventBus()
        bus.set_handlers([Recorder("webhook", gate)])
        await bus.start()
        for _ in range(4):
            bus.emit(ev())
        await eventually(lambda: bus.worker("webhook").current is not None)  # one in hand, three wait
        with capture_logs() as logs:
            bus.set_handlers([Recorder("audit")], retire_within=0.1)
            await eventually(lambda: bus.stats()["handlers"]["webhook"]["dropped"] == 3)
        gate.set()
        await eventually(lambda: "webhook" not in bus.stats()["handlers"])
        assert bus.stats()["totals"]["delivered"] == 1 and bus.stats()["totals"]["dropped"] == 3
        assert [e["dropped"] for e in logs if e["event"].startswith("removed handler")] == [3]
        assert "webhook" not in bus.outbox.cursors  # a removed handler holds nothing back
        assert await bus.close(5) == 0

    try:
        run(main())
    finally:
        gate.set()


def test_counters_of_a_name_survive_a_reload() -> None:
    async def main() -> None:
        bus = EventBus()
        await bus.start()
        for _ in range(3):
            bus.set_handlers([Recorder("audit")])
            bus.emit(ev())
            bus.emit(ev())
        await eventually(lambda: bus.stats()["handlers"]["audit"]["delivered"] == 6)
        await bus.close(20)
        assert bus.stats()["totals"]["delivered"] == 6

    run(main())


def test_emit_from_another_thread() -> None:
    async def main() -> None:
        bus = EventBus()
        got: list[str] = []

        async def receiver(event: Event) -> None:
            got.append(event.id)

        bus.set_handlers([fn(receiver)])
        await bus.start()
        sent = [ev() for _ in range(100)]
        thread = threading.Thread(target=lambda: [bus.emit(e) for e in sent])
        thread.start()
        await asyncio.to_thread(thread.join)
        await eventually(lambda: len(got) == 100)
        assert got == [e.id for e in sent]
        await bus.close(20)

    run(main())


def test_sync_handlers_get_events_reopen_and_close_in_their_own_thread() -> None:
    class Plugin:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str]] = []

        def __call__(self, event: Event) -> None:
            self.calls.append(("handle", threading.current_thread().name))

        def reopen(self) -> None:
            self.calls.append(("reopen", threading.current_thread().name))

        def close(self) -> None:
            self.calls.append(("close", threading.current_thread().name))

    async def main() -> None:
        bus = EventBus()
        plugin = Plugin()
        bus.set_handlers([fn(plugin, name="plugin")])
        await bus.start()
        bus.emit(ev())
        await eventually(lambda: len(plugin.calls) == 1)
        bus.reopen()
        await eventually(lambda: len(plugin.calls) == 2)
        bus.emit(ev())
        await bus.close(20)
        assert [c for c, _ in plugin.calls] == ["handle", "reopen", "handle", "close"]
        assert {t for _, t in plugin.calls} == {"authd-handler:plugin"}

    run(main())


def test_a_sync_handler_that_overruns_counts_once_and_its_late_error_is_logged() -> None:
    release = threading.Event()

    def late_boom(event: Event) -> None:
        release.wait()
        raise RuntimeError("late boom")

    async def main() -> None:
        bus = EventBus(handler_timeout=0.1)
        bus.set_handlers([fn(late_boom)])
        await bus.start()
        with capture_logs() as logs:
            bus.emit(ev())
            await eventually(lambda: bus.stats()["handlers"]["late_boom"]["timed_out"] == 1)
            release.set()
            assert await bus.close(20) == 0
        counters = bus.stats()["handlers"]["late_boom"]
        assert counters["timed_out"] == 1 and counters["delivered"] == 0 and counters["failed"] == 0
        late = [r for r in logs if r["event"] == "timed-out handler call raised late"]
        assert len(late) == 1 and late[0]["handler"] == "late_boom"

    try:
        run(main())
    finally:
        release.set()


def test_an_async_handler_that_blocks_the_loop_is_named_and_counted() -> None:
    async def blocks(event: Event) -> None:
        time.sleep(1.0)  # the mistake under test: a blocking call in an async handler

    async def main() -> None:
        bus = EventBus(block_threshold=0.2)
        bus.set_handlers([fn(blocks)])
        await bus.start()
        with capture_logs() as logs:
            bus.emit(ev())
            await eventually(lambda: bus.stats()["handlers"]["blocks"]["blocked_loop"] >= 1)
            assert await bus.close(20) == 0
        warned = [r for r in logs if r["event"].startswith("an async handler blocked the event loop")]
        assert any(r["handler"] == "blocks" and r["seconds"] >= 0.2 for r in warned)  # the threshold, at least

    run(main())
