"""Interoperability with independent implementations: Standard Webhooks signatures with the
``standardwebhooks`` reference library (both ways), the SMS gateway signature with the
``twilio`` library's validator (both ways), and the HPKE payloads with ``pyhpke`` (both
ways, X25519 and P-256)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from fastapi.testclient import TestClient
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twilio.request_validator import RequestValidator

from trustfleet.keystore.base import KeyStore
from trustfleet.keysync import protocol
from trustfleet.keysync.sync import twilio_signature
from trustfleet.keysync.terminal import M2mTerminal
from trustfleet.kit.outbox import make_signing_key
from trustfleet.kit.outbox.webhooks import (
    Verifier,
    WebhookVerificationFailed,
    decode_public_key,
    signed_content,
)
from trustfleet.server.context import AppContext

from .conftest import GATEWAY_SECRET, WEBHOOK

BODY = b'{"type":"keysync.key","timestamp":1,"data":{}}'
NOW = datetime.now(UTC).replace(microsecond=0)


def _sign(
    keystore: KeyStore, handle: str, signing: str, message_id: str, body: bytes, at: datetime = NOW
) -> str:
    content = signed_content(message_id, int(at.timestamp()), body)
    raw = keystore.mac(handle, content) if signing == "v1" else keystore.sign(handle, content)
    return f"{signing},{base64.b64encode(raw).decode()}"


def _headers(message_id: str, signature: str, at: datetime = NOW) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }


# -- Standard Webhooks -------------------------------------------------------------------


def test_our_v1_signatures_verify_with_the_reference_library(context: AppContext) -> None:
    keystore = context.keystore
    key = make_signing_key(keystore, "v1")
    now = datetime.now(UTC)  # the reference library checks against its own clock
    signature = _sign(keystore, key.handle, "v1", "msg_1", BODY, now)
    headers = _headers("msg_1", signature, now)
    assert Webhook(key.verifier).verify(BODY, headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(key.verifier).verify(BODY + b" ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(key.verifier).verify(BODY, _headers("msg_2", signature, now))


def test_we_verify_the_reference_librarys_signatures() -> None:
    secret = "whsec_" + base64.b64encode(b"a secret of twenty-four b").decode()
    signature = Webhook(secret).sign("msg_7", NOW, BODY)
    from trustfleet.kit.outbox.webhooks import decode_secret

    verifier = Verifier(secret=decode_secret(secret))
    assert verifier.verify(BODY, _headers("msg_7", signature), NOW) == "msg_7"
    with pytest.raises(WebhookVerificationFailed):
        verifier.verify(BODY.replace(b"1", b"2"), _headers("msg_7", signature), NOW)
    with pytest.raises(WebhookVerificationFailed):  # too old
        verifier.verify(BODY, _headers("msg_7", signature), NOW.replace(year=NOW.year + 1))


def test_v1a_ed25519_signatures_verify_with_the_published_key(context: AppContext) -> None:
    keystore = context.keystore
    key = make_signing_key(keystore, "v1a")
    signature = _sign(keystore, key.handle, "v1a", "msg_3", BODY)
    public = decode_public_key(key.verifier)
    public.verify(
        base64.b64decode(signature.split(",")[1]),
        signed_content("msg_3", int(NOW.timestamp()), BODY),
    )
    verifier = Verifier(public_key=public)
    assert verifier.verify(BODY, _headers("msg_3", signature), NOW) == "msg_3"
    other = Verifier(public_key=ed25519.Ed25519PrivateKey.generate().public_key())
    with pytest.raises(WebhookVerificationFailed):
        other.verify(BODY, _headers("msg_3", signature), NOW)


# -- Twilio ------------------------------------------------------------------------------


def test_our_gateway_signature_is_twilios() -> None:
    params = [("From", "+861440000000001"), ("To", "+8610690000"), ("Body", "KS1 a C=1 M=00"),
              ("MessageSid", "SM123"), ("NumMedia", "0")]  # fmt: skip
    ours = twilio_signature(GATEWAY_SECRET.encode(), WEBHOOK, params)
    validator = RequestValidator(GATEWAY_SECRET)
    assert ours == validator.compute_signature(WEBHOOK, dict(params))
    assert validator.validate(WEBHOOK, dict(params), ours)
    assert not validator.validate(WEBHOOK, {**dict(params), "From": "+8613800138000"}, ours)


@pytest.mark.usefixtures("live_platform")
def test_a_request_signed_by_twilios_library_is_accepted(
    client: TestClient, gateway: str, make_terminal: Callable[..., M2mTerminal]
) -> None:
    terminal = make_terminal()
    form = terminal.sms_form(terminal.next_request(), to="+8610690000")
    signature = RequestValidator(GATEWAY_SECRET).compute_signature(WEBHOOK, dict(form))
    answer = client.post(WEBHOOK, data=dict(form), headers={"X-Twilio-Signature": signature})
    assert answer.status_code == 200, answer.text
    bad = RequestValidator("another auth token").compute_signature(WEBHOOK, dict(form))
    refused = client.post(WEBHOOK, data=dict(form), headers={"X-Twilio-Signature": bad})
    assert refused.status_code == 403


# -- HPKE --------------------------------------------------------------------------------

SUITES = {
    "x25519": (
        lambda: x25519.X25519PrivateKey.generate(),
        CipherSuite.new(
            KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305
        ),
    ),
    "p256": (
        lambda: ec.generate_private_key(ec.SECP256R1()),
        CipherSuite.new(KEMId.DHKEM_P256_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES128_GCM),
    ),
}
DELIVERY = protocol.KeyDelivery("+861440000000001", "k-1", bytes(range(16)), "app", "aes-128")


@pytest.mark.parametrize("kind", sorted(SUITES))
def test_pyhpke_opens_our_payloads(kind: str) -> None:
    make, suite = SUITES[kind]
    private = make()
    body = protocol.seal_delivery(
        DELIVERY, platform_key=private.public_key(), delivery_id="msg_9", timestamp=1
    )
    data = json.loads(body)["data"]
    assert data["hpke"] == kind
    sealed = protocol.CODEC.decode_bytes(data["sealed"], "sealed")
    enc_size = 32 if kind == "x25519" else 65
    recipient = suite.create_recipient_context(
        sealed[:enc_size],
        KEMKey.from_pyca_cryptography_key(private),
        info=protocol.delivery_info("app", "msg_9"),
    )
    opened = json.loads(recipient.open(sealed[enc_size:]))
    assert opened["key_id"] == "k-1" and opened["mdn"] == DELIVERY.mdn
    assert protocol.CODEC.decode_bytes(opened["key"], "key") == DELIVERY.key


@pytest.mark.parametrize("kind", sorted(SUITES))
def test_we_open_pyhpke_payloads_and_only_for_their_delivery(kind: str) -> None:
    make, suite = SUITES[kind]
    private = make()
    plain = DELIVERY._plain()
    enc, sender = suite.create_sender_context(
        KEMKey.from_pyca_cryptography_key(private.public_key()),
        info=protocol.delivery_info("app", "msg_5"),
    )
    sealed = enc + sender.seal(plain)
    body = json.dumps(
        {"type": "keysync.key", "timestamp": 1, "data": {
            "application_id": "app", "delivery_id": "msg_5", "hpke": kind,
            "sealed": protocol.CODEC.encode_bytes(sealed)}}
    ).encode()  # fmt: skip
    opened = protocol.open_delivery(
        body, platform_key=private, application_id="app", delivery_id="msg_5"
    )
    assert opened.key == DELIVERY.key and opened.mdn == DELIVERY.mdn
    from trustfleet.keysync.errors import KeysyncPayloadInvalid

    with pytest.raises(KeysyncPayloadInvalid):  # replayed under another webhook-id
        protocol.open_delivery(
            body.replace(b"msg_5", b"msg_6"), platform_key=private, application_id="app",
            delivery_id="msg_6",
        )  # fmt: skip


def test_pyhpke_seals_manifest_keys_we_open() -> None:
    import_key = x25519.X25519PrivateKey.generate()
    suite = SUITES["x25519"][1]
    info = protocol.manifest_key_info("kid", "T-1", "k-1")
    enc, sender = suite.create_sender_context(
        KEMKey.from_pyca_cryptography_key(import_key.public_key()), info=info
    )
    sealed = enc + sender.seal(b"\x01" * 16)
    assert (
        protocol.open_manifest_key(
            sealed, import_key=import_key, kid="kid", terminal_id="T-1", key_id="k-1"
        )
        == b"\x01" * 16
    )
