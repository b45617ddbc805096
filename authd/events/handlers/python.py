"""``python``: a callable named ``module:attr``, or a plugin found by entry point.

The target takes the :class:`~authd.events.Event`; a plain function runs in the handler's own
thread, an ``async def`` on the event loop. With ``factory = true`` the target is instead
called once, when handlers are built, as ``target(context, **options)`` and must return that
callable: the way for a plugin to take settings and hold resources. If what it returns has
``reopen()`` / ``close()``, they are called on SIGHUP and at shutdown.

Code is imported when handlers are built (at start and on each SIGHUP, before the swap).
Python caches imported modules, so changed plugin code takes effect on restart.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from authd.errors import ConfigError
from authd.events.handler import FunctionHandler
from authd.events.config import HandlerContext, PythonConfig

GROUP = "authd.handlers"


def load_callable(spec: str) -> Any:
    """Import ``package.module:attr.attr``."""
    module_name, sep, attrs = spec.partition(":")
    if not sep or not module_name or not attrs:
        raise ValueError(f"{spec!r} is not of the form module:function")
    target: Any = importlib.import_module(module_name)
    for attr in attrs.split("."):
        target = getattr(target, attr)
    return target


def load_entry_point(name: str) -> Any:
    """Load the plugin registered as ``name`` in the ``authd.handlers`` group."""
    found = entry_points(group=GROUP, name=name)
    if not found:
        known = sorted({ep.name for ep in entry_points(group=GROUP)})
        raise LookupError(
            f"no entry point {name!r} in group {GROUP}"
            + (f" (installed: {', '.join(known)})" if known else " (none installed)")
        )
    if len(found) > 1:
        dists = sorted(ep.dist.name if ep.dist else "?" for ep in found)
        raise LookupError(f"entry point {name!r} is in several packages: {', '.join(dists)}")
    (ep,) = found
    return ep.load()


def build(cfg: PythonConfig, ctx: HandlerContext, where: str, **base: Any) -> FunctionHandler:
    if (cfg.callable is None) == (cfg.entry_point is None):
        raise ConfigError(f"{where}: set exactly one of callable and entry_point")
    if cfg.options and not cfg.factory:
        raise ConfigError(f"{where}.options: only used with factory = true")
    key = "callable" if cfg.callable is not None else "entry_point"
    try:
        if cfg.callable is not None:
            target = load_callable(cfg.callable)
        else:
            target = load_entry_point(cfg.entry_point)  # type: ignore[arg-type]
    except (Exception, SystemExit) as e:  # a plugin's sys.exit() must not end the daemon
        raise ConfigError(f"{where}.{key}: cannot load: {type(e).__name__}: {e}") from None
    if cfg.factory:
        try:
            target = target(ctx, **cfg.options)
        except (Exception, SystemExit) as e:
            raise ConfigError(f"{where}: factory failed: {type(e).__name__}: {e}") from None
    if not callable(target):
        raise ConfigError(f"{where}.{key}: {type(target).__name__} object is not callable")
    return FunctionHandler(target, timeout=cfg.timeout, **base)
