"""The "p256" suite: ECDSA P-256/SHA-256, HPKE DHKEM(P-256)/HKDF-SHA256/AES-128-GCM,
AES-128-GCM, HMAC-SHA256, AES-CMAC, SHA-256, HKDF-SHA256, ECDH P-256."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature as _PycaInvalidSignature
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec

from trustfleet.crypto import _common
from trustfleet.crypto._sha256 import SHA256Suite, hpke_open
from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey
from trustfleet.errors import InvalidKey, InvalidSignature

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_ECDH = ec.ECDH()
_HPKE = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)


def _private(key: PrivateKey) -> ec.EllipticCurvePrivateKey:
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise InvalidKey(f"the p256 suite needs a P-256 private key, not {type(key).__name__}")


def _public(key: PublicKey) -> ec.EllipticCurvePublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise InvalidKey(f"the p256 suite needs a P-256 public key, not {type(key).__name__}")


class P256Suite(SHA256Suite):
    name = "p256"
    signing_algorithm = KeyAlgorithm.EC_P256
    kem_algorithm = KeyAlgorithm.EC_P256
    aead_key_size = 16
    aead_nonce_size = 12

    def generate_signing_key(self) -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def generate_kem_key(self) -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def sign(self, key: PrivateKey, data: bytes) -> bytes:
        return _private(key).sign(data, _ECDSA_SHA256)

    def verify(self, key: PublicKey, data: bytes, signature: bytes) -> None:
        try:
            _public(key).verify(signature, data, _ECDSA_SHA256)
        except _PycaInvalidSignature:
            raise InvalidSignature("ECDSA P-256 signature does not verify") from None

    def kem_wrap(self, recipient: PublicKey, plaintext: bytes, info: bytes) -> bytes:
        return _HPKE.encrypt(plaintext, _public(recipient), info=info)

    def kem_unwrap(self, key: PrivateKey, ciphertext: bytes, info: bytes) -> bytes:
        return hpke_open(_HPKE, _private(key), ciphertext, info)

    def key_agreement(self, private: PrivateKey, peer_public: PublicKey) -> bytes:
        return _private(private).exchange(_ECDH, _public(peer_public))

    def aead_seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return _common.aes_gcm_seal(key, nonce, plaintext, aad)

    def aead_open(self, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return _common.aes_gcm_open(key, nonce, ciphertext, aad)


P256 = P256Suite()
