"""No terminal key in the clear in any API answer, log record or database row, through a
whole flow (import, registration, SMS and HTTP requests, refusals, deliveries)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient

from trustfleet.keysync.terminal import M2mTerminal, sync_over_http
from trustfleet.server.context import AppContext

from .conftest import APP, Platform, drain, send_sms, worker
from .test_keysync_import import dump, forms_of


def test_no_key_in_answers_logs_or_the_database(
    client: TestClient,
    context: AppContext,
    tokens: dict[str, str],
    gateway: str,
    live_platform: Platform,
    make_terminal: Callable[..., M2mTerminal],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    answers: list[bytes] = []

    def keep(response: httpx.Response) -> None:
        response.read()
        answers.append(response.content)

    client.event_hooks["response"].append(keep)
    single = make_terminal()
    several = make_terminal(mdn="+8613800138000", applications=[APP, "b"], register=[APP, "b"])
    assert send_sms(client, single, single.next_request().to_text()).status_code == 200
    send_sms(client, single, "KS1 " + single.keys[0].key_id + " C=9 M=0000000000000000")
    sync_over_http(client, tokens["device-gateway"], several,
                   several.next_request(application_id=APP))  # fmt: skip
    drain(worker(context))
    assert len(live_platform.keys.all()) == 2
    client.get("/v1/outbox/messages", headers={"Authorization": f"Bearer {tokens['admin']}"})
    client.get("/v1/audit", headers={"Authorization": f"Bearer {tokens['admin']}"})
    logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records).encode()
    everything = b"\x00".join([*answers, logged, dump(context.engine)])
    assert len(answers) > 5
    for terminal in (single, several):
        for held in terminal.keys:
            for form in forms_of(held.key):
                assert form not in everything, held.key_id
