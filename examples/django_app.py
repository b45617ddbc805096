"""Example: a one-file Django project that logs users in through authd and gates views on its roles.

    AUTHD_SOCKET=examples/authd.sock python examples/django_app.py    # http://127.0.0.1:8003

Settings from the environment: AUTHD_SOCKET, AUTHD_SERVICE (default "web"), PORT (8003),
DJANGO_DB (default: a fresh SQLite file in the temp directory, migrated at start). Django's
own auth views, `login_required` and `permission_required` do the work; `AuthdBackend` answers
them from authd. Plain HTTP on loopback, so Django's session cookie is not marked Secure here.
"""

from __future__ import annotations

import os
import sys
import tempfile

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret"),
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                           "NAME": os.environ.get("DJANGO_DB", os.path.join(tempfile.mkdtemp(prefix="authd-django-"), "db.sqlite3"))}},
    INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions"],
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "authd.integrations.django.AuthdMiddleware",
    ],
    AUTHENTICATION_BACKENDS=["authd.integrations.django.AuthdBackend"],
    AUTHD={"SOCKET": os.environ.get("AUTHD_SOCKET"), "SERVICE": os.environ.get("AUTHD_SERVICE", "web")},
    LOGIN_URL="/login",
    LOGIN_REDIRECT_URL="/",
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "DIRS": [], "APP_DIRS": False,
                "OPTIONS": {"loaders": [("django.template.loaders.locmem.Loader", {
                    "registration/login.html": (
                        "<!doctype html><title>Log in</title><h1>Log in</h1>{% if form.errors %}<p>Login failed.</p>{% endif %}"
                        '<form method="post">{% csrf_token %}{{ form.username }}{{ form.password }}<button>Log in</button></form>'),
                })]}}],
    USE_TZ=True,
)
django.setup()

from django.contrib.auth import views as auth_views  # noqa: E402
from django.contrib.auth.decorators import login_required, permission_required  # noqa: E402
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.dispatch import receiver  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.utils.html import escape  # noqa: E402


@receiver(user_logged_in)
def _on_login(sender: object, request: HttpRequest, user: object, **kwargs: object) -> None:
    groups = ",".join(g.name for g in user.groups.all()) or "-"  # type: ignore[attr-defined]
    print(f"signal user_logged_in: {user} groups={groups}", flush=True)


@receiver(user_logged_out)
def _on_logout(sender: object, request: HttpRequest, user: object, **kwargs: object) -> None:
    print(f"signal user_logged_out: {user or '-'}", flush=True)


@receiver(user_login_failed)
def _on_failure(sender: object, credentials: dict[str, str], **kwargs: object) -> None:
    print(f"signal user_login_failed: {credentials.get('username')}", flush=True)


@login_required
def home(request: HttpRequest) -> HttpResponse:
    user = request.user
    rows = "".join(f"<li>{perm}: {'yes' if user.has_perm(perm) else 'no'}</li>"
                   for perm in ("reports.read", "blog.add_post", "blog.delete_post"))
    return HttpResponse(f"<!doctype html><title>authd + Django</title><h1>Hello, {escape(user.get_username())}</h1>"
                        f"<ul>{rows}</ul>")


@permission_required("reports.read", raise_exception=True)
def reports(request: HttpRequest) -> HttpResponse:
    return HttpResponse("<h1>Reports</h1><p>Only for those with reports.read.</p>")


@permission_required("blog.delete_post", raise_exception=True)
def delete_posts(request: HttpRequest) -> HttpResponse:
    return HttpResponse("<h1>Delete posts</h1><p>Only for those with blog.delete_post.</p>")


urlpatterns = [
    path("login", auth_views.LoginView.as_view()),
    path("logout", auth_views.LogoutView.as_view(next_page="/login")),
    path("", home),
    path("reports", reports),
    path("posts/delete", delete_posts),
]


if __name__ == "__main__":
    call_command("migrate", verbosity=0)
    port = os.environ.get("PORT", "8003")
    sys.exit(call_command("runserver", f"127.0.0.1:{port}", use_reloader=False))
