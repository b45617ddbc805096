"""Login signals (blinker) of the Flask and FastAPI integrations; Django apps use Django's own.

Receivers run in the request that logged in or out, before its response, so an app can record,
notify or refuse (by raising) the way Flask apps do with Flask's own signals. The sender is the
Flask app, or the FastAPI integration's `Authd` object: connect with `connect_via(sender)` to
hear only one app.

- `logged_in`: user=User
- `logged_out`: user=User, or None when the session had already ended
- `login_failed`: username=str, reason=authd's error code (`auth_failed`, `locked_out`, ...)
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()
logged_in = _signals.signal("authd-logged-in")
logged_out = _signals.signal("authd-logged-out")
login_failed = _signals.signal("authd-login-failed")
