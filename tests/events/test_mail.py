"""``mail``: a welcome mail on the first successful login ever, to a real aiosmtpd on loopback."""

from __future__ import annotations

import socket
from email import message_from_bytes
from email.message import Message
from typing import Any

from aiosmtpd.smtp import AuthResult

from authd.events import AUTH_FAILED, AUTH_LOCKED_OUT, AUTH_SUCCEEDED, Event, EventBus, HandlerContext

from .conftest import CANARY, Cert, SmtpServer, from_toml, login_event, run, serve_smtp


def welcome_toml(smtp: SmtpServer, port: int | None = None) -> str:
    return f"""
[[handler]]
type = "mail"
name = "welcome"
events = ["auth.succeeded"]
host = "{smtp.host}"
port = {port or smtp.port}
timeout = 5
from = "authd <authd@example.org>"
to = "{{user}}@example.org"
subject = "Welcome to {{service}}, {{user}}"
body = "Hello {{user}}, your first login was from {{rhost}} at {{time}}."
"""


def deliver(ctx: HandlerContext, toml: str, events: list[Event]) -> dict:
    async def main() -> dict:
        bus = EventBus()
        bus.set_handlers(from_toml(toml, ctx))
        await bus.start()
        for event in events:
            bus.emit(event)
        assert await bus.close(30) == 0
        return bus.stats()["handlers"]

    return run(main())


def messages(smtp: SmtpServer) -> list[Message]:
    return [message_from_bytes(e.content) for e in smtp.mailbox.envelopes]


def login(user: str, **fields: object) -> Event:
    request = {"user": user, "password": CANARY, "service": "webmail", "rhost": "192.0.2.7"}
    return login_event(AUTH_SUCCEEDED, request | fields)


def test_welcome_mail_is_sent_once_per_user_even_across_restarts(
    ctx: HandlerContext, smtp_server: SmtpServer
) -> None:
    alice = login("alice")
    deliver(
        ctx,
        welcome_toml(smtp_server),
        [alice, login("alice"), login_event(AUTH_FAILED, {"user": "carol"}), login("bob"), login("alice")],
    )
    sent = messages(smtp_server)
    assert [m["To"] for m in sent] == ["alice@example.org", "bob@example.org"]
    assert [e.rcpt_tos for e in smtp_server.mailbox.envelopes] == [["alice@example.org"], ["bob@example.org"]]
    assert smtp_server.mailbox.envelopes[0].mail_from == "authd@example.org"
    first = sent[0]
    assert first["Subject"] == "Welcome to webmail, alice"
    assert first["From"] == "authd <authd@example.org>"
    assert first["Auto-Submitted"] == "auto-generated"
    body = first.get_payload(decode=True).decode()
    assert "Hello alice, your first login was from 192.0.2.7 at 20" in body and body.rstrip().endswith("Z.")

    deliver(ctx, welcome_toml(smtp_server), [login("alice"), login("bob")])  # a restarted daemon
    assert len(smtp_server.mailbox.envelopes) == 2
    assert (ctx.state_dir / "welcome.sqlite3").stat().st_mode & 0o777 == 0o600


