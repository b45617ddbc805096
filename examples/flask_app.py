"""Example: a Flask app that logs users in through authd and gates pages on authd's roles.

    AUTHD_SOCKET=examples/authd.sock python examples/flask_app.py     # http://127.0.0.1:8001

Settings from the environment: AUTHD_SOCKET, AUTHD_SERVICE (default "web"), PORT (8001).
It serves plain HTTP on loopback, so the cookie's Secure flag is off here: behind HTTPS, leave
AUTHD_COOKIE_SECURE at its default (True).
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, redirect, request
from markupsafe import escape

from authd.integrations import LoginError, User
from authd.integrations.flask import (
    Authd, current_user, has_permission, logged_in, logged_out, login, login_failed, login_required, logout,
    permission_required,
)

app = Flask(__name__)
app.config.update(
    AUTHD_SOCKET=os.environ.get("AUTHD_SOCKET"),
    AUTHD_SERVICE=os.environ.get("AUTHD_SERVICE", "web"),
    AUTHD_COOKIE_SECURE=False,  # plain HTTP on loopback only; see the docstring
    AUTHD_LOGIN_VIEW="login_form",
)
Authd(app)

PAGE = "<!doctype html><title>authd + Flask</title><h1>{title}</h1>{body}"
FORM = ('<form method="post" action="/login"><input name="username" placeholder="user">'
        '<input name="password" type="password" placeholder="password"><button>Log in</button></form>')


@logged_in.connect_via(app)
def _on_login(sender: Flask, user: User) -> None:
    print(f"signal logged_in: {user.name} groups={','.join(user.groups) or '-'}", flush=True)


@logged_out.connect_via(app)
def _on_logout(sender: Flask, user: User | None) -> None:
    print(f"signal logged_out: {user.name if user else '-'}", flush=True)


@login_failed.connect_via(app)
def _on_failure(sender: Flask, username: str, reason: str) -> None:
    print(f"signal login_failed: {username} ({reason})", flush=True)


@app.get("/login")
def login_form() -> str:
    return PAGE.format(title="Log in", body=FORM)


@app.post("/login")
def do_login() -> Any:
    try:
        login(request.form["username"], request.form["password"])
    except LoginError as exc:
        return PAGE.format(title="Log in", body=f"<p>{exc}</p>{FORM}"), 401
    return redirect(request.args.get("next") or "/")


@app.post("/logout")
def do_logout() -> Any:
    logout()
    return redirect("/login")


@app.get("/")
@login_required
def home() -> str:
    user = current_user()
    assert user is not None
    links = [f'<li><a href="/reports">reports</a> ({"yes" if has_permission("reports.read") else "no"})</li>',
             f'<li><a href="/posts/delete">delete posts</a> ({"yes" if has_permission("blog.delete_post") else "no"})</li>']
    return PAGE.format(title=f"Hello, {escape(user.name)}", body=f"<ul>{''.join(links)}</ul>"
                       '<form method="post" action="/logout"><button>Log out</button></form>')


@app.get("/reports")
@permission_required("reports.read")
def reports() -> str:
    return PAGE.format(title="Reports", body="<p>Only for those with reports.read.</p>")


@app.get("/posts/delete")
@permission_required("blog.delete_post")
def delete_posts() -> str:
    return PAGE.format(title="Delete posts", body="<p>Only for those with blog.delete_post.</p>")


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8001")), threaded=True)
