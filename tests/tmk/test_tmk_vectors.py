"""The published test vectors (docs/tmk-vectors/*.json, version 1 and version 2) are what the
code does: each is made again by the protocol's two roles with its fixed inputs and compared
byte for byte, its randomised fields are replayed through the code, and the reference
terminal's secure control module accepts its messages. A change of the code path fails
here."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hpke

from trustfleet.crypto import algorithm_of, suite_for_algorithm
from trustfleet.crypto import p256 as p256_suite
from trustfleet.tmk import errors, protocol, vectors
from trustfleet.tmk.protocol import (
    Confirmation,
    DownloadRequest,
    KeyDelivery,
    ServerChallenge,
    ServerTrust,
    TerminalSession,
    terminal_auth_tbs,
)
from trustfleet.tmk.scm import DeviceKey, SecureControlModule

DOCS = Path(__file__).resolve().parents[2] / "docs" / "tmk-vectors"


def _load(name: str) -> dict[str, Any]:
    return vectors.load(vectors.path_of(DOCS, name))


def test_every_suite_and_tmk_algorithm_has_a_vector_file_per_version() -> None:
    assert sorted(p.stem for p in DOCS.glob("*.json")) == sorted(vectors.NAMES)
    # p256, rsa-2048, rsa-3072, sm2 x aes-128, aes-256, tdes x version 1, version 2
    assert len(vectors.NAMES) == 24
    for name in vectors.NAMES:
        version = 2 if name.endswith("-v2") else 1
        assert vectors.split_name(name)[2] == version == _load(name)["protocol_version"]
        messages = _load(name)["messages"].values()
        assert {json.loads(m)["v"] for m in messages} == {version}


@pytest.mark.parametrize("name", vectors.NAMES)
def test_the_published_vector_is_what_the_code_makes(name: str) -> None:
    recorded = _load(name)
    vectors.check(recorded)
    fresh = vectors.generate(name, vectors.terminal_key_of(recorded))
    assert vectors.differences(recorded, fresh) == []
    vectors.check(fresh)
    assert vectors.dumps(recorded) == vectors.path_of(DOCS, name).read_text()  # as written


def test_only_hpke_oaep_and_pss_are_left_random() -> None:
    for name in vectors.NAMES:
        random = set(_load(name)["randomised"])
        # version 2 signs the delivery: its TBS3 covers the random wrapped_tmk
        signed = {"intermediates.tbs3", "intermediates.delivery_signature"}
        v2 = signed if name.endswith("-v2") else set()
        if name.startswith("sm2"):
            assert random == set()
        elif name.startswith("p256"):
            assert (
                random
                == {
                    "messages.key_delivery",
                    "intermediates.wrapped_tmk",
                    "intermediates.hpke_enc",
                    "intermediates.hpke_ciphertext",
                }
                | v2
            )
        else:
            assert (
                random
                == {
                    "messages.terminal_proof",
                    "intermediates.terminal_signature",
                    "messages.key_delivery",
                    "intermediates.wrapped_tmk",
                }
                | v2
            )


def test_writing_the_vectors_leaves_the_files_that_match_alone(tmp_path: Path) -> None:
    """``--write`` rewrites only what is missing or out of date, so the published bytes of
    a vector (random fields included) stay as long as the code still makes it."""
    for path in DOCS.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    assert vectors.write(tmp_path) == []
    (tmp_path / "sm2-tdes-v2.json").unlink()
    assert vectors.write(tmp_path) == [tmp_path / "sm2-tdes-v2.json"]
    for path in DOCS.glob("*.json"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes()  # SM2: all fixed


# =====================================================================================
# The checks fail when the vectors or the code change
# =====================================================================================


def test_an_altered_deterministic_field_is_found() -> None:
    recorded = _load("p256-aes-128")
    fresh = vectors.generate("p256-aes-128", vectors.terminal_key_of(recorded))
    tbs2 = recorded["intermediates"]["tbs2"]
    recorded["intermediates"]["tbs2"] = tbs2[:-2] + f"{int(tbs2[-2:], 16) ^ 1:02x}"
    assert vectors.differences(recorded, fresh) == ["intermediates.tbs2: differs"]


@pytest.mark.parametrize(
    ("name", "refusal"),
    [
        ("p256-aes-256", errors.TmkUnwrapFailed),
        ("rsa-2048-tdes", errors.TmkUnwrapFailed),
        # version 2: the work key's signature no longer covers it, however well the rest of
        # the file is made to agree
        ("p256-aes-256-v2", errors.TmkBadDeliverySignature),
        ("rsa-3072-aes-128-v2", errors.TmkBadDeliverySignature),
    ],
)
def test_an_altered_randomised_field_fails_its_replay(
    name: str, refusal: type[errors.TmkError]
) -> None:
    recorded = _load(name)
    intermediates = recorded["intermediates"]
    wrapped = bytearray.fromhex(intermediates["wrapped_tmk"])
    wrapped[-1] ^= 1
    delivery = KeyDelivery.from_json(recorded["messages"]["key_delivery"])
    tampered = replace(delivery, wrapped_tmk=bytes(wrapped))
    recorded["messages"]["key_delivery"] = tampered.to_json().decode()
    intermediates["wrapped_tmk"] = bytes(wrapped).hex()
    if name.startswith("p256"):
        intermediates["hpke_ciphertext"] = bytes(wrapped[65:]).hex()
    if "tbs3" in intermediates:
        tbs3 = bytearray.fromhex(intermediates["tbs3"])
        at = tbs3.find(bytes(wrapped[:-1])) + len(wrapped) - 1
        tbs3[at] ^= 1
        intermediates["tbs3"] = tbs3.hex()
    with pytest.raises(refusal):
        vectors.check(recorded)


def test_a_changed_label_in_the_code_fails_the_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = _load("sm2-tdes")
    v1 = protocol._LABELS[1]
    monkeypatch.setitem(protocol._LABELS, 1, replace(v1, confirm=b"TF-TMK-v9 confirm"))
    fresh = vectors.generate("sm2-tdes", vectors.terminal_key_of(recorded))
    assert vectors.differences(recorded, fresh) == [
        "intermediates.confirmation_data: differs",
        "intermediates.confirmation_mac: differs",
        "messages.confirmation: differs",
    ]
    with pytest.raises(vectors.VectorMismatch, match="gives another confirmation"):
        vectors.check(recorded)


def test_a_changed_delivery_label_fails_the_v2_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = _load("sm2-aes-128-v2")
    v2 = protocol._LABELS[2]
    monkeypatch.setitem(protocol._LABELS, 2, replace(v2, key_delivery=b"TF-TMK-v2 delivery"))
    fresh = vectors.generate("sm2-aes-128-v2", vectors.terminal_key_of(recorded))
    assert vectors.differences(recorded, fresh) == [
        "intermediates.delivery_signature: differs",
        "intermediates.tbs3: differs",
        "messages.key_delivery: differs",
    ]
    with pytest.raises(vectors.VectorMismatch, match="tbs3"):
        vectors.check(recorded)


def test_a_version_1_vector_is_no_version_2_vector() -> None:
    """The same suite and TMK, the other version: the bytes of every signed, bound or
    MACed value differ (each label names its version)."""
    one, two = _load("sm2-aes-128")["intermediates"], _load("sm2-aes-128-v2")["intermediates"]
    for name in ("tbs1", "tbs2", "transport_info_input", "confirmation_data"):
        assert bytes.fromhex(one[name])[4:13] == b"TF-TMK-v1"
        assert bytes.fromhex(two[name])[4:13] == b"TF-TMK-v2"
    assert bytes.fromhex(two["tbs3"])[4:26] == b"TF-TMK-v2 key-delivery"
    assert "tbs3" not in one and "delivery_signature" not in one


def test_a_changed_random_code_path_fails_the_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HPKE ephemeral cannot be fixed, so a P-256 delivery is checked by opening it:
    another HPKE suite in the code (same lengths) no longer opens the published one."""
    recorded = _load("p256-aes-128")
    other = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
    monkeypatch.setattr(p256_suite, "_HPKE", other)
    fresh = vectors.generate("p256-aes-128", vectors.terminal_key_of(recorded))
    assert vectors.differences(recorded, fresh) == []  # same lengths: bytes alone cannot tell
    with pytest.raises(errors.TmkUnwrapFailed):
        vectors.check(recorded)


