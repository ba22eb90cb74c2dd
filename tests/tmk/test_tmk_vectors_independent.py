"""A terminal written from docs/tmk-protocol.md alone checks the published P-256 and RSA
vectors of both protocol versions: every message and every value it signs, verifies, opens
or MACs, and in version 2 the key server's signature over the delivery.

This module imports nothing from trustfleet, only the standard library and
pyca/cryptography, as a vendor's test bench would: a mistake shared by the code and its
vectors (or a gap in the document) shows up here.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac, hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509 import DNSName
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

DOCS = Path(__file__).resolve().parents[2] / "docs" / "tmk-vectors"
FILES = sorted(p for p in DOCS.glob("*.json") if p.stem.startswith(("p256-", "rsa-")))

# -- the document's constants -------------------------------------------------------------
VERSIONS = (1, 2)
LABELS = {
    version: {
        "server": f"TF-TMK-v{version} server-auth".encode(),
        "terminal": f"TF-TMK-v{version} terminal-auth".encode(),
        "transport": f"TF-TMK-v{version} tmk-transport".encode(),
        "confirm": f"TF-TMK-v{version} confirm".encode(),
        "delivery": f"TF-TMK-v{version} key-delivery".encode(),  # version 2 on
    }
    for version in VERSIONS
}
WORK_CERTIFICATE_NAME = "tmk-key-server.trustfleet"
TMK_LENGTHS = {"aes-128": 16, "aes-256": 32, "tdes": 16}
KCV_LENGTHS = {"aes-128": 5, "aes-256": 5, "tdes": 3}
MAC_LENGTHS = {"aes-128": 16, "aes-256": 16, "tdes": 8}
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
HPKE = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
SESSION_ID = re.compile(r"[0-9a-f]{32}")


def enc(*fields: bytes) -> bytes:
    """Each field prefixed with its length, 4 bytes big-endian."""
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def b64(text: str) -> bytes:
    value = base64.b64decode(text, validate=True)
    assert base64.b64encode(value).decode() == text  # canonical: padded, standard alphabet
    return value


def message(text: str, message_type: str, version: int) -> dict[str, Any]:
    """A message as the document defines it: a JSON object, canonical, in the version the
    terminal asked for."""
    fields: dict[str, Any] = json.loads(text)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical == text
    assert fields.pop("type") == message_type
    v = fields.pop("v")
    assert type(v) is int and v == version
    return fields


def delivery_tbs(
    version: int, session_id: str, sn: str, suite: str, rnd1: bytes, rnd2: bytes,
    algorithm: str, wrapped: bytes, kcv: bytes,
) -> bytes:  # fmt: skip
    """TBS3: what the work key signs over a version 2 delivery."""
    return enc(
        LABELS[version]["delivery"], session_id.encode(), sn.encode(), suite.encode(), rnd1,
        rnd2, algorithm.encode(), wrapped, kcv,
    )  # fmt: skip


def cmac_of(algorithm: str, key: bytes, data: bytes) -> bytes:
    cipher = TripleDES(key + key[:8]) if algorithm == "tdes" else algorithms.AES(key)
    mac = cmac.CMAC(cipher)
    mac.update(data)
    return mac.finalize()


def kcv_of(algorithm: str, key: bytes) -> bytes:
    if algorithm == "tdes":  # TDES-ECB of one block of zeros, first 3 bytes
        encryptor = Cipher(TripleDES(key + key[:8]), modes.ECB()).encryptor()  # noqa: S305
        return (encryptor.update(bytes(8)) + encryptor.finalize())[:3]
    return cmac_of(algorithm, key, bytes(16))[:5]  # AES-CMAC of 16 zero bytes, first 5 bytes


@pytest.fixture(params=FILES, ids=lambda p: p.stem)
def vector(request: pytest.FixtureRequest) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(request.param.read_text())
    return loaded


def test_the_p256_and_rsa_vectors_are_all_here() -> None:
    assert sorted(p.stem for p in FILES) == sorted(
        f"{key}-{tmk}{suffix}"
        for key in ("p256", "rsa-2048", "rsa-3072")
        for tmk in ("aes-128", "aes-256", "tdes")
        for suffix in ("", "-v2")
    )


def test_a_terminal_from_the_document_checks_every_message(vector: dict[str, Any]) -> None:
    terminal, messages, inter = vector["terminal"], vector["messages"], vector["intermediates"]
    h = bytes.fromhex
    private_key = serialization.load_der_private_key(h(terminal["private_key_pkcs8"]), None)
    public_der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_der.hex() == terminal["public_key_spki"]
    suite = vector["suite"]
    if suite == "p256":
        assert isinstance(private_key, ec.EllipticCurvePrivateKey)
        assert isinstance(private_key.curve, ec.SECP256R1)
    else:
        assert suite == "rsa" and isinstance(private_key, rsa.RSAPrivateKey)
        assert private_key.key_size == int(vector["terminal_key_algorithm"].split("-")[1])
    sn, rnd1 = terminal["sn"], h(terminal["rnd1"])
    clock = datetime.fromisoformat(terminal["clock"])
    tmk_algorithm = vector["tmk_algorithm"]
    version = vector["protocol_version"]
    assert version in VERSIONS
    labels = LABELS[version]

    # 1. the download request, in my version
    request = message(messages["download_request"], "tmk-download-request", version)
    assert request == {"sn": sn, "rnd1": base64.b64encode(rnd1).decode(), "suite": suite}
    assert len(rnd1) == 32

    # 2-3. the challenge: my rnd1, in time, KSWCRT under my KSRCRT, the signature over TBS1
    challenge = message(messages["server_challenge"], "tmk-server-challenge", version)
    assert set(challenge) == {
        "session_id", "rnd1", "rnd2", "kswcrt", "chain", "signature", "expires_at", "ticket"
    }  # fmt: skip
    assert b64(challenge["rnd1"]) == rnd1
    session_id = challenge["session_id"]
    assert SESSION_ID.fullmatch(session_id)
    rnd2 = b64(challenge["rnd2"])
    expires_at = challenge["expires_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", expires_at)
    assert clock < datetime.fromisoformat(expires_at)
    root = x509.load_der_x509_certificate(h(terminal["ksrcrt"]))
    kswcrt_der = b64(challenge["kswcrt"])
    assert kswcrt_der.hex() == inter["kswcrt"] and challenge["chain"] == []
    kswcrt = x509.load_der_x509_certificate(kswcrt_der)
    # what the document asks of KSWCRT: issued by my root, in time, may sign, not a CA
    kswcrt.verify_directly_issued_by(root)
    assert kswcrt.not_valid_before_utc <= clock < kswcrt.not_valid_after_utc
    assert root.not_valid_before_utc <= clock < root.not_valid_after_utc
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key_usage = kswcrt.extensions.get_extension_for_class(x509.KeyUsage).value
    assert key_usage.digital_signature and not key_usage.key_cert_sign
    assert not kswcrt.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # and the profile the document lists (a terminal must not require these)
    eku = kswcrt.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(clock)
        .build_server_verifier(DNSName(WORK_CERTIFICATE_NAME))
    )
    verifier.verify(kswcrt, [])
    tbs1 = enc(
        labels["server"], rnd1, rnd2, sn.encode(), session_id.encode(), suite.encode(),
        expires_at.encode(),
    )  # fmt: skip
    assert tbs1.hex() == inter["tbs1"]
    server_signature = b64(challenge["signature"])
    work_key = kswcrt.public_key()
    assert isinstance(work_key, ec.EllipticCurvePublicKey)  # the vectors' work key is P-256
    work_key.verify(server_signature, tbs1, ec.ECDSA(hashes.SHA256()))  # DER (r, s)
    assert server_signature.hex() == inter["server_signature"]

    # 4. my proof: the signature over TBS2, the ticket sent back unchanged
    proof = message(messages["terminal_proof"], "tmk-terminal-proof", version)
    assert set(proof) == {"session_id", "signature", "ticket"}
    assert proof["session_id"] == session_id and proof["ticket"] == challenge["ticket"]
    tbs2 = enc(labels["terminal"], rnd2, rnd1, sn.encode(), session_id.encode(), suite.encode())
    assert tbs2.hex() == inter["tbs2"]
    terminal_signature = b64(proof["signature"])
    public_key = private_key.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(terminal_signature, tbs2, ec.ECDSA(hashes.SHA256()))
        # and a signature of my own, made the way the document says, is as good
        mine = private_key.sign(tbs2, ec.ECDSA(hashes.SHA256()))
        public_key.verify(mine, tbs2, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(terminal_signature, tbs2, PSS, hashes.SHA256())
        assert len(terminal_signature) == public_key.key_size // 8

    # 6-7. the delivery: (version 2) the work key's signature over TBS3, checked before
    # anything is opened; then open it bound to the transcript, check length and KCV
    delivery = message(messages["key_delivery"], "tmk-key-delivery", version)
    signed = {"signature"} if version >= 2 else set()
    assert set(delivery) == {"session_id", "algorithm", "wrapped_tmk", "kcv"} | signed
    assert delivery["session_id"] == session_id and delivery["algorithm"] == tmk_algorithm
    if version >= 2:
        tbs3 = delivery_tbs(
            version, session_id, sn, suite, rnd1, rnd2, tmk_algorithm,
            b64(delivery["wrapped_tmk"]), b64(delivery["kcv"]),
        )  # fmt: skip
        assert tbs3.hex() == inter["tbs3"]
        delivery_signature = b64(delivery["signature"])
        work_key.verify(delivery_signature, tbs3, ec.ECDSA(hashes.SHA256()))  # KSWCRT's key
        assert delivery_signature.hex() == inter["delivery_signature"]
    else:
        assert "tbs3" not in inter and "delivery_signature" not in inter
    info_input = enc(
        labels["transport"], sn.encode(), suite.encode(), session_id.encode(), rnd1, rnd2,
        tmk_algorithm.encode(),
    )  # fmt: skip
    info = sha256(info_input)
    assert (info_input.hex(), info.hex()) == (
        inter["transport_info_input"],
        inter["transport_info"],
    )
    wrapped = b64(delivery["wrapped_tmk"])
    assert wrapped.hex() == inter["wrapped_tmk"]
    if suite == "p256":  # HPKE base mode, enc || ciphertext, info as above, empty AAD
        assert wrapped[0] == 0x04 and len(wrapped) == 65 + TMK_LENGTHS[tmk_algorithm] + 16
        assert (wrapped[:65].hex(), wrapped[65:].hex()) == (
            inter["hpke_enc"],
            inter["hpke_ciphertext"],
        )
        assert isinstance(private_key, ec.EllipticCurvePrivateKey)
        tmk = HPKE.decrypt(wrapped, private_key, info=info)
    else:  # RSA-OAEP, SHA-256 and MGF1-SHA256, label = info; the bare ciphertext
        assert isinstance(private_key, rsa.RSAPrivateKey)
        assert len(wrapped) == private_key.key_size // 8
        oaep = padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=info
        )
        tmk = private_key.decrypt(wrapped, oaep)
    assert len(tmk) == TMK_LENGTHS[tmk_algorithm]
    assert tmk.hex() == inter["tmk"]
    kcv = b64(delivery["kcv"])
    assert len(kcv) == KCV_LENGTHS[tmk_algorithm]
    assert kcv == kcv_of(tmk_algorithm, tmk) and kcv.hex() == inter["kcv"]

    # 7. my confirmation: CMAC under the new TMK over the confirmation data
    confirmation = message(messages["confirmation"], "tmk-confirmation", version)
    assert set(confirmation) == {"session_id", "mac"}
    assert confirmation["session_id"] == session_id
    conf = enc(labels["confirm"], session_id.encode(), kcv)
    assert conf.hex() == inter["confirmation_data"]
    mac = cmac_of(tmk_algorithm, tmk, conf)
    assert len(mac) == MAC_LENGTHS[tmk_algorithm]
    assert b64(confirmation["mac"]) == mac and mac.hex() == inter["confirmation_mac"]


def test_a_proof_with_a_maximal_pss_salt_is_not_what_the_document_asks() -> None:
    """The document fixes the PSS salt at 32 bytes; OpenSSL's default when signing (the
    maximal salt) makes a signature that a 32-byte-salt verifier refuses."""
    vector = json.loads((DOCS / "rsa-2048-aes-128.json").read_text())
    key = serialization.load_der_private_key(
        bytes.fromhex(vector["terminal"]["private_key_pkcs8"]), None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    tbs2 = bytes.fromhex(vector["intermediates"]["tbs2"])
    maximal = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    signature = key.sign(tbs2, maximal, hashes.SHA256())
    key.public_key().verify(signature, tbs2, maximal, hashes.SHA256())
    with pytest.raises(InvalidSignature):
        key.public_key().verify(signature, tbs2, PSS, hashes.SHA256())


@pytest.mark.parametrize("name", ["p256-aes-128", "p256-aes-128-v2"])
def test_a_delivery_forged_from_public_values_is_refused_only_in_version_2(name: str) -> None:
    """What version 2 is for: anyone on the path can wrap a TMK of their own to the
    terminal's public key, bound to the session's public values, with its true KCV. A
    version 1 terminal has no way to tell it from the key server's; a version 2 terminal
    finds no work-key signature over it."""
    vector = json.loads((DOCS / f"{name}.json").read_text())
    terminal, messages = vector["terminal"], vector["messages"]
    h = bytes.fromhex
    private_key = serialization.load_der_private_key(h(terminal["private_key_pkcs8"]), None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    version, sn, suite = vector["protocol_version"], terminal["sn"], vector["suite"]
    challenge = json.loads(messages["server_challenge"])
    genuine = json.loads(messages["key_delivery"])
    session_id, rnd1, rnd2 = challenge["session_id"], h(terminal["rnd1"]), b64(challenge["rnd2"])
    algorithm = genuine["algorithm"]

    # the attacker: public values only
    chosen_tmk = bytes(range(16))
    info_input = enc(
        LABELS[version]["transport"], sn.encode(), suite.encode(), session_id.encode(),
        rnd1, rnd2, algorithm.encode(),
    )  # fmt: skip
    info = sha256(info_input)
    wrapped = HPKE.encrypt(chosen_tmk, private_key.public_key(), info=info)
    kcv = kcv_of(algorithm, chosen_tmk)

    # the terminal opens it and the KCV agrees: in version 1 that is all there is to check
    assert HPKE.decrypt(wrapped, private_key, info=info) == chosen_tmk
    assert kcv_of(algorithm, HPKE.decrypt(wrapped, private_key, info=info)) == kcv
    if version == 1:
        return
    # version 2: the genuine delivery's signature (the best the attacker has) does not
    # cover the forged TMK under KSWCRT's key
    kswcrt = x509.load_der_x509_certificate(b64(challenge["kswcrt"]))
    work_key = kswcrt.public_key()
    assert isinstance(work_key, ec.EllipticCurvePublicKey)
    tbs3 = delivery_tbs(version, session_id, sn, suite, rnd1, rnd2, algorithm, wrapped, kcv)
    with pytest.raises(InvalidSignature):
        work_key.verify(b64(genuine["signature"]), tbs3, ec.ECDSA(hashes.SHA256()))
