"""The "rsa" suite: RSA-PSS-SHA256, RSA-OAEP-SHA256 key transport (``info`` is the OAEP
label), AES-128-GCM, HMAC-SHA256, AES-CMAC, SHA-256, HKDF-SHA256.

New keys are RSA-3072; RSA-2048 keys are still accepted (legacy devices), smaller ones
are refused.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature as _PycaInvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from trustfleet.crypto import _common
from trustfleet.crypto._sha256 import SHA256Suite
from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey
from trustfleet.errors import DecryptionFailed, InvalidInput, InvalidKey, InvalidSignature

MIN_KEY_SIZE = 2048
GENERATED_KEY_SIZE = 3072

_SHA256 = hashes.SHA256()
_MGF1_SHA256 = padding.MGF1(_SHA256)
_PSS = padding.PSS(mgf=_MGF1_SHA256, salt_length=padding.PSS.DIGEST_LENGTH)
_OAEP_NO_LABEL = padding.OAEP(mgf=_MGF1_SHA256, algorithm=_SHA256, label=None)


def _oaep(label: bytes) -> padding.OAEP:
    if not label:
        return _OAEP_NO_LABEL
    return padding.OAEP(mgf=_MGF1_SHA256, algorithm=_SHA256, label=label)


def _check_size(key_size: int) -> None:
    if key_size < MIN_KEY_SIZE:
        raise InvalidKey(f"RSA keys must have at least {MIN_KEY_SIZE} bits, got {key_size}")


def _private(key: PrivateKey) -> rsa.RSAPrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise InvalidKey(f"the rsa suite needs an RSA private key, not {type(key).__name__}")
    _check_size(key.key_size)
    return key


def _public(key: PublicKey) -> rsa.RSAPublicKey:
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidKey(f"the rsa suite needs an RSA public key, not {type(key).__name__}")
    _check_size(key.key_size)
    return key


def generate_rsa_key(key_size: int = GENERATED_KEY_SIZE) -> rsa.RSAPrivateKey:
    _check_size(key_size)
    return rsa.generate_private_key(public_exponent=65537, key_size=key_size)


class RSASuite(SHA256Suite):
    name = "rsa"
    signing_algorithm = KeyAlgorithm.RSA_3072
    kem_algorithm = KeyAlgorithm.RSA_3072
    aead_key_size = 16
    aead_nonce_size = 12

    def generate_signing_key(self) -> rsa.RSAPrivateKey:
        return generate_rsa_key()

    def generate_kem_key(self) -> rsa.RSAPrivateKey:
        return generate_rsa_key()

    def sign(self, key: PrivateKey, data: bytes) -> bytes:
        return _private(key).sign(data, _PSS, _SHA256)

    def verify(self, key: PublicKey, data: bytes, signature: bytes) -> None:
        try:
            _public(key).verify(signature, data, _PSS, _SHA256)
        except _PycaInvalidSignature:
            raise InvalidSignature("RSA-PSS signature does not verify") from None

    def kem_wrap(self, recipient: PublicKey, plaintext: bytes, info: bytes) -> bytes:
        public = _public(recipient)
        try:
            return public.encrypt(plaintext, _oaep(info))
        except ValueError:
            raise InvalidInput(
                f"{len(plaintext)} bytes is too long for RSA-OAEP with a {public.key_size}-bit key"
            ) from None

    def kem_unwrap(self, key: PrivateKey, ciphertext: bytes, info: bytes) -> bytes:
        private = _private(key)
        try:
            return private.decrypt(ciphertext, _oaep(info))
        except ValueError:
            raise DecryptionFailed("RSA-OAEP ciphertext or its label does not match") from None

    def aead_seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return _common.aes_gcm_seal(key, nonce, plaintext, aad)

    def aead_open(self, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return _common.aes_gcm_open(key, nonce, ciphertext, aad)


RSA = RSASuite()