def test_a_failed_send_is_retried_on_the_next_login(ctx: HandlerContext, smtp_server: SmtpServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    no_retries = welcome_toml(smtp_server, closed_port) + "max_age = 0\n"  # given up at once: a dead letter
    stats = deliver(ctx, no_retries, [login("dave")])
    assert stats["welcome"]["failed"] == 1 and stats["welcome"]["dead"] == 1
    deliver(ctx, welcome_toml(smtp_server), [login("dave"), login("dave")])
    assert [m["To"] for m in messages(smtp_server)] == ["dave@example.org"]


def lockout_alert_toml(smtp: SmtpServer, subject: str, body: str) -> str:
    return f"""
[[handler]]
type = "mail"
mode = "every"
events = ["auth.locked_out"]
host = "{smtp.host}"
port = {smtp.port}
from = "authd@example.org"
to = "security@example.org"
subject = "{subject}"
body = "{body}"
"""


def test_every_mode_mails_each_event(ctx: HandlerContext, smtp_server: SmtpServer) -> None:
    toml = lockout_alert_toml(smtp_server, "{user} locked out ({event})",
                              "Too many failures for {user} from {rhost}; session {session_id}.")
    locked = login_event(AUTH_LOCKED_OUT, {"user": "erin", "password": CANARY, "rhost": "198.51.100.9"})
    stats = deliver(ctx, toml, [locked, login("erin")])
    assert stats["mail"]["delivered"] == 1
    (sent,) = messages(smtp_server)
    assert sent["To"] == "security@example.org" and sent["Subject"] == "erin locked out (auth.locked_out)"
    assert "from 198.51.100.9; session -." in sent.get_payload(decode=True).decode()


def test_line_breaks_in_a_user_name_cannot_silence_a_lockout_alert(
    ctx: HandlerContext, smtp_server: SmtpServer
) -> None:
    """CR, LF, NEL or U+2028 in a client's user name or rhost used to make the header raise."""
    toml = lockout_alert_toml(smtp_server, "{user} locked out from {rhost}", "{user} from {rhost}")
    forged = ["eve\r\nBcc: victim@example.org", "mallory\u2028x", "trent\x85y", "zed\x1b[31m"]
    locked = [login_event(AUTH_LOCKED_OUT, {"user": u, "password": CANARY, "rhost": "a\nb"}) for u in forged]
    stats = deliver(ctx, toml, locked)
    assert stats["mail"] == {**stats["mail"], "delivered": 4, "failed": 0}
    subjects = [m["Subject"] for m in messages(smtp_server)]
    assert subjects == [
        "eve\\u000d\\u000aBcc: victim@example.org locked out from a\\u000ab",
        "mallory\\u2028x locked out from a\\u000ab",
        "trent\\u0085y locked out from a\\u000ab",
        "zed\\u001b[31m locked out from a\\u000ab",
    ]
    assert all(e.rcpt_tos == ["security@example.org"] for e in smtp_server.mailbox.envelopes)


def test_a_recipient_that_is_not_one_address_is_refused(ctx: HandlerContext, smtp_server: SmtpServer) -> None:
    stats = deliver(ctx, welcome_toml(smtp_server), [login("x@evil.example, y")])
    assert stats["welcome"]["failed"] == 1 and smtp_server.mailbox.envelopes == []


def test_a_recipient_from_a_field_the_event_lacks_is_refused(
    ctx: HandlerContext, smtp_server: SmtpServer
) -> None:
    every = welcome_toml(smtp_server).replace('events = ["auth.succeeded"]', 'mode = "every"')
    stats = deliver(ctx, every, [Event.create("daemon.started", generation=1), login("alice")])
    assert stats["welcome"]["failed"] == 1 and stats["welcome"]["delivered"] == 1
    assert [e.rcpt_tos for e in smtp_server.mailbox.envelopes] == [["alice@example.org"]]


def test_starttls_with_auth_and_implicit_tls(ctx: HandlerContext, tls_cert: Cert) -> None:
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mech: str, data: Any) -> AuthResult:
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"smtp-pass")

    (ctx.base_dir / "smtp.pass").write_text("smtp-pass\n")
    every = (
        '[[handler]]\nname = "{name}"\ntype = "mail"\nmode = "every"\n'
        'host = "127.0.0.1"\nport = {port}\n'
        'from = "authd@example.org"\nto = "{{user}}@example.org"\nsubject = "s"\nbody = "b"\n'
        f'ca_file = "{tls_cert.cert}"\n'
    )
    server_tls = tls_cert.server_context()
    submission_options = {
        "tls_context": server_tls,
        "require_starttls": True,
        "authenticator": authenticator,
        "auth_require_tls": True,
    }
    with serve_smtp(**submission_options) as submission, serve_smtp(ssl_context=server_tls) as smtps:
        toml = every.format(name="submission", port=submission.port)
        toml += 'tls = "starttls"\nusername = "authd"\npassword_file = "smtp.pass"\n'
        toml += every.format(name="smtps", port=smtps.port) + 'tls = "implicit"\n'
        stats = deliver(ctx, toml, [login("alice")])
    assert stats["submission"]["delivered"] == 1 and stats["smtps"]["delivered"] == 1
    assert logins == [(b"authd", b"smtp-pass")]
    envelopes = submission.mailbox.envelopes + smtps.mailbox.envelopes
    assert [e.rcpt_tos for e in envelopes] == [["alice@example.org"]] * 2
