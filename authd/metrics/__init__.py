"""Metrics: the daemon's counters as Prometheus text, on a scrape endpoint and `authctl metrics`."""

from .config import MetricsConfig
from .decisions import Decisions

__all__ = ["Decisions", "MetricsConfig"]
