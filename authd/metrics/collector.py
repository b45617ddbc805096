"""Prometheus families read from the daemon's own counters and stats at scrape time.

Nothing here sits on the request path: the server, PAM pool, event bus, session store and
lockout already count what they do (for `authctl status`); a scrape reads those, on the
event loop, and renames them to Prometheus conventions. The one exception is the decision
latency histogram, which `authflow` records through `Runtime.decisions`.

Label values come only from closed sets: op and error names from the code, service and
handler names from the policy. Never a user, an rhost, or a string a client sent.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from .. import PROTOCOL_VERSION, __version__
from .decisions import BUCKETS

if TYPE_CHECKING:
    from ..runtime import Runtime

# `Runtime.counters` keys by prefix: the rest of the key is the label value.
_LABELLED = {
    "op:": ("authd_requests", "op", "Requests received, by op (`saslauthd`, `dovecot`: those front ends' auth requests)."),
    "protocol:": ("authd_requests_rejected", "reason", "Requests refused before their op ran, by reason."),
    "saslauthd:": ("authd_saslauthd_rejected", "reason", "saslauthd requests refused before a decision, by reason."),
    "dovecot:": ("authd_dovecot_rejected", "reason", "Dovecot auth requests answered FAIL or closed by the codec, by reason."),
    "connections_closed_": ("authd_connections_closed", "reason", "Connections closed by authd, by reason."),
    "sessions_closed:": ("authd_sessions_closed", "reason", "Sessions ended, by reason."),
    "cache:": ("authd_cache_lookups", "result", "Credential-cache lookups, by result."),
}
# Whole keys that join one of those families under another label value.
_JOINED = {
    "refused_busy": ("protocol:", "busy"),
    "refused_shutting_down": ("protocol:", "shutting_down"),
    "client_forbidden": ("protocol:", "client_forbidden"),
    "admin_forbidden": ("protocol:", "admin_forbidden"),
    "connections_aborted_unread": ("connections_closed_", "unread"),
}
# Whole keys that are a family of their own.
_SINGLE = {
    "connections_total": ("authd_connections", "Connections accepted, on every socket."),
    "connections_refused_busy": ("authd_connections_refused", "Connections refused at accept: a connection limit was reached."),
    "internal_errors": ("authd_internal_errors", "Requests that failed on a bug (logged with a traceback)."),
}
_WORKER_RESTARTS = ("crashed", "timed_out", "recycled")
_EVENT_OUTCOMES = ("delivered", "failed", "dropped", "timed_out", "retried", "dead")
_EVENTS_LOST = ("pruned_undelivered", "unwritten_dropped")


class _Stats(Protocol):
    def stats(self) -> dict[str, int]: ...


class Observed(Protocol):
    """What a scrape reads of the lifecycle (`authd.lifecycle.Lifecycle`), besides the runtime."""

    reload_error: str | None
    restart_required: list[str]

    @property
    def server(self) -> _Stats: ...


class AuthdCollector:
    """A prometheus_client custom collector over one Runtime and its lifecycle."""

    def __init__(self, rt: Runtime, lifecycle: Observed) -> None:
        self.rt = rt
        self.lifecycle = lifecycle
        self.process = ProcessCollector(registry=None)

    def collect(self) -> Iterator[Metric]:
        yield from self._build()
        yield from self._auth()
        yield from self._counters()
        yield from self._pam()
        yield from self._sessions()
        yield from self._lockout()
        yield from self._events()
        yield from self._config()
        yield from self.process.collect()

    def _build(self) -> Iterator[Metric]:
        info = InfoMetricFamily("authd_build", "The running authd: version, native protocol, Python.")
        info.add_metric([], {"version": __version__, "protocol": str(PROTOCOL_VERSION), "python": platform.python_version()})
        yield info

    def _auth(self) -> Iterator[Metric]:
        labels = ["service", "protocol", "result"]
        requests = CounterMetricFamily("authd_auth_requests", "Auth decisions, by service (\"\" when the client named none configured), front end and result.", labels=labels)
        seconds = HistogramMetricFamily("authd_auth_duration_seconds", "Time to decide an auth request, without the failure delay.", labels=labels)
        for key, series in sorted(self.rt.decisions.series.items()):
            requests.add_metric(list(key), series.count)
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), series.buckets):
                cumulative += count
                buckets.append((bound, cumulative))
            seconds.add_metric(list(key), buckets, series.total)
        yield requests
        yield seconds

    def _counters(self) -> Iterator[Metric]:
        counters = self.rt.counters
        by_prefix: dict[str, dict[str, int]] = {prefix: {} for prefix in _LABELLED}
        for key, value in counters.items():
            prefix, label_value = _JOINED.get(key) or next(((p, key[len(p):]) for p in _LABELLED if key.startswith(p)), ("", ""))
            if prefix:
                by_prefix[prefix][label_value] = by_prefix[prefix].get(label_value, 0) + value
        for prefix, (name, label, help_text) in _LABELLED.items():
            family = CounterMetricFamily(name, help_text, labels=[label])
            for label_value, value in sorted(by_prefix[prefix].items()):
                family.add_metric([label_value], value)
            yield family
        for key, (name, help_text) in _SINGLE.items():
            yield CounterMetricFamily(name, help_text, counters[key])
        connections = self.lifecycle.server.stats()
        yield GaugeMetricFamily("authd_connections_open", "Connections open now, on every socket.", connections["open"])
        yield GaugeMetricFamily("authd_requests_inflight", "Requests being answered now.", connections["inflight"])

    def _pam(self) -> Iterator[Metric]:
        stats = self.rt.pam.stats()
        workers = GaugeMetricFamily("authd_pam_workers", "PAM worker processes, by state.", labels=["state"])
        workers.add_metric(["idle"], stats["idle"])
        workers.add_metric(["busy"], stats["busy"])
        yield workers
        yield GaugeMetricFamily("authd_pam_pool_size", "PAM worker processes the pool keeps.", stats["size"])
        yield GaugeMetricFamily("authd_pam_waiting_requests", "Auth requests waiting for a free PAM worker.", stats["waiting"])
        yield CounterMetricFamily("authd_pam_calls", "Calls into PAM workers.", stats["calls"])
        restarts = CounterMetricFamily("authd_pam_worker_restarts", "PAM workers replaced, by reason.", labels=["reason"])
        for reason in _WORKER_RESTARTS:
            restarts.add_metric([reason], stats[reason])
        yield restarts
        yield CounterMetricFamily("authd_pam_worker_spawn_failures", "PAM workers that failed to start.", stats["spawn_failed"])

    def _sessions(self) -> Iterator[Metric]:
        rt = self.rt
        yield GaugeMetricFamily("authd_sessions_active", "Sessions issued and not yet ended.", len(rt.sessions))
        yield GaugeMetricFamily("authd_cache_entries", "Credential-cache entries held.", len(rt.cache))
        persisting = GaugeMetricFamily("authd_store_persisting", "1 while a state store writes to its file; 0 while it serves from memory only.", labels=["store"])
        persisting.add_metric(["sessions"], int(rt.sessions.persist_error is None))
        persisting.add_metric(["lockout"], int(rt.lockout.storage_error is None))
        persisting.add_metric(["events"], int(rt.bus.outbox.storage_error is None))
        yield persisting
        lockout = rt.lockout.stats()
        up = GaugeMetricFamily("authd_store_up", "1 while a store's backend answers (SQLite always: it serves from memory); 0 while Redis is unreachable.", labels=["store"])
        up.add_metric(["sessions"], int(rt.sessions.state()["state"] != "down"))
        up.add_metric(["lockout"], int(lockout.get("store") != "down"))
        yield up
        yield CounterMetricFamily("authd_lockout_fallbacks", "Logins the lockout decided on this host's own engine because Redis was unreachable.", lockout.get("fallbacks", 0))

    def _lockout(self) -> Iterator[Metric]:
        lockout = self.rt.lockout
        held = GaugeMetricFamily("authd_lockout_keys", "Users and rhosts whose failures or lock are held in memory, by scope.", labels=["scope"])
        locked = GaugeMetricFamily("authd_lockout_locked_keys", "Users and rhosts locked out now, by scope.", labels=["scope"])
        locks = CounterMetricFamily("authd_lockout_locks", "Locks imposed, by scope.", labels=["scope"])
        for scope, (keys, locked_now) in lockout.census().items():
            held.add_metric([scope], keys)
            locked.add_metric([scope], locked_now)
            locks.add_metric([scope], lockout.locks_imposed[scope])
        yield held
        yield locked
        yield locks
        stats = lockout.stats()
        yield CounterMetricFamily("authd_lockout_keys_evicted", "Keys forgotten to stay under max_keys (never a locked one).", stats["evicted"])
        yield CounterMetricFamily("authd_lockout_refused_full", "Attempts refused because a key table was full of locked keys.", stats["refused_full"])

    def _events(self) -> Iterator[Metric]:
        stats = self.rt.bus.stats()
        yield CounterMetricFamily("authd_events_emitted", "Events emitted to the bus.", stats["totals"]["emitted"])
        outcomes = CounterMetricFamily("authd_events", "Events per handler, by outcome.", labels=["handler", "outcome"])
        depth = GaugeMetricFamily("authd_event_queue_depth", "Events queued in memory for a handler now.", labels=["handler"])
        lag = GaugeMetricFamily("authd_event_lag", "Events waiting for a handler now, in memory and in the event log.", labels=["handler"])
        blocked = CounterMetricFamily("authd_event_handler_blocked_loop", "Times an async handler held the event loop too long.", labels=["handler"])
        for handler, counts in sorted(stats["handlers"].items()):
            for outcome in _EVENT_OUTCOMES:
                outcomes.add_metric([handler, outcome], counts[outcome])
            depth.add_metric([handler], counts["queued"])
            lag.add_metric([handler], counts["lag"])
            blocked.add_metric([handler], counts["blocked_loop"])
        yield from (outcomes, depth, lag, blocked)
        log = stats["log"]
        lost = CounterMetricFamily("authd_events_lost", "Events the event log lost, by reason.", labels=["reason"])
        for reason in _EVENTS_LOST:
            lost.add_metric([reason], log[reason])
        yield lost
        yield GaugeMetricFamily("authd_event_subscribers", "Clients subscribed to the event stream now.", stats["subscribers"])

    def _config(self) -> Iterator[Metric]:
        rt, lifecycle = self.rt, self.lifecycle
        yield GaugeMetricFamily("authd_config_generation", "Generation of the policy in force (1 at start, +1 per reload).", rt.policy.generation)
        reloads = CounterMetricFamily("authd_config_reloads", "Reloads of authd.toml, by result.", labels=["result"])
        reloads.add_metric(["ok"], rt.counters["reloads"])
        reloads.add_metric(["failed"], rt.counters["reloads_failed"])
        yield reloads
        yield GaugeMetricFamily("authd_config_last_reload_successful", "0 after a failed reload (the previous policy still serves), else 1.", int(lifecycle.reload_error is None))
        yield GaugeMetricFamily("authd_config_restart_required", "1 when the file in force changed settings that only a restart applies.", int(bool(lifecycle.restart_required)))


def render(rt: Runtime, lifecycle: Observed, accept: str = "") -> tuple[bytes, str]:
    """The scrape body and its content type: OpenMetrics if `accept` asks for it, else text 0.0.4."""
    encoder, content_type = choose_encoder(accept)
    return encoder(AuthdCollector(rt, lifecycle)), content_type
