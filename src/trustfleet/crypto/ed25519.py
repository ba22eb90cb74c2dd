"""The "ed25519" suite: Ed25519, HPKE DHKEM(X25519)/HKDF-SHA256/ChaCha20-Poly1305,
ChaCha20-Poly1305, HMAC-SHA256, AES-CMAC, SHA-256, HKDF-SHA256, X25519."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature as _PycaInvalidSignature
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from trustfleet.crypto import _common
from trustfleet.crypto._sha256 import SHA256Suite, hpke_open
from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey
from trustfleet.errors import InvalidKey, InvalidSignature

_HPKE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


def _wrong(key: object, wanted: str) -> InvalidKey:
    return InvalidKey(f"the ed25519 suite needs an {wanted} key here, not {type(key).__name__}")


class Ed25519Suite(SHA256Suite):
    name = "ed25519"
    signing_algorithm = KeyAlgorithm.ED25519
    kem_algorithm = KeyAlgorithm.X25519
    aead_key_size = 32
    aead_nonce_size = 12

    def generate_signing_key(self) -> ed25519.Ed25519PrivateKey:
        return ed25519.Ed25519PrivateKey.generate()

    def generate_kem_key(self) -> x25519.X25519PrivateKey:
        return x25519.X25519PrivateKey.generate()

    def sign(self, key: PrivateKey, data: bytes) -> bytes:
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise _wrong(key, "Ed25519 private")
        return key.sign(data)

    def verify(self, key: PublicKey, data: bytes, signature: bytes) -> None:
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise _wrong(key, "Ed25519 public")
        try:
            key.verify(signature, data)
        except _PycaInvalidSignature:
            raise InvalidSignature("Ed25519 signature does not verify") from None

    def kem_wrap(self, recipient: PublicKey, plaintext: bytes, info: bytes) -> bytes:
        if not isinstance(recipient, x25519.X25519PublicKey):
            raise _wrong(recipient, "X25519 public")
        return _HPKE.encrypt(plaintext, recipient, info=info)

    def kem_unwrap(self, key: PrivateKey, ciphertext: bytes, info: bytes) -> bytes:
        if not isinstance(key, x25519.X25519PrivateKey):
            raise _wrong(key, "X25519 private")
        return hpke_open(_HPKE, key, ciphertext, info)

    def key_agreement(self, private: PrivateKey, peer_public: PublicKey) -> bytes:
        if not isinstance(private, x25519.X25519PrivateKey):
            raise _wrong(private, "X25519 private")
        if not isinstance(peer_public, x25519.X25519PublicKey):
            raise _wrong(peer_public, "X25519 public")
        try:
            return private.exchange(peer_public)
        except ValueError:  # all-zero output: the peer sent a low-order point
            raise InvalidKey("the peer's X25519 public key is a low-order point") from None

    def aead_seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return _common.chacha_seal(key, nonce, plaintext, aad)

    def aead_open(self, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return _common.chacha_open(key, nonce, ciphertext, aad)


ED25519 = Ed25519Suite()
