"""The sans-I/O half of the scrape endpoint, and the latency buckets, without a daemon."""

from __future__ import annotations

import pytest

from authd.metrics import Decisions
from authd.metrics.decisions import BUCKETS
from authd.metrics.scrape import MAX_HEAD, Request, parse_head, response

from ..daemon import CANARY


def test_get_and_head_of_metrics() -> None:
    assert parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == Request(head_only=False, accept=None)
    assert parse_head(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n") == Request(head_only=True, accept=None)
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    parsed = parse_head(f"GET /metrics HTTP/1.1\r\naccept:  {accept} \r\n\r\n".encode())
    assert parsed == Request(head_only=False, accept=accept)


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /metrics\r\n\r\n", b"400 Bad Request"),
    (b"GET  /metrics HTTP/1.1\r\n\r\n", b"400 Bad Request"),
    (b"\x16\x03\x01\x02\x00\r\n\r\n", b"400 Bad Request"),  # a TLS ClientHello at a plain-text port
    ("GET /métrics HTTP/1.1\r\n\r\n".encode(), b"400 Bad Request"),
    (b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", b"400 Bad Request"),
    (b"GET /metrics HTTP/1.1\r\n Folded: x\r\n\r\n", b"400 Bad Request"),
    (b"GET /metrics HTTP/2.0\r\n\r\n", b"505 HTTP Version Not Supported"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\n", b"405 Method Not Allowed"),
    (b"GET / HTTP/1.1\r\n\r\n", b"404 Not Found"),
    (b"GET /metrics/../etc HTTP/1.1\r\n\r\n", b"404 Not Found"),
])
def test_anything_else_is_answered_with_a_status_and_close(head: bytes, status: bytes) -> None:
    answer = parse_head(head)
    assert isinstance(answer, bytes)
    assert answer.startswith(b"HTTP/1.1 " + status + b"\r\n") and b"\r\nConnection: close\r\n" in answer
    if status.startswith(b"405"):
        assert b"\r\nAllow: GET, HEAD\r\n" in answer


def test_nothing_a_client_sends_is_echoed() -> None:
    for head in (f"GET /{CANARY} HTTP/1.1\r\n\r\n", f"{CANARY} /metrics HTTP/1.1\r\n\r\n",
                 f"GET /metrics HTTP/{CANARY}\r\n\r\n", f"GET /metrics HTTP/1.1\r\n{CANARY}\r\n\r\n"):
        answer = parse_head(head.encode())
        assert isinstance(answer, bytes) and CANARY.encode() not in answer


def test_response_framing() -> None:
    body = b"authd_up 1\n"
    full = response(200, body, "text/plain")
    assert full == b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\nConnection: close\r\n\r\n" + body
    assert response(200, body, "text/plain", head_only=True) == full[: -len(body)], "HEAD: same length, no body"
    assert MAX_HEAD == 8192


def test_latency_lands_in_its_bucket_bounds_inclusive() -> None:
    d = Decisions()
    for seconds in (0.0, 0.0005, 0.00051, 10.0, 10.5, 1e9):
        d.observe("login", "native", "ok", seconds)
    series = d.series["login", "native", "ok"]
    assert series.count == 6 and series.total == pytest.approx(0.0005 + 0.00051 + 10.0 + 10.5 + 1e9)
    assert series.buckets[0] == 2  # le=0.0005 holds 0 and 0.0005 itself
    assert series.buckets[1] == 1  # le=0.001
    assert series.buckets[BUCKETS.index(10.0)] == 1
    assert series.buckets[-1] == 2  # +Inf
    assert sum(series.buckets) == series.count
    assert list(d.series) == [("login", "native", "ok")]
