"""``mail``: templated mail over SMTP — a welcome on a user's first login ever, or one per event.

In ``welcome`` mode the handler claims ``(handler name, user)`` in SQLite in the state dir
*before* sending and releases the claim if sending fails: a restart never re-sends, and a
reload that briefly runs the old and the new handler side by side cannot send twice.
"""

from __future__ import annotations

import re
import smtplib
import sqlite3
import ssl
import string
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Any

from authd import sqlitefile
from authd.errors import ConfigError
from authd.events.handler import Handler, HandlerError
from authd.events.config import HandlerContext, MailConfig, read_secret, resolve_path
from authd.events.model import AUTH_SUCCEEDED, Event

FILENAME = "welcome.sqlite3"
FIELDS = frozenset({"user", "service", "rhost", "time", "event", "session_id", "reason"})
_ADDRESS = re.compile(r"[^@\s,;:<>()\[\]\"\\]+@[^@\s,;:<>()\[\]\"\\]+")


def _values(event: Event) -> dict[str, str | None]:
    return {
        "user": event.user,
        "service": event.service,
        "rhost": event.rhost,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.time)),
        "event": event.name,
        "session_id": event.session_id,
        "reason": event.reason,
    }


def _render(template: str, event: Event) -> str:
    return template.format_map({k: "-" if v is None else v for k, v in _values(event).items()})


# Control characters and everything Python or a mail reader takes as a line break (CR, LF, NEL,
# U+2028/2029, ...). A user name or rhost is the client's text: in a header it would raise (and
# silence the alert) or start a new header, so it is shown escaped instead.
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _render_header(template: str, event: Event) -> str:
    return _UNSAFE_IN_HEADER.sub(lambda m: f"\\u{ord(m.group()):04x}", _render(template, event))


def _placeholders(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


class MailHandler(Handler):
    def __init__(
        self,
        *,
        mode: str,
        host: str,
        port: int,
        tls_context: ssl.SSLContext | None,
        starttls: bool,
        username: str | None,
        password: bytes | None,
        sender: str,
        to: str,
        subject: str,
        body: str,
        smtp_timeout: float,
        welcome_db: Path,
        **base: Any,
    ) -> None:
        super().__init__(timeout=3 * smtp_timeout, **base)
        self.mode = mode
        self.host = host
        self.port = port
        self.tls_context = tls_context
        self.starttls = starttls
        self.username = username
        self._password = password
        self.sender = sender
        self.to = to
        self.subject = subject
        self.body = body
        self.smtp_timeout = smtp_timeout
        self.welcome_db = welcome_db
        self._db: sqlite3.Connection | None = None

    def handle(self, event: Event) -> None:
        if self.mode == "every":
            self._send(event)
            return
        if event.name != AUTH_SUCCEEDED or event.user is None or not self._claim(event.user):
            return
        try:
            self._send(event)
        except BaseException:
            self._db.execute(  # type: ignore[union-attr]
                "DELETE FROM welcomed WHERE handler = ? AND user = ?", (self.name, event.user)
            )
            raise

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    def _claim(self, user: str) -> bool:
        if self._db is None:
            sqlitefile.prepare(self.welcome_db)
            self._db = sqlite3.connect(self.welcome_db, timeout=10.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS welcomed"
                " (handler TEXT, user TEXT, time REAL, PRIMARY KEY (handler, user))"
            )
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO welcomed (handler, user, time) VALUES (?, ?, ?)",
            (self.name, user, time.time()),
        )
        return cursor.rowcount == 1

    def _send(self, event: Event) -> None:
        # "{user}@example.org" for an event without a user must not mail "-@example.org"
        absent = sorted(f for f in _placeholders(self.to) if _values(event)[f] is None)
        if absent:
            raise HandlerError(f"no recipient: {event.name} has no {absent[0]} for {self.to!r}")
        recipient = _render(self.to, event)
        if not _ADDRESS.fullmatch(recipient):
            raise HandlerError(f"recipient {recipient!r} is not a single mail address")
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = recipient
        message["Subject"] = _render_header(self.subject, event)
        message["Date"] = formatdate(event.time)
        message["Message-ID"] = make_msgid(domain=parseaddr(self.sender)[1].rpartition("@")[2])
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(_render(self.body, event))
        try:
            if self.tls_context is not None and not self.starttls:
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=self.smtp_timeout, context=self.tls_context
                )
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=self.smtp_timeout)
            with smtp:
                if self.tls_context is not None and self.starttls:
                    smtp.starttls(context=self.tls_context)
                if self.username is not None and self._password is not None:
                    smtp.login(self.username, self._password.decode())
                smtp.send_message(message, to_addrs=[recipient])
        except TimeoutError:
            raise
        except smtplib.SMTPResponseException as e:  # 4xx is temporary, 5xx final (RFC 5321)
            raise HandlerError(f"SMTP via {self.host}:{self.port}: {e}", retry=e.smtp_code < 500) from None
        except smtplib.SMTPRecipientsRefused as e:
            temporary = all(code < 500 for code, _ in e.recipients.values())
            raise HandlerError(f"SMTP via {self.host}:{self.port}: recipient refused", retry=temporary) from None
        except (smtplib.SMTPException, OSError) as e:
            raise HandlerError(f"SMTP via {self.host}:{self.port}: {e}", retry=True) from None


def _check_template(where: str, key: str, template: str) -> None:
    try:
        names = _placeholders(template)
    except ValueError as e:
        raise ConfigError(f"{where}.{key}: {e}") from None
    unknown = names - FIELDS
    if unknown:
        raise ConfigError(
            f"{where}.{key}: unknown placeholder {{{sorted(unknown)[0]}}};"
            f" use {', '.join('{' + f + '}' for f in sorted(FIELDS))}"
        )


def build(cfg: MailConfig, ctx: HandlerContext, where: str, **base: Any) -> MailHandler:
    for key in ("to", "subject", "body"):
        _check_template(where, key, getattr(cfg, key))
    if "@" not in parseaddr(cfg.sender)[1]:
        raise ConfigError(f"{where}.from: {cfg.sender!r} is not a mail address")
    if "{" not in cfg.to and not _ADDRESS.fullmatch(cfg.to):
        raise ConfigError(f"{where}.to: {cfg.to!r} is not a mail address")
    password = read_secret(
        ctx, where, "password", value=None, file=cfg.password_file, env=cfg.password_env
    )
    if (cfg.username is None) != (password is None):
        raise ConfigError(f"{where}: username and password_file/password_env go together")
    if cfg.tls == "none" and (cfg.ca_file or cfg.username is not None):
        raise ConfigError(f"{where}.tls: ca_file and SMTP AUTH need tls = starttls or implicit")
    try:
        cafile = str(resolve_path(ctx, cfg.ca_file)) if cfg.ca_file else None
        context = ssl.create_default_context(cafile=cafile) if cfg.tls != "none" else None
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{where}.ca_file: {e}") from None
    return MailHandler(
        mode=cfg.mode,
        host=cfg.host,
        port=cfg.port or (465 if cfg.tls == "implicit" else 25),
        tls_context=context,
        starttls=cfg.tls == "starttls",
        username=cfg.username,
        password=password,
        sender=cfg.sender,
        to=cfg.to,
        subject=cfg.subject,
        body=cfg.body,
        smtp_timeout=cfg.timeout,
        welcome_db=ctx.state_dir / FILENAME,
        max_age=cfg.max_age,
        retry_backoff=cfg.retry_backoff,
        **base,
    )
