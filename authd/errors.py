"""Exceptions shared across authd."""


class AuthdError(Exception):
    """Base class for authd's own errors."""


class ConfigError(AuthdError):
    """authd.toml (or a value derived from it) is invalid; the message names the key path."""
