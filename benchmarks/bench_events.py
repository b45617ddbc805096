"""The event bus on its own: throughput, memory per queued event, and what emit() costs a reply.

    python -m benchmarks.bench_events [--events N]

1. throughput: N events through the bus into one no-op handler, async and sync (a sync
   handler pays a hop to its thread and back per event), from the first emit() until close();
2. memory per queued event (tracemalloc): events created and queued for a handler that has
   not started, so nothing is consumed; once for one handler, and the extra for a second one
   (the same Event is shared, a queue slot is all a further handler adds);
3. emit() latency, the only part of event handling on the auth reply path: p50/p99 with no
   handler, and with a webhook handler whose receiver (a real HTTP server on 127.0.0.1)
   takes 1 s per request, so its queue fills and drops.

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import structlog

from authd.events import (
    AUTH_SUCCEEDED,
    Event,
    EventBus,
    FunctionHandler,
    HandlerContext,
    build_handlers,
)
from authd.events.config import WebhookConfig

from .harness import slow_http_server


def sample_event(i: int) -> Event:
    """A realistic auth.succeeded: every field a login fills in."""
    return Event.create(
        AUTH_SUCCEEDED,
        user=f"user{i % 1000}",
        service="imap",
        rhost="192.0.2.17",
        pid=4242,
        uid=1000,
        gid=1000,
        session_id=f"{i:032x}",
        latency=0.0123,
    )


async def throughput(n: int, handler: Callable[[Event], Any]) -> float:
    bus = EventBus(queue_size=n)
    bus.set_handlers([FunctionHandler(handler, name="noop")])
    await bus.start()
    events = [sample_event(i) for i in range(n)]
    start = time.perf_counter()
    for i, event in enumerate(events):
        bus.emit(event)
        if i % 1000 == 999:
            await asyncio.sleep(0)  # let the worker run, as a serving daemon would
    undelivered = await bus.close(600)
    elapsed = time.perf_counter() - start
    assert undelivered == 0 and bus.stats()["totals"]["delivered"] == n
    return n / elapsed


def queued_bytes(n: int, handlers: int) -> tuple[float, float]:
    """Bytes per event: (created and queued for the first handler, added by one more)."""

    def measure(k: int) -> float:
        bus = EventBus(queue_size=n)
        bus.set_handlers([FunctionHandler(lambda event: None, name=f"noop{j}") for j in range(k)])
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            bus.emit(sample_event(i))
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert bus.stats()["totals"]["queued"] == n * k
        return (after - before) / n

    one = measure(1)
    return one, measure(handlers) - one


async def emit_latency(n: int, url: str | None) -> tuple[float, float, dict[str, Any]]:
    """p50 and p99 of emit() in microseconds, while the loop also serves the handler."""
    bus = EventBus(queue_size=100)
    if url is not None:
        with TemporaryDirectory() as tmp:
            ctx = HandlerContext(state_dir=Path(tmp), base_dir=Path(tmp))
            bus.set_handlers(build_handlers([WebhookConfig(url=url, retries=0)], ctx))
    await bus.start()
    samples = []
    for i in range(n):
        event = sample_event(i)
        start = time.perf_counter_ns()
        bus.emit(event)
        samples.append(time.perf_counter_ns() - start)
        if i % 100 == 99:
            await asyncio.sleep(0.001)  # logins arrive over time
    stats = bus.stats()["totals"]
    await bus.close(0.1)
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49] / 1000, cuts[98] / 1000, stats


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    n = parser.parse_args().events
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

    async def async_noop(event: Event) -> None:
        pass

    def sync_noop(event: Event) -> None:
        pass

    print(f"throughput, {n} events, one no-op handler:")
    print(f"  async handler      {await throughput(n, async_noop):>10,.0f} events/s")
    print(f"  sync handler       {await throughput(n, sync_noop):>10,.0f} events/s")

    first, extra = queued_bytes(n, 2)
    print(f"memory per queued event ({n} queued, tracemalloc):")
    print(f"  event + queue slot {first:>10,.0f} bytes")
    print(f"  each extra handler {extra:>10,.0f} bytes")

    m = min(n, 20_000)
    print(f"emit() latency, {m} events (the part of event handling on the reply path):")
    with slow_http_server() as url:
        p50, p99, _ = await emit_latency(m, None)
        print(f"  no handler         p50 {p50:7.2f} us   p99 {p99:7.2f} us")
        p50, p99, totals = await emit_latency(m, url)
        print(
            f"  1 s webhook        p50 {p50:7.2f} us   p99 {p99:7.2f} us"
            f"   (queued {totals['queued']}, dropped {totals['dropped']})"
        )


if __name__ == "__main__":
    asyncio.run(main())
