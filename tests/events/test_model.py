"""The Event record: immutable, self-identifying, and with nowhere to put a password."""

from __future__ import annotations

import json
import uuid

import msgspec
import pytest
from hypothesis import given, strategies as st

import authd.events as events
from authd.events import AUTH_SUCCEEDED, EVENT_NAMES, Event
from authd.events.model import time_ordered_id

from .conftest import CANARY, login_event


def test_create_fills_id_and_time() -> None:
    a = Event.create(AUTH_SUCCEEDED, user="alice")
    b = Event.create(AUTH_SUCCEEDED, user="alice")
    assert a.id != b.id and len(a.id) == 32
    assert a.time > 1_600_000_000
    assert a.name == "auth.succeeded"


@given(st.floats(min_value=0, max_value=2**47 / 1000, allow_nan=False))
def test_an_id_is_a_uuid7_carrying_its_millisecond(now: float) -> None:
    """RFC 9562 version 7: the id says when, to the millisecond; the rest is random."""
    made = uuid.UUID(time_ordered_id(now))
    assert made.version == 7 and made.variant == uuid.RFC_4122
    assert made.int >> 80 == int(now * 1000)


def test_ids_sort_in_creation_order_across_milliseconds() -> None:
    """Later events get larger ids, so the log's index on `id` is appended to, not scattered."""
    times = [1_795_000_000.0 + step / 1000 for step in range(200)]
    ids = [time_ordered_id(t) for t in times]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    event = Event.create(AUTH_SUCCEEDED)
    assert uuid.UUID(event.id).int >> 80 == int(event.time * 1000)


def test_events_are_immutable() -> None:
    event = Event.create(AUTH_SUCCEEDED, user="alice")
    with pytest.raises(AttributeError):
        event.user = "mallory"  # type: ignore[misc]


def test_to_dict_and_json_omit_unset_fields() -> None:
    event = Event.create(AUTH_SUCCEEDED, user="alice", service="imap", pid=42, latency=0.25)
    expected = {
        "name": "auth.succeeded", "id": event.id, "time": event.time,
        "user": "alice", "service": "imap", "pid": 42, "latency": 0.25,
    }  # fmt: skip
    assert event.to_dict() == expected
    assert json.loads(event.to_json()) == expected
    assert msgspec.json.decode(event.to_json(), type=Event) == event


def test_every_name_has_a_constant() -> None:
    constants = {v for k, v in vars(events).items() if k.isupper() and isinstance(v, str)}
    assert constants == set(EVENT_NAMES)
    assert len(EVENT_NAMES) == 11


def test_no_field_can_hold_a_secret() -> None:
    for field in Event.__struct_fields__:
        assert not any(s in field for s in ("pass", "secret", "token", "authtok", "cred"))
    with pytest.raises(TypeError):
        Event.create(AUTH_SUCCEEDED, user="alice", password=CANARY)


def test_event_built_from_a_request_drops_the_password() -> None:
    request = {"id": 7, "op": "auth", "user": "alice", "password": CANARY, "service": "imap"}
    event = login_event(AUTH_SUCCEEDED, request)
    assert CANARY not in repr(event) and CANARY.encode() not in event.to_json()
