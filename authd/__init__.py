"""authd: a PAM authentication daemon for Unix sockets."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
