"""The "gm" suite (Chinese commercial cryptography): SM2 signatures and key transport,
SM4-GCM, HMAC-SM3, SM4-CMAC, SM3, HKDF-SM3; plus SM4-CBC helpers for legacy formats.

Key transport format (``kem_wrap``), all lengths fixed except the last field::

    SM2-encrypt(recipient, K)   113 bytes: C1 (65) || C3 (32) || C2 (16), GB/T 32918.4
    SM4-GCM(K, nonce=0^12, aad=info, plaintext) || tag (16)

K is a fresh random 16-byte SM4 key per call, so the all-zero nonce is never reused
under one key. ``info`` is authenticated as associated data: unwrapping with a different
``info`` fails.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trustfleet.crypto import _common
from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey, Suite
from trustfleet.crypto.sm2 import POINT_SIZE, SM3_SIZE, RandomBits, SM2PrivateKey, SM2PublicKey
from trustfleet.errors import DecryptionFailed, InvalidInput, InvalidKey

SM4_KEY_SIZE = 16
SM4_BLOCK_SIZE = 16
_KEM_NONCE = bytes(_common.GCM_NONCE_SIZE)
_WRAPPED_KEY_SIZE = POINT_SIZE + SM3_SIZE + SM4_KEY_SIZE
_SM3 = hashes.SM3()


def _private(key: PrivateKey) -> SM2PrivateKey:
    if isinstance(key, SM2PrivateKey):
        return key
    raise InvalidKey(f"the gm suite needs an SM2 private key, not {type(key).__name__}")


def _public(key: PublicKey) -> SM2PublicKey:
    if isinstance(key, SM2PublicKey):
        return key
    raise InvalidKey(f"the gm suite needs an SM2 public key, not {type(key).__name__}")


def _check_cbc_inputs(key: bytes, iv: bytes) -> None:
    if len(key) != SM4_KEY_SIZE:
        raise InvalidKey(f"SM4 key must be {SM4_KEY_SIZE} bytes, got {len(key)}")
    if len(iv) != SM4_BLOCK_SIZE:
        raise InvalidInput(f"SM4-CBC IV must be {SM4_BLOCK_SIZE} bytes, got {len(iv)}")


def sm4_cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """SM4-CBC with PKCS#7 padding. Unauthenticated: only for formats that require it."""
    _check_cbc_inputs(key, iv)
    padder = padding.PKCS7(SM4_BLOCK_SIZE * 8).padder()
    padded = padder.update(data) + padder.finalize()
    encryptor = Cipher(algorithms.SM4(key), modes.CBC(iv)).encryptor()
    return encryptor.update(padded) + encryptor.finalize()


def sm4_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """Inverse of :func:`sm4_cbc_encrypt`; raise ``DecryptionFailed`` on bad padding."""
    _check_cbc_inputs(key, iv)
    if not data or len(data) % SM4_BLOCK_SIZE:
        raise DecryptionFailed("SM4-CBC ciphertext is not a whole number of blocks")
    decryptor = Cipher(algorithms.SM4(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    unpadder = padding.PKCS7(SM4_BLOCK_SIZE * 8).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise DecryptionFailed("SM4-CBC padding is invalid") from None


class GMSuite(Suite):
    name = "gm"
    signing_algorithm = KeyAlgorithm.SM2
    kem_algorithm = KeyAlgorithm.SM2
    aead_key_size = SM4_KEY_SIZE
    aead_nonce_size = _common.GCM_NONCE_SIZE
    digest_size = SM3_SIZE

    def generate_signing_key(self) -> SM2PrivateKey:
        return SM2PrivateKey.generate()

    def generate_kem_key(self) -> SM2PrivateKey:
        return SM2PrivateKey.generate()

    def sign(self, key: PrivateKey, data: bytes) -> bytes:
        return _private(key).sign(data)

    def verify(self, key: PublicKey, data: bytes, signature: bytes) -> None:
        _public(key).verify(signature, data)

    def kem_wrap(
        self,
        recipient: PublicKey,
        plaintext: bytes,
        info: bytes,
        *,
        _content_key: bytes | None = None,
        _rnd_fn: RandomBits | None = None,
    ) -> bytes:
        """``_content_key`` (the one-time SM4 key) and ``_rnd_fn`` (SM2's ephemeral k)
        fix the two random values; known-answer tests and published test vectors only. A
        content key must never be used twice: the nonce is fixed."""
        public = _public(recipient)
        content_key = os.urandom(SM4_KEY_SIZE) if _content_key is None else _content_key
        if len(content_key) != SM4_KEY_SIZE:
            raise InvalidKey(f"the content key must be {SM4_KEY_SIZE} bytes")
        wrapped_key = public.encrypt(content_key, _rnd_fn=_rnd_fn)
        return wrapped_key + _common.sm4_gcm_seal(content_key, _KEM_NONCE, plaintext, info)

    def kem_unwrap(self, key: PrivateKey, ciphertext: bytes, info: bytes) -> bytes:
        private = _private(key)
        if len(ciphertext) < _WRAPPED_KEY_SIZE + _common.TAG_SIZE:
            raise DecryptionFailed("the gm KEM ciphertext is too short")
        content_key = private.decrypt(ciphertext[:_WRAPPED_KEY_SIZE])
        if len(content_key) != SM4_KEY_SIZE:  # C2 length fixes it; defensive
            raise DecryptionFailed("the gm KEM ciphertext does not decrypt")
        body = ciphertext[_WRAPPED_KEY_SIZE:]
        return _common.sm4_gcm_open(content_key, _KEM_NONCE, body, info)

    def aead_seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return _common.sm4_gcm_seal(key, nonce, plaintext, aad)

    def aead_open(self, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return _common.sm4_gcm_open(key, nonce, ciphertext, aad)

    def mac(self, key: bytes, data: bytes) -> bytes:
        return _common.hmac_digest(_SM3, key, data)

    def cmac(self, key: bytes, data: bytes) -> bytes:
        return _common.sm4_cmac(key, data)

    def hash(self, data: bytes) -> bytes:
        return _common.digest(_SM3, data)

    def kdf(self, secret: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
        return _common.hkdf(_SM3, secret, salt=salt, info=info, length=length)


GM = GMSuite()

__all__ = ["GM", "GMSuite", "sm4_cbc_decrypt", "sm4_cbc_encrypt"]
