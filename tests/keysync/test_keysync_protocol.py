"""The protocol in memory: the SMS request's grammar and MAC (both roles), MDN rules."""

from __future__ import annotations

import pytest

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.keysync import protocol
from trustfleet.keysync.errors import KeysyncInvalidMdn, KeysyncMalformedMessage
from trustfleet.keysync.registration import normalise_mdn, parse_ranges
from trustfleet.wire import MalformedMessage

KEY = bytes(range(16))
MDN = "+861440000000001"


def request(**changes: object) -> protocol.SyncRequest:
    values: dict[str, object] = {
        "mdn": MDN, "key_id": "k-1", "counter": 7, "application_id": None, **changes,
    }  # fmt: skip
    return protocol.compose_request(KEY, KeyAlgorithm.AES_128, **values)  # type: ignore[arg-type]


def test_the_longest_request_fits_one_sms_in_gsm7() -> None:
    longest = protocol.compose_request(
        bytes(32), KeyAlgorithm.AES_256, mdn=MDN, key_id="K" * 32, application_id="a" * 32,
        counter=protocol.MAX_COUNTER,
    )  # fmt: skip
    text = longest.to_text()
    assert len(text) <= 160
    gsm7_basic = set(
        "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
        "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿"
        "abcdefghijklmnopqrstuvwxyzäöñüà"
    )
    assert set(text) <= gsm7_basic
    assert protocol.SyncRequest.parse(text) == longest


def test_round_trip_and_verification() -> None:
    made = request(application_id="app-1")
    parsed = protocol.SyncRequest.parse("  " + made.to_text() + "\n")
    assert parsed == made
    assert protocol.verify_request(parsed, KEY, KeyAlgorithm.AES_128, MDN)


@pytest.mark.parametrize(
    "change",
    [
        {"mdn": "+861440000000002"},
        {"key_id": "k-2"},
        {"application_id": "app-1"},
        {"counter": 8},
    ],
)
def test_the_mac_covers_the_mdn_and_every_field(change: dict[str, object]) -> None:
    made = request()
    mdn = str(change.get("mdn", MDN))
    altered = protocol.SyncRequest(
        str(change.get("key_id", made.key_id)),
        change.get("application_id", made.application_id),  # type: ignore[arg-type]
        int(change.get("counter", made.counter)),  # type: ignore[call-overload]
        made.mac,
    )
    assert not protocol.verify_request(altered, KEY, KeyAlgorithm.AES_128, mdn)


def test_another_key_and_sm4_give_other_macs() -> None:
    made = request()
    assert not protocol.verify_request(made, bytes(16), KeyAlgorithm.AES_128, MDN)
    sm4 = protocol.compose_request(KEY, KeyAlgorithm.SM4, mdn=MDN, key_id="k-1", counter=7)
    assert sm4.mac != made.mac
    assert protocol.verify_request(sm4, KEY, KeyAlgorithm.SM4, MDN)


@pytest.mark.parametrize(
    "body",
    [
        "",
        "KS1",
        "ks1 k-1 C=1 M=0011223344556677",
        "KS2 k-1 C=1 M=0011223344556677",
        "KS1 k-1 C=01 M=0011223344556677",
        "KS1 k-1 C=0 M=0011223344556677",
        "KS1 k-1 C=1 M=0011223344556677aa",
        "KS1 k-1 C=1 M=00112233445566zz",
        "KS1 k-1 C=1 M=0011223344556677 extra",
        "KS1 k-1  C=1 M=0011223344556677",
        "KS1 k-1 A= C=1 M=0011223344556677",
        "KS1 k-1 C=4294967296 M=0011223344556677",
        "KS1 k 1 C=1 M=0011223344556677",
        "KS1 " + "k" * 33 + " C=1 M=0011223344556677",
        "x" * 161,
    ],
)
def test_the_parser_is_strict(body: str) -> None:
    with pytest.raises(KeysyncMalformedMessage) as raised:
        protocol.SyncRequest.parse(body)
    assert isinstance(raised.value, MalformedMessage)
    assert raised.value.code == "keysync-malformed-request"


def test_mdns_libphonenumber_and_m2m_ranges() -> None:
    ranges = parse_ranges("+86:13")
    assert normalise_mdn("+86 138 0013 8000", ranges) == "+8613800138000"
    assert normalise_mdn("0086-138-0013-8000", ranges) == "+8613800138000"
    assert normalise_mdn("+861440000000001", ranges) == "+861440000000001"  # 13-digit IoT
    with pytest.raises(KeysyncInvalidMdn):
        normalise_mdn("+861440000000001", ())  # libphonenumber alone refuses it
    for bad in ("13800138000", "+86 abc", "+0123456789", "+12", "+861234"):
        with pytest.raises(KeysyncInvalidMdn):
            normalise_mdn(bad, ranges)
    with pytest.raises(ValueError):
        parse_ranges("86:13")
