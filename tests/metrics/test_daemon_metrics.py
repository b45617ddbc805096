"""The scrape endpoint and `authctl metrics` of a real daemon, checked by Debian's promtool."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path


from ..abuse.helpers import ctl, ctl_as_nobody, lockout_table
from ..daemon import CANARY, PASSWORD, Daemon, raw_connect, wait_for
from ..mail.clients import mail_daemon, mux, read_counted, saslauthd

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
DOC_ROW = re.compile(r"^\| `(authd_\w+)` \| (\w+) \|", re.M)
METRICS = """
[metrics]
listen = "{listen}"
max_connections = 2
timeout = {timeout}
"""


def metrics_table(listen: str = "127.0.0.1:0", timeout: float = 10.0) -> str:
    return METRICS.format(listen=listen, timeout=timeout)


def address(d: Daemon) -> str:
    (line,) = d.log_lines("metrics listening")
    return str(line["address"])


def connect(d: Daemon) -> socket.socket:
    where = address(d)
    if where.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(where[len("unix:"):])
        return sock
    host, _, port = where.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=30)


def exchange(d: Daemon, request: bytes) -> bytes:
    """Send `request`, read until authd closes the connection."""
    with connect(d) as sock:
        sock.sendall(request)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def scrape(d: Daemon, accept: str | None = None) -> tuple[str, dict[str, str], str]:
    """GET /metrics: status line, headers (lower-cased names) and body."""
    headers = f"Accept: {accept}\r\n" if accept else ""
    raw = exchange(d, f"GET /metrics HTTP/1.1\r\nHost: authd\r\n{headers}\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(fields["content-length"]) == len(body)
    return status, fields, body.decode()


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: scripts/test installs Debian's `prometheus` package, which ships it"
    return subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def test_tcp_scrape_passes_promtool_and_counts_logins(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(metrics_table()).start()
    assert address(d).startswith("127.0.0.1:")
    status, headers, before = scrape(d)
    assert status == "HTTP/1.1 200 OK" and headers["content-type"].startswith("text/plain; version=0.0.4")
    checked = promtool(before)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert samples(before)['authd_config_generation'] == 1.0

    assert d.auth("alice", rhost="198.51.100.7")["ok"]
    assert d.auth("alice", CANARY, rhost="198.51.100.7")["error"] == "auth_failed"
    assert d.auth("bob", service="client-chosen-service")["error"] == "not_authorized"
    _, _, after = scrape(d)
    checked = promtool(after)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    values = samples(after)
    assert values['authd_auth_requests_total{protocol="native",result="ok",service="login"}'] == 1
    assert values['authd_auth_requests_total{protocol="native",result="auth_failed",service="login"}'] == 1
    assert values['authd_auth_requests_total{protocol="native",result="not_authorized",service=""}'] == 1
    assert values['authd_auth_duration_seconds_count{protocol="native",result="ok",service="login"}'] == 1
    assert values['authd_auth_duration_seconds_bucket{le="+Inf",protocol="native",result="ok",service="login"}'] == 1
    assert values['authd_requests_total{op="auth"}'] == 3
    assert values['authd_sessions_active'] == 1
    assert values['authd_pam_workers{state="idle"}'] == 2
    assert values['authd_pam_calls_total'] >= 2
    for secret in ("alice", "bob", "198.51.100.7", CANARY, "client-chosen-service"):
        assert secret not in after


def test_mail_front_ends_are_labelled_by_protocol(make_daemon: Callable[..., Daemon]) -> None:
    d = mail_daemon(make_daemon, metrics_table()).start()
    assert saslauthd(d, "alice", PASSWORD) == b"OK"
    assert saslauthd(d, "alice", "wrong").startswith(b"NO")
    assert saslauthd(d, "alice", PASSWORD, service="client-made-up").startswith(b"NO")
    with raw_connect(mux(d)) as sock:
        sock.sendall(b"\x00\x00\x00\x02pw\x00\x04smtp\x00\x00")  # no login
        assert read_counted(sock).startswith(b"NO")
    text = scrape(d)[2]
    values = samples(text)
    assert values['authd_auth_requests_total{protocol="saslauthd",result="ok",service="login"}'] == 1
    assert values['authd_auth_requests_total{protocol="saslauthd",result="auth_failed",service="login"}'] == 1
    assert values['authd_auth_requests_total{protocol="saslauthd",result="not_authorized",service=""}'] == 1
    assert values['authd_requests_total{op="saslauthd"}'] == 3
    assert values['authd_saslauthd_rejected_total{reason="malformed"}'] == 1
    assert "client-made-up" not in text and "alice" not in text


def test_docs_table_lists_every_family_with_its_type(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(metrics_table()).start()
    exported = {tuple(line.split()[2:4]) for line in scrape(d)[2].splitlines() if line.startswith("# TYPE authd_")}
    documented = {(match[1], match[2]) for match in DOC_ROW.finditer(DOC.read_text())}
    assert documented == exported


def test_lockouts_sessions_and_handlers_move(make_daemon: Callable[..., Daemon]) -> None:
    audit = '\n[[handler]]\ntype = "audit"\npath = "audit.jsonl"\n'
    d = make_daemon(audit + lockout_table(user="{ max_failures = 2 }") + metrics_table()).start()
    token = d.auth("bob")["session"]["token"]
    assert d.call("logout", token=token)["ok"]
    for attempt in ("wrong-1", "wrong-2", "wrong-3"):
        d.auth("alice", attempt)
    def delivered() -> dict[str, float] | None:
        values = samples(scrape(d)[2])
        emitted = values["authd_events_emitted_total"]
        return values if values['authd_events_total{handler="audit",outcome="delivered"}'] == emitted >= 7 else None

    values = wait_for(delivered, what="the audit handler to deliver every event")
    assert values['authd_lockout_locks_total{scope="user"}'] == 1
    assert values['authd_lockout_locked_keys{scope="user"}'] == 1
    assert values['authd_auth_requests_total{protocol="native",result="locked_out",service="login"}'] == 1
    assert values['authd_sessions_closed_total{reason="logout"}'] == 1 and values["authd_sessions_active"] == 0
    assert values['authd_event_queue_depth{handler="audit"}'] == 0
    assert values['authd_events_total{handler="audit",outcome="failed"}'] == 0


def test_unix_socket_scrape_and_authctl_print_the_same_families(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = make_daemon(metrics_table(listen="unix:metrics.sock")).start()
    sock_path = d.config.parent / "metrics.sock"
    assert address(d) == f"unix:{sock_path}"
    assert sock_path.stat().st_mode & 0o777 == 0o660
    _, _, scraped = scrape(d)
    printed = ctl(d, "metrics")
    assert printed.returncode == 0, printed.stderr
    checked = promtool(printed.stdout)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    families = {line.split()[2] for line in scraped.splitlines() if line.startswith("# TYPE")}
    assert families == {line.split()[2] for line in printed.stdout.splitlines() if line.startswith("# TYPE")}
    code, output = ctl_as_nobody(d, "metrics")
    assert code == 1 and '"forbidden"' in output, "metrics is an admin op"
    assert d.stop() == 0
    assert not sock_path.exists(), "the socket file goes with the daemon"


def test_bad_requests_are_answered_and_closed(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(metrics_table()).start()
    assert exchange(d, b"BLAH\r\n\r\n").startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert exchange(d, b"DELETE /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert exchange(d, f"GET /{CANARY} HTTP/1.1\r\n\r\n".encode()).startswith(b"HTTP/1.1 404 ")
    head = exchange(d, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n"), "HEAD: no body"
    oversize = b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 9000 + b"\r\n\r\n"
    assert exchange(d, oversize).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    with connect(d) as sock:  # a client that leaves mid-request costs nothing
        sock.sendall(b"GET /met")
    status, headers, body = scrape(d, accept="application/openmetrics-text; version=1.0.0")
    assert status == "HTTP/1.1 200 OK" and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_slow_scrapers_are_timed_out_and_limited_and_logins_go_on(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(metrics_table(timeout=1.0)).start()
    stalled = [connect(d), connect(d)]  # max_connections = 2
    stalled[0].sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
    try:
        assert exchange(d, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert d.auth("alice")["ok"], "logins do not wait for scrapers"
        for sock in stalled:
            assert read_all(sock).startswith(b"HTTP/1.1 408 Request Timeout\r\n"), "answered after `timeout`"
    finally:
        for sock in stalled:
            sock.close()
    assert scrape(d)[0] == "HTTP/1.1 200 OK", "the slots are free again"


def test_reload_applies_limits_and_reports_a_new_address(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(metrics_table()).start()
    first = address(d)
    d.write_policy(d.policy.replace('listen = "127.0.0.1:0"', 'listen = "unix:metrics.sock"').replace("timeout = 10.0", "timeout = 0.5"))
    reply = d.call("reload")
    assert reply["ok"] and reply["restart_required"] == ["metrics.listen"]
    assert address(d) == first, "still where it was"
    with connect(d) as sock:
        assert read_all(sock).startswith(b"HTTP/1.1 408 "), "the new timeout applies"
    values = samples(scrape(d)[2])
    assert values["authd_config_generation"] == 2 and values['authd_config_reloads_total{result="ok"}'] == 1
    assert values["authd_config_restart_required"] == 1

    d.write_policy(d.policy + "[metrics.nonsense]\n")
    assert not d.call("reload")["ok"]
    values = samples(scrape(d)[2])
    assert values['authd_config_reloads_total{result="failed"}'] == 1 and values["authd_config_last_reload_successful"] == 0


def test_a_socket_directory_others_may_write_is_refused(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    shared = d.sock_dir / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    d.write_policy(d.policy + metrics_table(listen=f"unix:{shared}/metrics.sock"))
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(30) == 1
    assert f"metrics.listen: {shared} is writable by group or others (mode 777)" in d.output()
    assert not (shared / "metrics.sock").exists() and not d.socket.exists()


def test_a_remote_address_is_refused_at_start(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(metrics_table(listen="0.0.0.0:0")).start(wait=False)
    assert d.proc is not None and d.proc.wait(30) == 1
    assert "metrics: listen is not a loopback address; set allow_remote = true" in d.output()


def test_an_address_in_use_stops_the_start_cleanly(make_daemon: Callable[..., Daemon]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = make_daemon(metrics_table(listen=f"127.0.0.1:{port}")).start(wait=False)
        assert d.proc is not None and d.proc.wait(30) == 1
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use" in d.output()
    assert not d.socket.exists(), "the native socket is not left behind"