# =====================================================================================
# The reference terminal's secure control module, fed the published messages
# =====================================================================================


@pytest.mark.parametrize("name", vectors.NAMES)
def test_the_reference_terminal_accepts_the_published_messages(name: str, tmp_path: Path) -> None:
    recorded = _load(name)
    terminal, messages = recorded["terminal"], recorded["messages"]
    key = vectors.terminal_key_of(recorded)
    scm = SecureControlModule(
        path=tmp_path / "scm.json",
        device_key=DeviceKey.generate_file(tmp_path / "device.key"),
        kdf={"name": "key-file"},
        sn=terminal["sn"],
        model="vector",
        algorithm=algorithm_of(key),
        tkp=key,
        kem_algorithm=None,
        kem_key=None,
        tmk=None,
    )
    root = x509.load_der_x509_certificate(bytes.fromhex(terminal["ksrcrt"]))
    clock = datetime.fromisoformat(terminal["clock"])
    rnd1 = bytes.fromhex(terminal["rnd1"])
    version = recorded["protocol_version"]
    session = TerminalSession(
        scm, ServerTrust((root,)), clock=lambda: clock, random=lambda _: rnd1, version=version
    )
    assert session.start() == DownloadRequest.from_json(messages["download_request"])
    challenge = ServerChallenge.from_json(messages["server_challenge"])
    proof = session.receive_challenge(challenge)
    assert (proof.session_id, proof.ticket) == (challenge.session_id, challenge.ticket)
    tbs2 = terminal_auth_tbs(
        sn=terminal["sn"],
        suite=recorded["suite"],
        session_id=challenge.session_id,
        rnd1=rnd1,
        rnd2=challenge.rnd2,
        version=version,
    )
    assert tbs2.hex() == recorded["intermediates"]["tbs2"]
    suite_for_algorithm(algorithm_of(key)).verify(key.public_key(), tbs2, proof.signature)
    confirmation = session.receive_delivery(KeyDelivery.from_json(messages["key_delivery"]))
    assert confirmation.to_json() == messages["confirmation"].encode()
    assert confirmation == Confirmation.from_json(messages["confirmation"])
    assert scm.tmk_kcv.hex() == recorded["intermediates"]["kcv"]
    assert json.loads(scm._path.read_text())["format"] == "trustfleet-scm-v1"  # it was stored
