"""The saslauthd codec on its own: counted strings in, one request or a refusal out."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from authd.saslauthd import codec

REQUEST4 = codec.encode_request("alice", "s3cret", "smtp", "example.org")


def test_four_fields_wait_for_a_possible_fifth_then_finish() -> None:
    decoder = codec.Decoder()
    assert decoder.feed(REQUEST4) is None and decoder.waiting_for_fifth
    req = decoder.finish()
    assert req == codec.Request("alice", "s3cret", "smtp", "example.org")
    assert req.rhost is None and "s3cret" not in repr(req)


def test_five_fields_in_one_write() -> None:
    req = codec.Decoder().feed(codec.encode_request("alice", "pw", "smtp", "", "192.0.2.7;51234"))
    assert isinstance(req, codec.Request) and req.client_addr == "192.0.2.7;51234" and req.rhost == "192.0.2.7"


def test_ipv6_client_address() -> None:
    req = codec.Decoder().feed(codec.encode_request("alice", "pw", "smtp", "", "2001:db8::1;25"))
    assert isinstance(req, codec.Request) and req.rhost == "2001:db8::1"


def test_byte_at_a_time() -> None:
    data = codec.encode_request("alice", "pw", "imap", "r", "10.0.0.1;1")
    decoder = codec.Decoder()
    results = [decoder.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[-1] == codec.Request("alice", "pw", "imap", "r", "10.0.0.1;1")
    assert all(r is None for r in results[:-1])


def test_fifth_field_arriving_late_is_still_read() -> None:
    decoder = codec.Decoder()
    assert decoder.feed(REQUEST4) is None
    assert decoder.feed(b"\x00\x09") is None and not decoder.waiting_for_fifth
    assert decoder.feed(b"127.0.0.1") == codec.Request("alice", "s3cret", "smtp", "example.org", "127.0.0.1")


def test_field_limit_is_256_bytes() -> None:
    at_limit = codec.Decoder().feed(codec.encode_request("a" * 256, "pw", "smtp", "", "x"))
    assert isinstance(at_limit, codec.Request)
    over = codec.Decoder().feed(b"\x01\x01")
    assert over == codec.Malformed("login longer than 256 bytes")
    password_over = codec.Decoder().feed(b"\x00\x01a\x01\x01")
    assert password_over == codec.Malformed("password longer than 256 bytes")


def test_empty_login_and_password_are_saslauthds_null_replies() -> None:
    assert codec.Decoder().feed(codec.encode_request("", "pw", "smtp", "", "")) == codec.Malformed("NULL login received")
    assert codec.Decoder().feed(codec.encode_request("u", "", "smtp", "", "")) == codec.Malformed("NULL password received")


def test_nul_and_invalid_utf8_are_refused() -> None:
    assert isinstance(codec.Decoder().feed(codec.encode_request("a\0b", "pw", "s", "", "")), codec.Malformed)
    assert isinstance(codec.Decoder().feed(b"\x00\x01\xff" + codec.encode_request("pw", "s", "", "")), codec.Malformed)


def test_one_request_per_connection() -> None:
    decoder = codec.Decoder()
    assert isinstance(decoder.feed(codec.encode_request("a", "b", "c", "d", "e")), codec.Request)
    assert decoder.feed(REQUEST4) is None and decoder.finish() is None


def test_replies_are_counted_strings() -> None:
    assert codec.ok() == b"\x00\x02OK"
    assert codec.no("authentication failed") == b"\x00\x18NO authentication failed"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200), st.integers(min_value=1, max_value=64))
def test_any_bytes_give_a_request_a_refusal_or_more_to_read(data: bytes, chunk: int) -> None:
    decoder = codec.Decoder()
    results = [decoder.feed(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    done = [r for r in results if r is not None]
    assert len(done) <= 1 and all(isinstance(r, (codec.Request, codec.Malformed)) for r in done)
