"""``python``: a ``module:function`` callable (sync or async) and entry-point plugins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authd.errors import ConfigError
from authd.events import AUTH_FAILED, AUTH_SUCCEEDED, EventBus, HandlerContext

from .conftest import CANARY, from_toml, login_event, run


def deliver(ctx: HandlerContext, toml: str, n: int = 2) -> tuple[list, EventBus]:
    handlers = from_toml(toml, ctx)
    events = [
        login_event(AUTH_FAILED if i % 2 else AUTH_SUCCEEDED, {"user": f"u{i}", "password": CANARY})
        for i in range(n)
    ]

    async def main() -> EventBus:
        bus = EventBus()
        bus.set_handlers(handlers)
        await bus.start()
        for event in events:
            bus.emit(event)
        bus.reopen()
        assert await bus.close(30) == 0
        return bus

    return events, run(main())


def test_sync_and_async_callables(ctx: HandlerContext, plugin_path: Path) -> None:
    import authd_test_plugin as plugin

    plugin.RECEIVED.clear()
    plugin.THREADS.clear()
    events, bus = deliver(
        ctx,
        '[[handler]]\nname = "s"\ntype = "python"\ncallable = "authd_test_plugin:record"\n'
        '[[handler]]\nname = "a"\ntype = "python"\ncallable = "authd_test_plugin:record_async"\n'
        'events = ["auth.succeeded"]\n',
    )
    assert [e for how, e in plugin.RECEIVED if how == "sync"] == events
    assert [e for how, e in plugin.RECEIVED if how == "async"] == events[:1]
    assert set(plugin.THREADS) == {"authd-handler:s"}  # its own thread, not the loop's
    assert bus.stats()["totals"]["delivered"] == 3


def test_entry_point_plugin(ctx: HandlerContext, plugin_path: Path) -> None:
    import authd_test_plugin as plugin

    plugin.RECEIVED.clear()
    events, _ = deliver(ctx, '[[handler]]\ntype = "python"\nentry_point = "record"\n')
    assert [e for _, e in plugin.RECEIVED] == events


def test_entry_point_factory_with_options(ctx: HandlerContext, plugin_path: Path) -> None:
    events, _ = deliver(
        ctx,
        '[[handler]]\ntype = "python"\nentry_point = "recorder"\nfactory = true\n'
        'options = {path = "seen.jsonl"}\n',
    )
    lines = (ctx.state_dir / "seen.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [e.to_dict() for e in events]


def test_factory_plugin_gets_reopen_and_close(ctx: HandlerContext, plugin_path: Path) -> None:
    (handler,) = from_toml('[[handler]]\ntype = "python"\nentry_point = "recorder"\nfactory = true\n', ctx)

    async def main() -> None:
        bus = EventBus()
        bus.set_handlers([handler])
        await bus.start()
        bus.emit(login_event(AUTH_SUCCEEDED, {"user": "alice"}))
        bus.reopen()
        assert await bus.close(30) == 0

    run(main())
    recorder = handler.fn  # type: ignore[attr-defined]
    assert recorder.reopened == 1 and recorder.closed
    assert len((ctx.state_dir / "plugin-events.jsonl").read_text().splitlines()) == 1


def test_unknown_entry_point_lists_what_is_installed(ctx: HandlerContext, plugin_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        from_toml('[[handler]]\ntype = "python"\nentry_point = "nope"\n', ctx)
    assert "handler[0].entry_point: cannot load: LookupError" in str(info.value)
    assert "record, recorder" in str(info.value)
