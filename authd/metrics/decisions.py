"""Counts and latency buckets of auth decisions, by service, protocol and result: the one
figure the daemon's other counters cannot give, because it is measured, not counted.

Plain Python on the event loop (no locks, no prometheus_client): recording costs a dict
lookup and a bisect, so it is always on, and `authctl metrics` works without `[metrics]`.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# Seconds. A pam_permit decision takes well under a millisecond, pam_unix with yescrypt tens of
# milliseconds, a remote PAM module up to `pam_timeout` (10 s by default).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Series:
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))  # the last is +Inf
    count: int = 0
    total: float = 0.0


class Decisions:
    """`service` must be a configured service name (or "" for none): never a client's string;
    `protocol` the front end (`native`, `saslauthd`, `dovecot`)."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str], Series] = {}

    def observe(self, service: str, protocol: str, result: str, seconds: float) -> None:
        series = self.series.get((service, protocol, result))
        if series is None:
            series = self.series[service, protocol, result] = Series()
        series.buckets[bisect_left(BUCKETS, seconds)] += 1
        series.count += 1
        series.total += seconds
