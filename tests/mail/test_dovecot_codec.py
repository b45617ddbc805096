"""The Dovecot auth-client codec on its own: lines in, events out."""

from __future__ import annotations

import base64

from hypothesis import given, settings, strategies as st

from authd.dovecot import codec

HELLO = b"VERSION\t1\t0\nCPID\t77\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}".encode())


def started(**options: bool) -> codec.Decoder:
    decoder = codec.Decoder(**options)
    assert decoder.feed(HELLO) == []
    return decoder


def test_handshake_is_complete_and_in_order() -> None:
    lines = codec.handshake(123, 4, "ab" * 16).decode().splitlines()
    assert lines == ["VERSION\t1\t2", "MECH\tPLAIN\tplaintext", "MECH\tLOGIN\tplaintext", "SPID\t123", "CUID\t4",
                     f"COOKIE\t{'ab' * 16}", "DONE"]


def test_plain_with_initial_response_as_postfix_sends_it() -> None:
    line = f"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.9\tsecured\tresp={plain('alice', 'pw')}\n"
    [event] = started().feed(line.encode())
    assert event == codec.Authenticate(1, "alice", "pw", "smtp", "192.0.2.9", True)
    assert "pw" not in repr(event)


def test_plain_without_response_gets_an_empty_challenge_with_its_tab() -> None:
    decoder = started()
    assert decoder.feed(b"AUTH\t5\tPLAIN\tservice=smtp\n") == [codec.Send(b"CONT\t5\t\n")]
    [event] = decoder.feed(f"CONT\t5\t{plain('alice', 'pw', 'alice')}\n".encode())
    assert isinstance(event, codec.Authenticate) and event.user == "alice" and event.rip is None


def test_login_asks_username_then_password() -> None:
    decoder = started()
    assert decoder.feed(b"AUTH\t2\tLOGIN\tservice=smtp\trip=198.51.100.3\n") == [codec.Send(b"CONT\t2\tVXNlcm5hbWU6\n")]
    assert decoder.feed(f"CONT\t2\t{b64(b'bob')}\n".encode()) == [codec.Send(b"CONT\t2\tUGFzc3dvcmQ6\n")]
    [event] = decoder.feed(f"CONT\t2\t{b64(b'pw')}\n".encode())
    assert event == codec.Authenticate(2, "bob", "pw", "smtp", "198.51.100.3", False)


def test_pipelined_requests_are_independent() -> None:
    decoder = started()
    data = b"".join(f"AUTH\t{i}\tPLAIN\tservice=smtp\tresp={plain('u' + str(i), 'pw')}\n".encode() for i in (1, 2, 3))
    assert [e.id for e in decoder.feed(data) if isinstance(e, codec.Authenticate)] == [1, 2, 3]


def test_bad_base64_unknown_mech_and_foreign_authzid_fail_the_request_only() -> None:
    decoder = started()
    assert decoder.feed(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=!!notbase64\n") == [codec.Send(b"FAIL\t1\treason=Invalid base64 data\n")]
    assert decoder.feed(b"AUTH\t2\tCRAM-MD5\tservice=smtp\n") == [codec.Send(b"FAIL\t2\treason=Unsupported authentication mechanism\n")]
    [refused] = decoder.feed(f"AUTH\t3\tPLAIN\tservice=smtp\tresp={plain('alice', 'pw', 'root')}\n".encode())
    assert isinstance(refused, codec.Send) and refused.data.startswith(b"FAIL\t3\t")
    assert decoder.feed(b"AUTH\t4\tPLAIN\tservice=smtp\tresp=YWJj\n")[0].data.startswith(b"FAIL\t4\t")  # no NULs
    assert isinstance(decoder.feed(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('a', 'b')}\n".encode())[0], codec.Authenticate)


def test_secured_required_refuses_plaintext_without_it() -> None:
    decoder = started(require_secured=True)
    [refused] = decoder.feed(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('a', 'b')}\n".encode())
    assert refused == codec.Send(f"FAIL\t1\treason={codec.PLAINTEXT_REFUSED}\n".encode())
    assert isinstance(decoder.feed(f"AUTH\t2\tPLAIN\tservice=smtp\tsecured\tresp={plain('a', 'b')}\n".encode())[0], codec.Authenticate)


def test_protocol_violations_close() -> None:
    assert isinstance(codec.Decoder().feed(b"AUTH\t1\tPLAIN\tservice=smtp\n")[0], codec.Close), "no VERSION first"
    assert isinstance(codec.Decoder().feed(b"VERSION\t2\t0\n")[0], codec.Close)
    assert isinstance(started().feed(b"AUTH\t0\tPLAIN\tservice=smtp\n")[0], codec.Close), "id 0"
    assert isinstance(started().feed(b"CONT\t9\tYQ==\n")[0], codec.Close)
    assert isinstance(started().feed(b"x" * (codec.MAX_LINE + 1))[0], codec.Close)
    decoder = started()
    decoder.feed(b"AUTH\t1\tLOGIN\tservice=smtp\n")
    assert isinstance(decoder.feed(b"AUTH\t1\tLOGIN\tservice=smtp\n")[0], codec.Close), "id in use"


def test_an_answered_id_may_be_reused() -> None:
    decoder = started()
    [event] = decoder.feed(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('a', 'b')}\n".encode())
    assert isinstance(decoder.feed(b"CONT\t1\tYQ==\n")[0], codec.Close), "no CONT once it is being decided"
    decoder = started()
    decoder.feed(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('a', 'b')}\n".encode())
    decoder.forget(1)
    assert isinstance(decoder.feed(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('a', 'b')}\n".encode())[0], codec.Authenticate)


def test_replies_escape_and_keep_plain_reasons() -> None:
    assert codec.ok(7, "al\tice") == b"OK\t7\tuser=al\001tice\n"
    assert codec.fail(3, "authentication failed", code="temp_fail", user="bob") == b"FAIL\t3\tuser=bob\tcode=temp_fail\treason=authentication failed\n"
    assert codec.unescape(codec.escape("a\tb\n\001\0c")) == "a\tb\n\001\0c"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_any_bytes_give_events_never_exceptions(data: bytes, chunk: int) -> None:
    decoder = started()
    for i in range(0, len(data), chunk):
        for event in decoder.feed(data[i : i + chunk]):
            assert isinstance(event, (codec.Send, codec.Close, codec.Authenticate))
