"""The bus: per-handler order and isolation, timeouts, overflow, drain, swap, signal API."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from structlog.testing import capture_logs

from authd.events import (
    AUTH_FAILED,
    AUTH_SUCCEEDED,
    DAEMON_STARTED,
    EVENT_NAMES,
    SESSION_OPENED,
    Event,
    EventBus,
    Handler,
)

from .conftest import eventually, run


def ev(name: str = AUTH_SUCCEEDED, **fields: Any) -> Event:
    return Event.create(name, **fields)


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

        bus.connect("*", sync_receiver)
        bus.connect("*", async_receiver)
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
        bus.connect("auth.*", lambda e: seen["auth"].append(e.name), name="auth")
        bus.connect([SESSION_OPENED, "daemon.*"], lambda e: seen["some"].append(e.name), name="some")
        bus.connect(AUTH_SUCCEEDED, lambda e: seen["imap"].append(e.service), sender="imap", name="imap")
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

        for fn in (boom, async_boom, exits, async_exits):
            bus.connect("*", fn, name=fn.__name__)
        bus.connect("*", lambda e: good.append(e.id), name="good")
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
        bus.connect("*", slow, name="slow")
        bus.connect("*", hangs, name="hangs")
        bus.connect("*", async_hangs, name="async_hangs")
        bus.connect("*", lambda e: fast.append(e.id), name="fast")
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
        late = {r["handler"]: r["undelivered"] for r in logs if r["event"] == "handler missed the deadline"}
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

        bus.connect("*", hangs, name="hangs")
        await bus.start()
        bus.emit(ev())
        bus.emit(ev())
        await eventually(lambda: bus.stats()["handlers"]["hangs"]["timed_out"] == 2)
        assert await bus.close(5) == 0

    run(main())


def test_full_queue_drops_and_counts_without_blocking() -> None:
    gate = threading.Event()
    got: list[str] = []
    got_small: list[str] = []

    def gated(event: Event) -> None:
        gate.wait()
        got.append(event.id)

    async def main() -> None:
        bus = EventBus(queue_size=5)
        bus.connect("*", gated, name="gated")
        bus.connect("*", lambda e: got_small.append(e.id), name="small", queue_size=2)
        sent = [ev() for _ in range(20)]
        with capture_logs() as logs:
            for event in sent:  # before start(): everything queues, nothing runs yet
                bus.emit(event)
        stats = bus.stats()
        assert stats["handlers"]["gated"] == {
            "delivered": 0, "failed": 0, "dropped": 15, "timed_out": 0, "queued": 5,
        }  # fmt: skip
        assert stats["handlers"]["small"]["dropped"] == 18
        assert stats["totals"]["dropped"] == 33 and stats["totals"]["queued"] == 7
        full = [r for r in logs if r["event"] == "handler queue full, dropping events"]
        assert sorted(r["handler"] for r in full) == ["gated", "small"]  # logged once, not per drop
        await bus.start()
        gate.set()
        assert await bus.close(20) == 0
        assert got == [e.id for e in sent[:5]] and got_small == [e.id for e in sent[:2]]
        assert bus.stats()["totals"]["delivered"] == 7

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

        bus.connect("*", slowish, name="slowish")
        stuck = Recorder("stuck", gate)
        bus.set_handlers([stuck])
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


def test_a_removed_handler_gets_a_deadline_for_its_queue() -> None:
    gate = threading.Event()

    async def main() -> None:
        bus = EventBus()
        bus.set_handlers([Recorder("webhook", gate)])
        await bus.start()
        for _ in range(4):
            bus.emit(ev())
        await asyncio.sleep(0.05)  # the first event is in hand, three wait
        with capture_logs() as logs:
            bus.set_handlers([Recorder("webhook")], retire_within=0.1)
            await eventually(lambda: bus.stats()["handlers"]["webhook"]["dropped"] == 3)
        gate.set()
        await eventually(lambda: bus.stats()["handlers"]["webhook"]["delivered"] == 1)
        assert bus.stats()["handlers"]["webhook"] == {
            "delivered": 1, "failed": 0, "dropped": 3, "timed_out": 0, "queued": 0,
        }  # fmt: skip
        assert [e["dropped"] for e in logs if e["event"].startswith("removed handler")] == [3]
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


def test_blinker_style_api() -> None:
    async def main() -> None:
        bus = EventBus()
        on_auth_seen: list[str] = []
        imap_seen: list[str] = []

        @bus.on("auth.*")
        def on_auth(event: Event) -> None:
            on_auth_seen.append(event.name)

        signal = bus.signal(AUTH_SUCCEEDED)
        assert bus.signal(AUTH_SUCCEEDED) is signal

        @signal.connect(sender="imap")
        async def imap_only(event: Event) -> None:
            imap_seen.append(event.user or "")

        assert bus.connect("auth.*", on_auth) is on_auth  # already connected: no-op
        names = [f"{fn.__module__}.{fn.__qualname__}" for fn in (on_auth, imap_only)]
        assert list(bus.stats()["handlers"]) == names  # connection order
        await bus.start()
        sent = signal.send(user="alice", service="imap")
        assert isinstance(sent, Event) and sent.name == AUTH_SUCCEEDED
        signal.send(user="bob", service="smtp")
        bus.emit(ev(AUTH_FAILED, user="carol", service="imap"))
        bus.emit(ev(DAEMON_STARTED))
        await eventually(lambda: len(on_auth_seen) == 3 and len(imap_seen) == 1)
        assert bus.disconnect(on_auth) and not bus.disconnect(on_auth)
        signal.send(user="dave", service="imap")
        await bus.close(20)
        assert on_auth_seen == ["auth.succeeded", "auth.succeeded", "auth.failed"]
        assert imap_seen == ["alice", "dave"]

    run(main())


def test_emit_from_another_thread() -> None:
    async def main() -> None:
        bus = EventBus()
        got: list[str] = []

        async def receiver(event: Event) -> None:
            got.append(event.id)

        bus.connect("*", receiver)
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
        bus.connect("*", plugin, name="plugin")
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
