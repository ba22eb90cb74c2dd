"""The parts the international suites share: SHA-256, HMAC-SHA256, AES-CMAC, HKDF-SHA256,
and HPKE base-mode key transport."""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from trustfleet.crypto import _common
from trustfleet.crypto.base import Suite
from trustfleet.errors import DecryptionFailed

_SHA256 = hashes.SHA256()


class SHA256Suite(Suite):
    """Hash, MAC, CMAC and KDF of the international suites."""

    digest_size = 32

    def mac(self, key: bytes, data: bytes) -> bytes:
        return _common.hmac_digest(_SHA256, key, data)

    def cmac(self, key: bytes, data: bytes) -> bytes:
        return _common.aes_cmac(key, data)

    def hash(self, data: bytes) -> bytes:
        return _common.digest(_SHA256, data)

    def kdf(self, secret: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
        return _common.hkdf(_SHA256, secret, salt=salt, info=info, length=length)


def hpke_open(
    suite: hpke.Suite,
    key: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey,
    ciphertext: bytes,
    info: bytes,
) -> bytes:
    """HPKE base-mode single-shot open of ``enc || ciphertext``."""
    try:
        return suite.decrypt(ciphertext, key, info=info)
    except (InvalidTag, ValueError):
        raise DecryptionFailed("HPKE ciphertext or its info does not authenticate") from None
