"""The proof encodings docs/tmk-protocol.md settles, as the key server enforces them: DER
ECDSA and SM2 signatures (raw r||s refused), RSA-PSS with MGF1-SHA256 and a 32-byte salt
(OpenSSL's maximal salt refused), SM2 with the user ID 1234567812345678 (OpenSSL 3's
empty ID refused). Each refusal is shown beside the accepted form, so the test fails if
the server accepted both or neither."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from trustfleet.crypto import public_key_to_pem
from trustfleet.crypto.base import PrivateKey
from trustfleet.crypto.sm2 import SM2PrivateKey
from trustfleet.tmk import errors
from trustfleet.tmk.protocol import DownloadRequest, TerminalProof, terminal_auth_tbs

from .conftest import Tmk

Signer = Callable[[PrivateKey, bytes], bytes]


def _ecdsa_der(key: PrivateKey, data: bytes) -> bytes:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def _ecdsa_raw(key: PrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(_ecdsa_der(key, data))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _pss(salt_length: int) -> Signer:
    def sign(key: PrivateKey, data: bytes) -> bytes:
        assert isinstance(key, rsa.RSAPrivateKey)
        mgf = padding.MGF1(hashes.SHA256())
        return key.sign(data, padding.PSS(mgf=mgf, salt_length=salt_length), hashes.SHA256())

    return sign


def _sm2(uid: bytes) -> Signer:
    def sign(key: PrivateKey, data: bytes) -> bytes:
        assert isinstance(key, SM2PrivateKey)
        return key.with_uid(uid).sign(data)

    return sign


def _sm2_raw(key: PrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(_sm2(b"1234567812345678")(key, data))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _prove(tmk: Tmk, sn: str, suite: str, key: PrivateKey, sign: Signer) -> None:
    request = DownloadRequest(sn=sn, rnd1=secrets.token_bytes(32), suite=suite)
    challenge = tmk.downloads.start(request.to_json(), actor="gw")
    tbs2 = terminal_auth_tbs(
        sn=sn, suite=suite, session_id=challenge.session_id, rnd1=request.rnd1, rnd2=challenge.rnd2
    )
    proof = TerminalProof(
        session_id=challenge.session_id, signature=sign(key, tbs2), ticket=challenge.ticket
    )
    tmk.downloads.accept_proof(challenge.session_id, proof.to_json(), actor="gw")


CASES = [
    ("p256", lambda: ec.generate_private_key(ec.SECP256R1()), _ecdsa_der, _ecdsa_raw),
    (
        "rsa",
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        _pss(32),
        _pss(padding.PSS.MAX_LENGTH),
    ),
    ("gm", SM2PrivateKey.generate, _sm2(b"1234567812345678"), _sm2(b"")),
    ("gm", SM2PrivateKey.generate, _sm2(b"1234567812345678"), _sm2_raw),
]


@pytest.mark.parametrize(
    ("suite", "make_key", "documented", "refused"),
    CASES,
    ids=["p256-raw-rs", "rsa-max-salt", "sm2-empty-id", "sm2-raw-rs"],
)
def test_the_server_takes_the_documented_encoding_and_refuses_the_common_other(
    tmk: Tmk,
    suite: str,
    make_key: Callable[[], PrivateKey],
    documented: Signer,
    refused: Signer,
) -> None:
    key = make_key()
    for index, (sign, accepted) in enumerate(((refused, False), (documented, True))):
        sn = f"POS-ENC-{index}"
        tmk.register(public_key_to_pem(key.public_key()).decode(), sn)
        if accepted:
            _prove(tmk, sn, suite, key, sign)
        else:
            with pytest.raises(errors.TmkBadTerminalProof):
                _prove(tmk, sn, suite, key, sign)
