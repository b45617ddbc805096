"""Auth events and the handlers that act on them, off the reply path (docs/handlers.md).

The daemon creates one :class:`EventBus`, ``emit()``s an :class:`Event` for every outcome,
and on start and every SIGHUP hands it ``build_handlers(policy.handler, ctx)``.
"""

from authd.events.bus import EventBus
from authd.events.handler import FunctionHandler, Handler, HandlerError
from authd.events.config import HandlerConfig, HandlerContext
from authd.events.handlers import build_handlers
from authd.events.handlers.lastlog import lastlog_lookup
from authd.events.model import (
    AUTH_FAILED,
    AUTH_LOCKED_OUT,
    AUTH_SUCCEEDED,
    DAEMON_DRAINING,
    DAEMON_STARTED,
    DAEMON_STOPPED,
    EVENT_NAMES,
    POLICY_RELOAD_FAILED,
    POLICY_RELOADED,
    SESSION_CLOSED,
    SESSION_OPENED,
    Event,
)

__all__ = [
    "AUTH_FAILED",
    "AUTH_LOCKED_OUT",
    "AUTH_SUCCEEDED",
    "DAEMON_DRAINING",
    "DAEMON_STARTED",
    "DAEMON_STOPPED",
    "EVENT_NAMES",
    "POLICY_RELOADED",
    "POLICY_RELOAD_FAILED",
    "SESSION_CLOSED",
    "SESSION_OPENED",
    "Event",
    "EventBus",
    "FunctionHandler",
    "Handler",
    "HandlerConfig",
    "HandlerContext",
    "HandlerError",
    "build_handlers",
    "lastlog_lookup",
]
