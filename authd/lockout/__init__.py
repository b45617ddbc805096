"""Lockout: per-user and per-rhost failure limits, counted race-free and kept across restarts."""

from .config import Limit, LockoutConfig, load_config
from .engine import Attempt, Locked, LockInfo, Lockout

__all__ = ["Attempt", "Limit", "LockInfo", "Locked", "Lockout", "LockoutConfig", "load_config"]
