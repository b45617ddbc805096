"""The sans-I/O codec on its own: bytes in, requests or errors out."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from authd import protocol as p

from .daemon import CANARY


def feed_all(data: bytes, max_line: int = 1024, chunk: int = 7) -> list[p.Request | p.ProtocolError]:
    decoder = p.Decoder(max_line)
    out: list[p.Request | p.ProtocolError] = []
    for i in range(0, len(data), chunk):
        out += decoder.feed(data[i : i + chunk])
    return out


def test_requests_split_across_chunks_and_pipelined() -> None:
    data = b'{"id":1,"op":"hello"}\n{"id":"b","op":"auth","user":"u","password":"x","service":"s"}\n'
    out = feed_all(data, chunk=3)
    assert out == [p.Hello(id=1), p.Auth(id="b", user="u", password="x", service="s")]


def test_incomplete_line_waits() -> None:
    decoder = p.Decoder(1024)
    assert decoder.feed(b'{"id":1,"op":') == []
    assert decoder.pending == len(b'{"id":1,"op":')
    assert decoder.feed(b'"hello"}\n') == [p.Hello(id=1)]
    assert decoder.pending == 0


@pytest.mark.parametrize(
    ("line", "request_id", "message"),
    [
        (b"{not json", None, "malformed JSON"),
        (b'{"id":7,"op":"frobnicate"}', 7, "unknown or missing op"),
        (b'{"id":7}', 7, "unknown or missing op"),
        (b'{"id":8,"op":"hello","extra":1}', 8, "unknown field"),
        (b'{"id":8,"op":"hello","token":"t"}', 8, "unknown field `token`"),
        (b'{"id":8,"op":"unlock","key":"k","scope":"host"}', 8, "Invalid value - at `$.scope`"),
        (b'{"id":9,"op":"auth","user":"a\\u0000b","password":"x","service":"s"}', 9, "NUL byte in `user`"),
        (b'{"id":true,"op":"hello"}', None, "Expected `int | str`"),
        (b"[1,2]", None, "Expected `object`"),
    ],
)
def test_bad_requests_are_answered_with_reason(line: bytes, request_id: object, message: str) -> None:
    (err,) = feed_all(line + b"\n")
    assert isinstance(err, p.ProtocolError)
    assert err.error == p.BAD_REQUEST and err.id == request_id and message in err.message


def test_error_messages_never_echo_values() -> None:
    line = json.dumps({"id": 1, "op": "auth", "user": "u", "password": CANARY + "\0", "service": "s"}).encode()
    (err,) = feed_all(line + b"\n")
    assert isinstance(err, p.ProtocolError) and CANARY not in err.message
    line = json.dumps({"id": 1, "op": "auth", "user": "u", "password": 5, "service": CANARY}).encode()
    (err,) = feed_all(line + b"\n")
    assert isinstance(err, p.ProtocolError) and CANARY not in err.message


WINDOW = 5  # a run of this many characters of a client's string may not appear in a message
_SCHEMA_TEXT = " ".join([
    *(name for t in p.REQUEST_TYPES for name in t.__struct_fields__),
    "Expected `int | str`, got `float` `bool` `null` `array` `object` of length <= 256 >= 1 4096",
    "Object missing required field Object contains unknown field NUL byte in Invalid value - at `$.",
    "unknown or missing op malformed JSON",
])


def _own_words(text: str) -> bool:
    """True if some WINDOW-long run of `text` is our own schema wording (so cannot prove a leak)."""
    return any(text[i : i + WINDOW] in _SCHEMA_TEXT for i in range(len(text) - WINDOW + 1))


_hostile = st.text(min_size=WINDOW, max_size=300).filter(lambda s: not _own_words(s))
_ops = st.sampled_from(["hello", "auth", "session", "logout", "sessions", "revoke", "status", "unlock", "lastlog"])


@settings(max_examples=400, deadline=None)
@given(op=st.one_of(_ops, _hostile), fields=st.dictionaries(
    st.one_of(st.sampled_from(["id", "user", "password", "service", "rhost", "token", "scope", "key", "open_session"]), _hostile),
    st.one_of(_hostile, _hostile.map(lambda s: s + "\0"), _hostile.map(lambda s: s * 20), st.integers(), st.none(),
              st.lists(_hostile, max_size=2), st.dictionaries(_hostile, _hostile, max_size=2)),
    max_size=6))
def test_no_message_quotes_a_client_string(op: str, fields: dict[str, object]) -> None:
    """Issue 8 defect 9: whatever a client puts where, the message is built from path and kind only."""
    obj = {"op": op, **fields}
    (item,) = feed_all(json.dumps(obj).encode() + b"\n", max_line=1 << 20, chunk=1 << 20)
    if isinstance(item, p.Request):
        return
    strings = [s for s in _strings(obj) if len(s) >= WINDOW and not _own_words(s)]
    leaked = [s[i : i + WINDOW] for s in strings for i in range(len(s) - WINDOW + 1) if s[i : i + WINDOW] in item.message]
    assert not leaked, (item.message, leaked[:3])


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_repr_of_auth_hides_password() -> None:
    req = p.Auth(id=1, user="u", password=CANARY, service="s")
    assert CANARY not in repr(req) and CANARY not in str(req)


def test_overlong_line_is_answered_then_skipped() -> None:
    decoder = p.Decoder(256)
    out = decoder.feed(b'{"id":1,"op":"hello","x":"' + b"a" * 300)
    assert [type(o) for o in out] == [p.ProtocolError] and out[0].error == p.TOO_LARGE
    out = decoder.feed(b"a" * 10_000)
    assert out == [] and decoder.pending == 0, "an over-long line is not buffered"
    assert decoder.feed(b'"}\n{"id":2,"op":"hello"}\n') == [p.Hello(id=2)]


def test_overlong_complete_line_keeps_its_id() -> None:
    (err,) = p.Decoder(256).feed(json.dumps({"id": 42, "op": "hello", "pad": "x" * 300}).encode() + b"\n")
    assert isinstance(err, p.ProtocolError) and err.error == p.TOO_LARGE and err.id == 42


def test_blank_lines_are_ignored() -> None:
    assert feed_all(b'\n\n  \n{"id":1,"op":"hello"}\n') == [p.Hello(id=1)]


def test_replies_are_single_json_lines() -> None:
    line = p.error(3, p.AUTH_FAILED, "multi\nline")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"id": 3, "ok": False, "error": "auth_failed", "message": "multi\nline"}
    assert json.loads(p.encode("x", p.UnlockReply(unlocked="u"))) == {"id": "x", "ok": True, "unlocked": "u"}
    assert json.loads(p.encode(None, p.AuthReply(user="u", groups=("g",)))) == {"id": None, "ok": True, "user": "u", "groups": ["g"]}


def test_every_op_has_a_reply_type_the_client_decodes() -> None:
    assert set(p.REPLY_TYPES) == {t.__struct_config__.tag for t in p.REQUEST_TYPES}
    line = p.encode(7, p.HelloReply(server="authd", version="1", protocol=1, generation=3))
    assert msgspec.convert(json.loads(line), p.REPLY_TYPES["hello"]) == p.HelloReply(server="authd", version="1", protocol=1, generation=3)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_any_bytes_give_requests_or_clean_errors(data: bytes, chunk: int) -> None:
    decoder = p.Decoder(512)
    for i in range(0, len(data), chunk):
        for item in decoder.feed(data[i : i + chunk]):
            assert isinstance(item, (p.Request, p.ProtocolError))
            if isinstance(item, p.ProtocolError):
                assert item.error in (p.BAD_REQUEST, p.TOO_LARGE)
                json.loads(p.error(item.id, item.error, item.message))
    assert decoder.pending <= 512 + chunk


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "op", "user", "password", "service", "rhost", "token", "open_session"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.sampled_from(
                           ["hello", "auth", "session", "logout", "status", "sessions", "revoke", "reload"]))))
def test_any_json_object_gives_request_or_clean_error(obj: dict[str, object]) -> None:
    (item,) = feed_all(json.dumps(obj).encode() + b"\n", max_line=4096, chunk=4096)
    assert isinstance(item, (p.Request, p.ProtocolError))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=60), st.binary(min_size=1, max_size=8))
def test_invalid_utf8_inside_a_string_is_a_clean_error(where: int, junk: bytes) -> None:
    line = b'{"id":1,"op":"auth","user":"' + b"u" * where + junk + b'","password":"p","service":"s"}\n'
    for item in feed_all(line, max_line=4096, chunk=4096):
        assert isinstance(item, (p.Request, p.ProtocolError))


@pytest.mark.parametrize("depth", [1_000, 30_000])
@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deep_nesting_is_a_clean_error(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    for wrapped in (opener * depth + b"1" + closer * depth, b'{"id":1,"op":"hello","x":' + opener * depth + b"1" + closer * depth + b"}"):
        (item,) = feed_all(wrapped + b"\n", max_line=1 << 20, chunk=1 << 20)
        assert isinstance(item, p.ProtocolError) and item.error == p.BAD_REQUEST


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    b'{"id":1,"op":"hello"}', b"", b" ", b"\r", b"{", b"}", b'"', b"\\", b"\x00", b"\xff", b"\xc3\xa9", b"x" * 300,
    b'{"id":"a","op":"auth","user":"u","password":"p","service":"s"}', b'"id":', b"[", b"]", b",",
]), max_size=40), st.integers(min_value=1, max_value=97))
def test_structured_junk_gives_one_item_per_line(parts: list[bytes], chunk: int) -> None:
    data = b"\n".join(parts) + b"\n"
    out = feed_all(data, max_line=256, chunk=chunk)
    lines = data.split(b"\n")[:-1]
    assert len(out) == sum(1 for line in lines if len(line) > 256 or line.strip())
