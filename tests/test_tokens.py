"""Session tokens and ids: random, URL-safe, and never read as a command-line option."""

from __future__ import annotations

from authd.sessions import new_session_id, new_token


def test_tokens_and_ids_never_start_with_a_dash_and_keep_their_length() -> None:
    tokens = [new_token() for _ in range(5000)]  # ~78 would start with `-` if drawn plainly
    ids = [new_session_id() for _ in range(5000)]
    assert not any(value.startswith("-") for value in tokens + ids)
    assert {len(t) for t in tokens} == {43} and {len(i) for i in ids} == {16}
    assert len(set(tokens)) == len(tokens) and len(set(ids)) == len(ids)
