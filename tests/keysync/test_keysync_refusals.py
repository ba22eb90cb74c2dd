"""Every key-sync refusal: its own code, an audit record, nothing bound, nothing queued.
Each attack is made the way an attacker would make it (a spoofed sender, a replayed or
forged SMS, another terminal's key, a wrong gateway secret)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.keysync import protocol
from trustfleet.keysync.terminal import M2mTerminal
from trustfleet.server.context import AppContext

from .conftest import (
    APP,
    GATEWAY,
    GATEWAY_SECRET,
    WEBHOOK,
    Platform,
    audit_actions,
    auth,
    bindings,
    messages,
    ok,
    problem,
    refusal_codes,
    send_sms,
)

pytestmark = pytest.mark.usefixtures("gateway", "live_platform")


def refused(
    client: TestClient,
    sessions: sessionmaker[Session],
    terminal: M2mTerminal,
    body: str,
    status: int,
    code: str,
) -> None:
    before = refusal_codes(sessions)
    problem(send_sms(client, terminal, body), status, code)
    assert refusal_codes(sessions) == [*before, code]
    assert bindings(sessions) == 0
    assert messages(sessions) == 0


def test_bad_gateway_signature_is_403_and_audited(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    terminal = make_terminal()
    body = terminal.next_request().to_text()
    answer = send_sms(client, terminal, body, secret="not-the-gateway-secret")
    problem(answer, 403, "keysync-bad-gateway-signature")
    unsigned = client.post(WEBHOOK, data={"From": terminal.mdn, "Body": body})
    problem(unsigned, 403, "keysync-bad-gateway-signature")
    # the client's first refusal of the window is written; the second is counted ...
    assert refusal_codes(sessions) == ["keysync-bad-gateway-signature"]
    client.app.state.context.refusals.close()  # type: ignore[attr-defined]
    # ... into one aggregate record, written when the window closes (or at shutdown)
    (_, aggregate), *_ = [a for a in audit_actions(sessions) if a[1].get("aggregate")]
    assert aggregate["count"] == 1
    assert aggregate["kinds"] == {"keysync-bad-gateway-signature": 1}
    assert bindings(sessions) == messages(sessions) == 0
    # the same SMS, properly signed, still binds: the refusals consumed nothing
    assert send_sms(client, terminal, body).status_code == 200


def test_a_signature_over_other_fields_does_not_verify(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    from trustfleet.keysync.sync import twilio_signature

    terminal = make_terminal()
    body = terminal.next_request().to_text()
    signed = [("From", "+8613800138000"), ("Body", body)]  # signed for another sender
    signature = twilio_signature(GATEWAY_SECRET.encode(), WEBHOOK, signed)
    answer = client.post(
        WEBHOOK,
        data={"From": terminal.mdn, "Body": body},
        headers={"X-Twilio-Signature": signature},
    )
    problem(answer, 403, "keysync-bad-gateway-signature")


def test_unknown_gateway(client: TestClient, sessions: sessionmaker[Session]) -> None:
    answer = client.post("/v1/keysync/sms/nobody", data={"From": "+8613800138000", "Body": "x"})
    problem(answer, 403, "keysync-unknown-gateway")
    assert refusal_codes(sessions) == ["keysync-unknown-gateway"]


def test_unregistered_mdn(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    terminal = make_terminal(register=[])  # keys imported, MDN never registered
    refused(
        client, sessions, terminal, terminal.next_request().to_text(),
        403, "keysync-unregistered-mdn",
    )  # fmt: skip


def test_unknown_key_id(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    terminal = make_terminal()
    held = terminal.keys[0]
    request = protocol.compose_request(
        held.key, KeyAlgorithm(held.algorithm), mdn=terminal.mdn, key_id="no-such-key", counter=1
    )
    refused(client, sessions, terminal, request.to_text(), 404, "keysync-unknown-key-id")


def test_forged_mac(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    terminal = make_terminal()
    real = terminal.next_request()
    forged = protocol.SyncRequest(real.key_id, None, real.counter, bytes(protocol.MAC_SIZE))
    refused(client, sessions, terminal, forged.to_text(), 403, "keysync-bad-mac")
    guessed = protocol.compose_request(
        bytes(16), KeyAlgorithm.AES_128, mdn=terminal.mdn, key_id=real.key_id, counter=5
    )
    refused(client, sessions, terminal, guessed.to_text(), 403, "keysync-bad-mac")
    # a forged request consumed no counter: the real one still binds
    assert send_sms(client, terminal, real.to_text()).status_code == 200


def test_an_sms_replayed_from_a_spoofed_number_fails_its_mac(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    victim = make_terminal()
    attacker = make_terminal(mdn="+8613800138000")
    captured = victim.next_request().to_text()
    refused(client, sessions, attacker, captured, 403, "keysync-bad-mac")


def test_replayed_counter(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    terminal = make_terminal()
    first = terminal.next_request()
    second = terminal.next_request()
    assert send_sms(client, terminal, second.to_text()).status_code == 200
    assert bindings(sessions) == messages(sessions) == 1
    before = refusal_codes(sessions)
    for replay in (second, first):  # the same SMS again, and an older one
        problem(send_sms(client, terminal, replay.to_text()), 409, "keysync-replayed-counter")
    assert refusal_codes(sessions) == [*before, *["keysync-replayed-counter"] * 2]
    assert bindings(sessions) == messages(sessions) == 1


def test_key_id_of_another_terminal(
    client: TestClient,
    sessions: sessionmaker[Session],
    tokens: dict[str, str],
    make_terminal: Callable[..., M2mTerminal],
) -> None:
    ours = make_terminal(terminal_id="OURS")
    theirs = make_terminal(mdn="+8613800138000", terminal_id="THEIRS")
    # our MDN is bound to our terminal at registration
    ok(
        client.post(
            "/v1/keysync/registrations",
            headers=auth(tokens["operator"]),
            json={"mdn": ours.mdn, "application_ids": [APP], "terminal_id": "OURS"},
        )
    )
    # their key, MACed correctly (their key was copied into a device with our SIM)
    held = theirs.keys[0]
    stolen = protocol.compose_request(
        held.key, KeyAlgorithm(held.algorithm), mdn=ours.mdn, key_id=held.key_id, counter=1
    )
    refused(client, sessions, ours, stolen.to_text(), 403, "keysync-key-of-another-terminal")


def test_a_terminal_stays_with_the_mdn_of_its_first_sync(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    terminal = make_terminal()
    assert send_sms(client, terminal, terminal.next_request().to_text()).status_code == 200
    other = make_terminal(mdn="+8613800138000")
    held = terminal.keys[0]
    moved = protocol.compose_request(
        held.key, KeyAlgorithm(held.algorithm), mdn=other.mdn, key_id=held.key_id, counter=9
    )
    before = bindings(sessions)
    problem(send_sms(client, other, moved.to_text()), 403, "keysync-key-of-another-terminal")
    assert bindings(sessions) == before


def test_missing_application_id_with_several_keys(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    terminal = make_terminal(applications=[APP, "other-app"], register=[APP, "other-app"])
    request = terminal.next_request(application_id=APP, name_application=False)
    refused(client, sessions, terminal, request.to_text(), 400, "keysync-application-id-required")


def test_application_not_registered_and_key_of_another_application(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    terminal = make_terminal(applications=[APP, "other-app"], register=["other-app"])
    request = terminal.next_request(application_id=APP)
    refused(client, sessions, terminal, request.to_text(), 403,
            "keysync-application-not-registered")  # fmt: skip
    held = terminal.held(application_id=APP)
    mismatch = protocol.compose_request(
        held.key, KeyAlgorithm(held.algorithm), mdn=terminal.mdn, key_id=held.key_id,
        counter=held.counter + 1, application_id="other-app",
    )  # fmt: skip
    refused(client, sessions, terminal, mismatch.to_text(), 403,
            "keysync-key-application-mismatch")  # fmt: skip


def test_malformed_and_invalid_mdn(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    terminal = make_terminal()
    refused(client, sessions, terminal, "please send my key", 400, "keysync-malformed-request")
    terminal.mdn = "12345"
    refused(client, sessions, terminal, "KS1 a C=1 M=0000000000000000", 400, "keysync-invalid-mdn")


def test_a_refused_request_consumes_its_counter_once_the_mac_verified(
    client: TestClient,
    sessions: sessionmaker[Session],
    tokens: dict[str, str],
    make_terminal: Callable[..., M2mTerminal],
) -> None:
    terminal = make_terminal(applications=[APP, "other-app"], register=["other-app"])
    early = terminal.next_request(application_id=APP)
    problem(send_sms(client, terminal, early.to_text()), 403, "keysync-application-not-registered")
    ok(
        client.post(
            "/v1/keysync/registrations",
            headers=auth(tokens["operator"]),
            json={"mdn": terminal.mdn, "application_ids": [APP]},
        )
    )
    # now registered, the captured refused SMS must not bind
    problem(send_sms(client, terminal, early.to_text()), 409, "keysync-replayed-counter")
    assert (
        send_sms(client, terminal, terminal.next_request(application_id=APP).to_text()).status_code
        == 200
    )


def test_no_platform(
    client: TestClient, sessions: sessionmaker[Session], make_terminal: Callable[..., M2mTerminal]
) -> None:
    terminal = make_terminal(applications=["no-platform-app"])
    refused(client, sessions, terminal, terminal.next_request().to_text(), 409,
            "keysync-no-platform")  # fmt: skip


def test_a_refused_registered_terminal_gets_a_reply_sms_without_detail(
    client: TestClient,
    context: AppContext,
    sessions: sessionmaker[Session],
    tokens: dict[str, str],
    make_terminal: Callable[..., M2mTerminal],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trustfleet.keysync import services

    sent: list[tuple[str, str]] = []
    done = threading.Event()

    def capture(gateway: Any, to: str, text: str) -> None:
        sent.append((to, text))
        done.set()

    monkeypatch.setattr(services, "_reply_in_background", capture)
    ok(
        client.put(
            f"/v1/keysync/gateways/{GATEWAY}",
            headers=auth(tokens["admin"]),
            json={
                "webhook_url": WEBHOOK,
                "secret": GATEWAY_SECRET,
                "reply_url": "http://127.0.0.1:9/Messages.json",
                "reply_account": "AC1",
                "reply_from": "+8610690000",
            },
        )
    )
    registered = make_terminal()
    forged = protocol.SyncRequest(registered.keys[0].key_id, None, 1, bytes(8))
    problem(send_sms(client, registered, forged.to_text()), 403, "keysync-bad-mac")
    assert sent == [(registered.mdn, "KS1 REFUSED")]
    stranger = make_terminal(mdn="+8613800138000", register=[])
    problem(send_sms(client, stranger, forged.to_text()), 403, "keysync-unregistered-mdn")
    assert sent == [(registered.mdn, "KS1 REFUSED")]  # no reply to unregistered numbers


def test_the_reply_goes_to_the_gateways_outbound_api(
    context: AppContext, tokens: dict[str, str], client: TestClient,
    make_terminal: Callable[..., M2mTerminal], platform: Platform,
) -> None:  # fmt: skip
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from trustfleet.keysync.sync import send_reply

    from .conftest import ServerThread

    received: list[tuple[dict[str, str], str]] = []

    async def messages_api(request: Request) -> JSONResponse:
        form = dict(parse_qsl((await request.body()).decode()))
        received.append((form, request.headers["authorization"]))
        return JSONResponse({"sid": "SM1"}, status_code=201)

    server = ServerThread(
        Starlette(routes=[Route("/Messages.json", messages_api, methods=["POST"])])
    ).start()
    try:
        gateway = type("G", (), {"reply_url": server.url + "/Messages.json", "reply_account": "AC1",
                                 "reply_from": "+8610690000", "secret": b"token"})()  # fmt: skip
        send_reply(gateway, "+861440000000001", "KS1 REFUSED")
    finally:
        server.stop()
    assert received[0][0] == {
        "To": "+861440000000001",
        "From": "+8610690000",
        "Body": "KS1 REFUSED",
    }
    assert received[0][1].startswith("Basic ")
