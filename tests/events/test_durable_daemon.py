"""Events that survive: kill -9 under load, dead letters over the socket, `subscribe` and its resumption."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from authd.client import Client, ClientError, ReplyError
from authd.ctl import main as authctl
from authd.events import Event
from authd.signals import Receivers

from ..daemon import PASSWORD, as_nobody, raw_connect, wait_for
from .conftest import HttpReceiver
from .probes import read_records
from .test_daemon_handlers import MakeDaemon, audit_lines, recorder, wait_counter


def webhook(url: str, **extra: Any) -> str:
    more = "".join(f"{key} = {value}\n" for key, value in extra.items())
    return f'\n[[handler]]\ntype = "webhook"\nevents = ["auth.*"]\nurl = "{url}"\nretries = 0\nretry_backoff = 0.05\n{more}'


def auth_events(records: list[dict[str, Any]]) -> dict[str, str]:
    """rhost -> event id of the auth.* events among what a handler received."""
    return {e["rhost"]: e["id"] for e in records if e["name"].startswith("auth.") and "rhost" in e}


def test_kill_9_under_load_loses_no_event_of_an_answered_request(make_daemon: MakeDaemon, http_receiver: HttpReceiver) -> None:
    http_receiver.statuses = [503] * 100_000  # the receiver is down for the whole first run
    d = make_daemon(
        '\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\nevents = ["auth.*"]\n'
        + recorder("slow", "slow.jsonl", '["auth.*"]', delay=0.05)
        + webhook(http_receiver.url)
    ).start()
    answered: dict[str, bool] = {}  # rhost -> succeeded
    lock = threading.Lock()
    killed = threading.Event()

    def client(worker: int) -> None:
        try:
            with Client(d.socket, timeout=30) as c:
                for i in range(40):
                    rhost = f"2001:db8::{worker:x}:{i:x}"
                    wrong = i % 5 == 4
                    try:
                        c.auth("alice" if worker % 2 else "bob", "wrong" if wrong else PASSWORD, "login",
                               rhost=rhost, open_session=False)
                        ok = True
                    except ReplyError:
                        ok = False
                    with lock:
                        answered[rhost] = ok
        except ClientError:
            assert killed.is_set(), "only the kill may cut a client off"

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(answered) >= 60, what="a load in progress")
    killed.set()
    d.kill(signal.SIGKILL)
    for t in threads:
        t.join(60)
    d.proc.wait(10)
    assert 60 <= len(answered) < 160, "killed in the middle of the load"

    http_receiver.statuses = []  # the receiver is back
    assert "delay = 0.05" in d.policy
    d.write_policy(d.policy.replace("delay = 0.05", "delay = 0.0"))  # and the slow handler is not slow any more
    d.start()
    delivered: dict[str, dict[str, str]] = {}

    def everything_delivered() -> bool:
        delivered["audit"] = auth_events([json.loads(x) for x in (d.root / "audit.jsonl").read_text().splitlines()])
        delivered["slow"] = auth_events([r["event"] for r in read_records(d.state / "slow.jsonl")])
        delivered["webhook"] = auth_events([r.json() for r in http_receiver.requests if r.body])
        return all(set(answered) <= set(got) for got in delivered.values())

    wait_for(everything_delivered, timeout=60, what="every answered request's event in every handler")
    ids = {rhost: delivered["audit"][rhost] for rhost in answered}
    for name, got in delivered.items():
        assert {rhost: got[rhost] for rhost in answered} == ids, f"{name} got other events for the same requests"
    webhook_ids = [r.json()["id"] for r in http_receiver.requests if r.body]
    assert set(ids.values()) <= set(webhook_ids)  # duplicates allowed (at least once), never a gap
    assert d.stop() == 0


def test_dead_letters_are_listed_replayed_and_dropped_over_the_socket(
    make_daemon: MakeDaemon, http_receiver: HttpReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    http_receiver.statuses = [503] * 3
    d = make_daemon(webhook(http_receiver.url, max_age=0)).start()
    for rhost in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert d.auth(rhost=rhost, open_session=False)["ok"]
    wait_counter(d, "webhook", 3, "dead")
    shown = d.call("events")
    assert shown["handlers"]["webhook"]["dead_letters"] == 3 and shown["log"]["storage_error"] is None
    assert authctl(["-s", str(d.socket), "events", "dead", "webhook"]) == 0
    dead = json.loads(capsys.readouterr().out)["dead"]
    assert [x["event"]["rhost"] for x in dead] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert d.call("events_drop", handler="webhook", seqs=[dead[0]["seq"]])["seqs"] == [dead[0]["seq"]]
    assert authctl(["-s", str(d.socket), "events", "replay", "webhook"]) == 0
    assert json.loads(capsys.readouterr().out)["seqs"] == [x["seq"] for x in dead[1:]]
    wait_counter(d, "webhook", 2)
    assert [r.json()["rhost"] for r in http_receiver.requests[3:]] == ["192.0.2.2", "192.0.2.3"]
    assert d.call("events_dead")["dead"] == []
    assert d.call("events_replay", handler="nosuch")["error"] == "not_found"
    assert d.stop() == 0


def test_subscribe_streams_events_and_resumes_after_a_disconnect_without_a_gap(make_daemon: MakeDaemon) -> None:
    d = make_daemon('\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n').start()
    got: list[Event] = []
    first = Client(d.socket)

    def read(client: Client, after: str, until: int) -> None:
        for event in client.subscribe(after=after, events=["auth.*", "session.*"]):
            got.append(event)
            if len(got) >= until:
                return

    reader = threading.Thread(target=read, args=(first, "now", 4))
    reader.start()
    wait_for(lambda: d.call("events")["subscribers"] == 1, what="the subscription")
    assert d.auth(rhost="192.0.2.1")["ok"] and d.auth(password="wrong", rhost="192.0.2.2")["error"] == "auth_failed"
    assert d.auth(rhost="192.0.2.3", open_session=False)["ok"]
    reader.join(30)
    first.close()  # disconnected after four events; more happen meanwhile
    for i in range(4, 8):
        assert d.auth(rhost=f"192.0.2.{i}", open_session=False)["ok"]
    second = Client(d.socket)
    reader = threading.Thread(target=read, args=(second, got[-1].id, 8))
    reader.start()
    reader.join(30)
    second.close()
    logged = wait_for(lambda: (r := [e for e in audit_lines(d.root / "audit.jsonl")
                                     if e["name"].split(".")[0] in ("auth", "session")])[7:] and r,
                      what="the audit handler to log the eight events")
    assert [e.id for e in got] == [e["id"] for e in logged[:8]]
    assert [e.name for e in got[:3]] == ["auth.succeeded", "session.opened", "auth.failed"]
    assert d.stop() == 0


def test_a_subscriber_that_does_not_read_is_cut_off_and_resumes_where_it_stopped(make_daemon: MakeDaemon) -> None:
    EVENTS = 1500  # ~400 KB of events: more than the kernel buffers between authd and the client
    limits = "\n[daemon.limits]\nwrite_buffer = 4096\nrequest_timeout = 1.0\n"
    d = make_daemon("failure_delay = 0.0\n" + limits).start()
    sock = raw_connect(d.socket)
    sock.sendall(b'{"id":"s","op":"subscribe","events":["auth.*"]}\n')
    wait_for(lambda: d.call("events")["subscribers"] == 1, what="the subscription")
    with d.client() as c:
        for i in range(EVENTS):
            c.auth("alice", PASSWORD, "login", rhost=f"2001:db8::{i:x}", open_session=False)
    wait_for(lambda: d.call("status")["counters"].get("subscriptions_cut_off") == 1, what="the cut-off")
    lines = _read_lines(sock)
    sock.close()
    assert json.loads(lines[0]) == {"id": "s", "ok": True, "subscribed": True, "after": "now"}
    end = json.loads(lines[-1])
    assert end["error"] == "too_slow" and end["resume_after"]
    streamed = [json.loads(x)["event"]["id"] for x in lines[1:-1]]
    assert streamed[-1] == end["resume_after"]
    with Client(d.socket) as c:
        rest = []
        for event in c.subscribe(after=end["resume_after"], events=["auth.*"]):
            rest.append(event.id)
            if len(streamed) + len(rest) == EVENTS:
                break
    assert len(set(streamed + rest)) == EVENTS, "no gap and no repeat across the cut-off"
    assert d.stop() == 0


def test_subscribing_is_for_admins_and_listed_subscribers(make_daemon: MakeDaemon) -> None:
    d = make_daemon().start()
    refused = json.loads(as_nobody(d.socket, b'{"id":1,"op":"subscribe"}\n'))
    assert refused["error"] == "forbidden" and "subscribe_users" in refused["message"]
    d.write_policy(d.policy.replace('admin_users = ["root"]', 'admin_users = ["root"]\nsubscribe_users = ["nobody"]'))
    d.call("reload")
    allowed = json.loads(as_nobody(d.socket, b'{"id":1,"op":"subscribe"}\n').splitlines()[0])
    assert allowed == {"id": 1, "ok": True, "subscribed": True, "after": "now"}
    unknown = json.loads(as_nobody(d.socket, b'{"id":2,"op":"subscribe","after":"' + b"f" * 32 + b'"}\n'))
    assert unknown["error"] == "not_found"
    assert d.stop() == 0


def test_receivers_run_in_the_application_and_survive_a_daemon_restart(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = make_daemon().start()
    seen: list[tuple[str, str | None]] = []
    receivers = Receivers(d.socket, cursor_file=tmp_path / "cursor")

    @receivers.on("auth.succeeded")
    def on_login(event: Event) -> None:
        seen.append((event.name, event.rhost))

    @receivers.on("auth.failed")
    async def on_failure(event: Event) -> None:
        seen.append((event.name, event.rhost))
        if event.rhost == "192.0.2.9":
            receivers.stop()

    @receivers.on("auth.*")
    def broken(event: Event) -> None:
        raise RuntimeError("a receiver's bug stays in the application")

    runner = threading.Thread(target=receivers.run)
    runner.start()
    wait_for(lambda: d.call("events")["subscribers"] == 1, what="the subscription")
    assert d.auth(rhost="192.0.2.1", open_session=False)["ok"]
    wait_for(lambda: len(seen) == 1, what="the first event")
    assert d.stop() == 0  # the daemon restarts; the stream ends with shutting_down
    d.start()
    assert d.auth(rhost="192.0.2.2", open_session=False)["ok"]
    assert d.auth(password="wrong", rhost="192.0.2.9", open_session=False)["error"] == "auth_failed"
    runner.join(60)
    assert not runner.is_alive()
    assert seen == [("auth.succeeded", "192.0.2.1"), ("auth.succeeded", "192.0.2.2"), ("auth.failed", "192.0.2.9")]
    assert (tmp_path / "cursor").read_text().strip()  # a restarted application resumes from here
    assert d.stop() == 0


def _read_lines(sock: socket.socket) -> list[bytes]:
    sock.settimeout(10)
    data = b""
    while not data.endswith(b"\n") or b'"too_slow"' not in data.rsplit(b"\n", 2)[-2]:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return data.splitlines()
