"""The flow end to end over the API: import, registration, a key-sync request by SMS and
over HTTP, the binding, and the sealed delivery to a real receiver on localhost."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.keysync.terminal import M2mTerminal, sync_over_http
from trustfleet.server.context import AppContext

from .conftest import (
    APP,
    Platform,
    auth,
    bindings,
    drain,
    ok,
    send_sms,
    worker,
)


def test_sms_request_binds_and_the_platform_receives_the_key(
    client: TestClient,
    context: AppContext,
    sessions: sessionmaker[Session],
    tokens: dict[str, str],
    gateway: str,
    live_platform: Platform,
    make_terminal: Callable[..., M2mTerminal],
) -> None:
    terminal = make_terminal()
    request = terminal.next_request()
    answer = send_sms(client, terminal, request.to_text())
    assert answer.status_code == 200, answer.text
    assert "<Response>" in answer.text
    assert bindings(sessions) == 1
    drain(worker(context))
    stored = live_platform.keys.all()
    assert len(stored) == 1
    assert stored[0].key == terminal.keys[0].key
    assert (stored[0].mdn, stored[0].key_id, stored[0].application_id) == (
        terminal.mdn,
        terminal.keys[0].key_id,
        APP,
    )
    view = ok(
        client.get(f"/v1/keysync/registrations/{terminal.mdn}", headers=auth(tokens["operator"]))
    )
    assert view["terminal_id"] == terminal.terminal_id
    assert view["bindings"][0]["key_id"] == terminal.keys[0].key_id


def test_http_request_from_the_device_gateway(
    client: TestClient,
    context: AppContext,
    tokens: dict[str, str],
    live_platform: Platform,
    make_terminal: Callable[..., M2mTerminal],
) -> None:
    terminal = make_terminal(applications=[APP, "other-app"], register=[APP, "other-app"])
    request = terminal.next_request(application_id=APP)
    bound = sync_over_http(client, tokens["device-gateway"], terminal, request)  # type: ignore[arg-type]
    assert bound["application_id"] == APP
    drain(worker(context))
    assert [k.key_id for k in live_platform.keys.all()] == [
        terminal.held(application_id=APP).key_id
    ]


def test_the_sms_webhook_answers_alike_without_the_device_lane(
    context: AppContext,
    sessions: sessionmaker[Session],
    tokens: dict[str, str],
    gateway: str,
    live_platform: Platform,
    make_terminal: Callable[..., M2mTerminal],
) -> None:
    from fastapi.testclient import TestClient

    from trustfleet.server.app import create_app

    terminal = make_terminal()
    with TestClient(create_app(context, device_lane=False)) as plain:
        bad = send_sms(plain, terminal, terminal.next_request().to_text(), secret="wrong")
        assert bad.status_code == 403
        assert bad.json()["code"] == "keysync-bad-gateway-signature"
        good = send_sms(plain, terminal, terminal.next_request().to_text())
        assert good.status_code == 200 and good.headers["content-type"].startswith("text/xml")
    assert bindings(sessions) == 1


def test_device_gateway_refusals_carry_their_codes(
    client: TestClient,
    sessions: sessionmaker[Session],
    tokens: dict[str, str],
    live_platform: Platform,
    make_terminal: Callable[..., M2mTerminal],
) -> None:
    import pytest

    from trustfleet.keysync import protocol
    from trustfleet.keysync.errors import KeysyncServerRefused

    terminal = make_terminal()
    request = terminal.next_request()
    gateway = tokens["device-gateway"]
    sync_over_http(client, gateway, terminal, request)
    with pytest.raises(KeysyncServerRefused) as replayed:
        sync_over_http(client, gateway, terminal, request)
    assert (replayed.value.remote_code, replayed.value.http_status) == (
        "keysync-replayed-counter",
        409,
    )
    forged = protocol.SyncRequest(request.key_id, None, request.counter + 1, bytes(8))
    with pytest.raises(KeysyncServerRefused) as bad_mac:
        sync_over_http(client, gateway, terminal, forged)
    assert bad_mac.value.remote_code == "keysync-bad-mac"
    with pytest.raises(KeysyncServerRefused) as wrong_role:
        sync_over_http(client, tokens["operator"], terminal, terminal.next_request())
    assert wrong_role.value.http_status == 403
    assert bindings(sessions) == 1
