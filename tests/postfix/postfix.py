"""A private Postfix smtpd on a loopback port, authenticating through authd.

Postfix runs from its own config directory (`postfix -c DIR`, allowed by
`alternate_config_directories` in that same main.cf when started as root), with only the
services an SMTP AUTH needs, and logs to a file of ours.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import time
from pathlib import Path

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
anvil unix - - n - 1 anvil
proxymap unix - - n - - proxymap
postlog unix-dgram n - n - 1 postlogd
cleanup unix n - n - 0 cleanup
rewrite unix - - n - - trivial-rewrite
"""

SMTPD_CONF = """\
pwcheck_method: saslauthd
saslauthd_path: {mux}
mech_list: PLAIN LOGIN
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Postfix:
    def __init__(self, root: Path, sasl_type: str, socket_path: Path) -> None:
        self.root = root
        self.conf = root / "conf"
        self.port = free_port()
        self.log = root / "postfix.log"
        for sub in ("conf", "queue", "data", "conf/sasl"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(root / "data", "postfix")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": root / "queue",
            "data_directory": root / "data",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "myhostname": "authd-test.localdomain",
            "mydestination": "",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": sasl_type,
            "smtpd_sasl_path": socket_path if sasl_type == "dovecot" else "smtpd",
            "cyrus_sasl_config_path": self.conf / "sasl",  # Debian's Postfix reads $config_directory/sasl regardless
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
            "maillog_file": self.log,
            "maillog_file_prefixes": f"/var, /dev/stdout, {root}",
            "alternate_config_directories": self.conf,
        }
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (self.conf / "sasl" / "smtpd.conf").write_text(SMTPD_CONF.format(mux=socket_path))

    def start(self) -> Postfix:
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"postfix did not listen on {self.port}:\n{self.output()}")

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True, timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def login(self, user: str, password: str, mechanism: str) -> tuple[int, bytes]:
        """One SMTP session doing AUTH with `mechanism`; the reply to AUTH."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as smtp:
            smtp.ehlo("client.example")
            smtp.user, smtp.password = user, password
            auth = {"PLAIN": smtp.auth_plain, "LOGIN": smtp.auth_login}[mechanism]
            try:
                return smtp.auth(mechanism, auth, initial_response_ok=True)
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code, exc.smtp_error
