"""``webhook``: POSTs to a real HTTP server on loopback, retries, HMAC signature."""

from __future__ import annotations

import hashlib
import hmac
import socket

from structlog.testing import capture_logs

from authd.events import AUTH_FAILED, AUTH_SUCCEEDED, EventBus, HandlerContext

from .conftest import CANARY, Cert, HttpReceiver, eventually, from_toml, login_event, run, serve_http

SECRET = "hook-secret-42"
REQUEST = {"user": "alice", "password": CANARY, "service": "imap", "rhost": "192.0.2.7"}


def test_delivered_retried_after_500_and_signed(ctx: HandlerContext, http_receiver: HttpReceiver) -> None:
    (ctx.base_dir / "hook.key").write_text(SECRET + "\n")
    http_receiver.statuses = [500, 503]

    async def main() -> None:
        bus = EventBus()
        bus.set_handlers(
            from_toml(
                f'[[handler]]\ntype = "webhook"\nurl = "{http_receiver.url}?src=authd"\n'
                'secret_file = "hook.key"\nbackoff = 0.05\n'
                'headers = {"Authorization" = "Bearer t0ken", "X-Env" = "test"}\n',
                ctx,
            )
        )
        await bus.start()
        event = login_event(AUTH_SUCCEEDED, REQUEST, session_id="s-1", latency=0.01)
        bus.emit(event)
        assert await bus.close(30) == 0
        assert bus.stats()["handlers"]["webhook"]["delivered"] == 1

        assert len(http_receiver.requests) == 3  # 500, 503, then 200
        bodies = {r.body for r in http_receiver.requests}
        deliveries = {r.headers["X-Authd-Delivery"] for r in http_receiver.requests}
        assert len(bodies) == 1 and deliveries == {event.id}
        request = http_receiver.requests[-1]
        assert request.path == "/hook?src=authd"
        assert request.json() == event.to_dict()
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["X-Authd-Event"] == "auth.succeeded"
        assert request.headers["Authorization"] == "Bearer t0ken" and request.headers["X-Env"] == "test"
        expected = hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request.headers["X-Authd-Signature"], f"sha256={expected}")
        assert CANARY.encode() not in request.body

    run(main())


def test_client_errors_are_final_and_counted(ctx: HandlerContext, http_receiver: HttpReceiver) -> None:
    http_receiver.statuses = [404]

    async def main() -> None:
        bus = EventBus()
        toml = f'[[handler]]\ntype = "webhook"\nurl = "{http_receiver.url}"\nbackoff = 0.01\n'
        bus.set_handlers(from_toml(toml, ctx))
        await bus.start()
        bus.emit(login_event(AUTH_FAILED, REQUEST))
        bus.emit(login_event(AUTH_FAILED, REQUEST))
        await eventually(lambda: len(http_receiver.requests) == 2)
        assert await bus.close(30) == 0
        assert bus.stats()["handlers"]["webhook"] | {"queued": 0} == {
            "delivered": 1, "failed": 1, "dropped": 0, "timed_out": 0, "retried": 0, "dead": 0, "blocked_loop": 0, "queued": 0, "lag": 0,
        }  # fmt: skip
        assert "X-Authd-Signature" not in http_receiver.requests[0].headers

    run(main())


def test_unreachable_receiver_is_retried_then_kept_as_a_dead_letter(ctx: HandlerContext) -> None:
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        bus = EventBus()
        bus.set_handlers(
            from_toml(
                f'[[handler]]\ntype = "webhook"\nurl = "http://127.0.0.1:{port}/"\n'
                "retries = 2\nbackoff = 0.01\nmax_age = 0\n",
                ctx,
            )
        )
        await bus.start()
        with capture_logs() as logs:
            bus.emit(login_event(AUTH_FAILED, REQUEST))
            await eventually(lambda: bus.stats()["handlers"]["webhook"]["dead"] == 1)
        (dead,) = await bus.outbox.dead_letters("webhook")
        assert dead["attempts"] == 1 and dead["event"]["name"] == AUTH_FAILED
        assert await bus.close(30) == 0
        assert bus.stats()["handlers"]["webhook"]["failed"] == 1
        (failure,) = [r for r in logs if r["event"] == "giving up on an event; kept as a dead letter"]
        assert "after 3 attempt(s): ConnectionRefusedError" in failure["error"]

    run(main())


def test_https_verified_against_ca_file(ctx: HandlerContext, tls_cert: Cert) -> None:
    with serve_http(tls_cert.server_context()) as receiver:
        toml = f'[[handler]]\nname = "{{name}}"\ntype = "webhook"\nurl = "{receiver.url}"\nretries = 0\n'

        async def main() -> dict:
            bus = EventBus()
            bus.set_handlers(
                from_toml(toml.format(name="trusted") + f'ca_file = "{tls_cert.cert}"\n', ctx)
                + from_toml(toml.format(name="untrusted") + "max_age = 0\n", ctx)  # system CAs refuse it
            )
            await bus.start()
            bus.emit(login_event(AUTH_SUCCEEDED, REQUEST))
            assert await bus.close(30) == 0
            return bus.stats()["handlers"]

        stats = run(main())
    assert stats["trusted"]["delivered"] == 1 and stats["untrusted"]["failed"] == 1
    assert len(receiver.requests) == 1 and receiver.requests[0].json()["user"] == "alice"
