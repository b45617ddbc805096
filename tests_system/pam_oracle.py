"""python-pam as an independent oracle for authd, on the machine's own PAM stack.

    .venv/bin/python tests_system/pam_oracle.py SOCKET USER  < password-line

For the right password, a wrong one and an unknown user, python-pam (its own ctypes binding
of libpam, no pam_wrapper) and authd (over SOCKET) must give the same verdict through
/etc/pam.d/login. The system stage runs it in a pristine container (tests_system/test_readme.py).
"""

from __future__ import annotations

import sys

import pam

from authd.client import Client, ReplyError


def main() -> int:
    socket_path, user = sys.argv[1:3]
    password = sys.stdin.readline().rstrip("\r\n")
    disagreements = 0
    for who, secret, label in ((user, password, "right password"), (user, password + "-wrong", "wrong password"),
                               ("no-such-user-oracle", password, "unknown user")):
        oracle = pam.pam().authenticate(who, secret, service="login")
        with Client(socket_path) as client:
            try:
                authd = bool(client.auth(who, secret, service="login", open_session=False)["ok"])
            except ReplyError as exc:
                authd = False
                assert exc.code == "auth_failed", exc.code
        verdict = "agree" if oracle == authd else "DISAGREE"
        disagreements += oracle != authd
        print(f"{label}: python-pam {oracle}, authd {authd}: {verdict}")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
