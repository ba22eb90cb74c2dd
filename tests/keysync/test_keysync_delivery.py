"""Deliveries to a platform that is down (connection refused, HTTP 500, timeouts, an
acknowledgement lost after the key was stored) and then back: every binding arrives and
the receiver stores each exactly once. Dead letters, redelivery, pause and resume."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import Receive, Scope, Send

from trustfleet.keysync.terminal import M2mTerminal
from trustfleet.kit.outbox.models import OutboxMessage
from trustfleet.server.context import AppContext

from .conftest import (
    Platform,
    ServerThread,
    auth,
    drain,
    free_port,
    ok,
    register_platform,
    send_sms,
    worker,
)

BINDINGS = 6


class Flaky:
    """The receiver behind a failure plan: each request takes the next mode, then "ok"."""

    def __init__(self, app: Any, plan: list[str]) -> None:
        self.app = app
        self.plan = list(plan)
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.requests += 1
        mode = self.plan.pop(0) if self.plan else "ok"
        if mode == "500":
            await _answer(send, 500)
            return
        if mode == "slow":  # longer than the worker's timeout, nothing stored
            await asyncio.sleep(3)
            await _answer(send, 500)
            return
        if mode == "lost-ack":  # stored, but the answer never says so
            await self.app(scope, receive, _swallow)
            await _answer(send, 502)
            return
        await self.app(scope, receive, send)


async def _answer(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _swallow(message: Any) -> None:
    return None


def statuses(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(OutboxMessage.status)))


def bind_many(
    client: TestClient, make_terminal: Callable[..., M2mTerminal], n: int
) -> list[M2mTerminal]:
    terminals = [make_terminal(mdn=f"+86144000000{i:04d}") for i in range(n)]
    for terminal in terminals:
        assert send_sms(client, terminal, terminal.next_request().to_text()).status_code == 200
    return terminals


def test_platform_down_then_back_every_key_arrives_once(
    client: TestClient,
    context: AppContext,
    sessions: sessionmaker[Session],
    tokens: dict[str, str],
    gateway: str,
    platform: Platform,
    make_terminal: Callable[..., M2mTerminal],
) -> None:
    port = free_port()
    register_platform(client, tokens, platform, f"http://127.0.0.1:{port}/webhook")
    terminals = bind_many(client, make_terminal, BINDINGS)
    delivery = worker(context, schedule=(0,) * 10, timeout_seconds=1)
    # connection refused: nothing listens on the port yet
    assert delivery.run_once() == BINDINGS
    assert delivery.run_once() == BINDINGS
    assert statuses(sessions) == ["pending"] * BINDINGS
    # up, but failing: HTTP 500s, a timeout, and acknowledgements lost after storing
    plan = ["500", "500", "slow", "lost-ack", "lost-ack", "500", "lost-ack"]
    flaky = Flaky(platform.app(), plan)
    platform.server = ServerThread(flaky, port).start()
    drain(delivery)
    assert statuses(sessions) == ["delivered"] * BINDINGS
    stored = platform.keys.all()
    assert len(stored) == BINDINGS
    assert len({s.webhook_id for s in stored}) == BINDINGS
    assert flaky.requests >= BINDINGS + len(plan)  # the lost acknowledgements were resent
    held = {k.key_id: k.key for t in terminals for k in t.keys}
    assert all(held[s.key_id] == s.key for s in stored)


def test_dead_letter_then_redeliver(
    client: TestClient,
    context: AppContext,
    sessions: sessionmaker[Session],
    tokens: dict[str, str],
    gateway: str,
    platform: Platform,
    make_terminal: Callable[..., M2mTerminal],
) -> None:
    port = free_port()
    register_platform(client, tokens, platform, f"http://127.0.0.1:{port}/webhook")
    bind_many(client, make_terminal, 1)
    delivery = worker(context, schedule=(0, 0, 0), timeout_seconds=1)
    drain(delivery)
    assert statuses(sessions) == ["dead"]
    dead = ok(client.get("/v1/outbox/messages?status=dead", headers=auth(tokens["operator"])))
    assert dead[0]["attempts"] == 3 and dead[0]["last_error"] == "connection failed"
    platform.server = ServerThread(platform.app(), port).start()
    again = ok(
        client.post(
            f"/v1/outbox/messages/{dead[0]['id']}/redeliver", headers=auth(tokens["operator"])
        )
    )
    assert again["status"] == "pending"
    drain(delivery)
    assert statuses(sessions) == ["delivered"]
    assert len(platform.keys.all()) == 1
    # redelivering a delivered message sends it again; the receiver keeps one copy
    client.post(f"/v1/outbox/messages/{dead[0]['id']}/redeliver", headers=auth(tokens["admin"]))
    drain(delivery)
    assert len(platform.keys.all()) == 1


def test_a_paused_platform_gets_nothing_until_resumed(
    client: TestClient,
    context: AppContext,
    sessions: sessionmaker[Session],
    tokens: dict[str, str],
    gateway: str,
    live_platform: Platform,
    make_terminal: Callable[..., M2mTerminal],
) -> None:
    app_id = live_platform.application_id
    paused = ok(
        client.post(f"/v1/keysync/platforms/{app_id}/pause", headers=auth(tokens["operator"]))
    )
    assert paused["paused"] is True
    bind_many(client, make_terminal, 2)
    delivery = worker(context)
    assert delivery.run_once() == 0
    assert live_platform.keys.all() == []
    ok(client.post(f"/v1/keysync/platforms/{app_id}/resume", headers=auth(tokens["operator"])))
    drain(delivery)
    assert len(live_platform.keys.all()) == 2
    listed = ok(
        client.get(f"/v1/keysync/platforms/{app_id}/deliveries", headers=auth(tokens["admin"]))
    )
    assert [row["status"] for row in listed] == ["delivered", "delivered"]


def test_hmac_signed_platform(
    client: TestClient,
    context: AppContext,
    tokens: dict[str, str],
    gateway: str,
    platform: Platform,
    make_terminal: Callable[..., M2mTerminal],
) -> None:
    port = free_port()
    answer = register_platform(
        client, tokens, platform, f"http://127.0.0.1:{port}/webhook", signing="v1"
    )
    assert answer["verifier"].startswith("whsec_")
    platform.server = ServerThread(platform.app(), port).start()
    bind_many(client, make_terminal, 1)
    drain(worker(context))
    assert len(platform.keys.all()) == 1


def test_a_receiver_with_the_wrong_verifier_refuses_and_nothing_is_stored(
    client: TestClient,
    context: AppContext,
    sessions: sessionmaker[Session],
    tokens: dict[str, str],
    gateway: str,
    platform: Platform,
    make_terminal: Callable[..., M2mTerminal],
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from trustfleet.kit.outbox.webhooks import Verifier

    port = free_port()
    register_platform(client, tokens, platform, f"http://127.0.0.1:{port}/webhook")
    platform.verifier = Verifier(public_key=ed25519.Ed25519PrivateKey.generate().public_key())
    platform.server = ServerThread(platform.app(), port).start()
    bind_many(client, make_terminal, 1)
    worker(context, schedule=(0,)).run_once()
    assert statuses(sessions) == ["dead"]
    assert platform.keys.all() == []
