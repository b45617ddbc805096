"""Just enough HTTP/1.x for a scrape, as pure functions of bytes: one `GET /metrics` per
connection, answered and closed.

Sans-I/O like `authd.protocol`: no sockets here, so every odd request line is a unit test.
Anything but a well-formed `GET` or `HEAD` of `/metrics` gets a status and a closed
connection; nothing a client sends is ever echoed back.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD = 8 * 1024  # request line and headers; Prometheus sends about 300 bytes
PATH = "/metrics"
END_OF_HEAD = b"\r\n\r\n"
_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    431: "Request Header Fields Too Large", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


@dataclass(frozen=True)
class Request:
    head_only: bool  # HEAD: the headers of the answer, no body
    accept: str | None


def parse_head(head: bytes) -> Request | bytes:
    """The request line and headers (up to and including the blank line) to a Request, or
    to the complete error response that answers them."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return error(400, "request head is not ASCII")
    request_line, *header_lines = text.removesuffix("\r\n\r\n").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3:
        return error(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        return error(505, "HTTP/1.0 or HTTP/1.1 only")
    accept = None
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return error(400, "malformed header line")
        if name.lower() == "accept":
            accept = value.strip()
    if method not in ("GET", "HEAD"):
        return error(405, "GET or HEAD only", extra="Allow: GET, HEAD\r\n")
    if target.partition("?")[0] != PATH:
        return error(404, f"metrics are at {PATH}")
    return Request(head_only=method == "HEAD", accept=accept)


def response(status: int, body: bytes, content_type: str, *, head_only: bool = False, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode("ascii") + (b"" if head_only else body)


def error(status: int, message: str, *, extra: str = "") -> bytes:
    return response(status, f"{message}\n".encode("ascii"), "text/plain; charset=utf-8", extra=extra)
