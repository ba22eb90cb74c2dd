"""Operations on secret keys held in memory by the soft store: thin calls into pyca.

AEAD output is ``nonce (12) || ciphertext || tag (16)``; ``info`` is the associated data.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac, hashes, hmac, keywrap
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import DecryptionFailed, InvalidInput, UnsupportedAlgorithm

NONCE_SIZE = 12
TAG_SIZE = 16


def aead_seal(algorithm: KeyAlgorithm, key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    if algorithm in (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256):
        return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)
    if algorithm is KeyAlgorithm.SM4:
        encryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(aad)
        body = encryptor.update(plaintext) + encryptor.finalize()
        return nonce + body + encryptor.tag
    raise UnsupportedAlgorithm(f"{algorithm.value} keys do not encrypt (no AEAD mode)")


def aead_open(algorithm: KeyAlgorithm, key: bytes, sealed: bytes, aad: bytes) -> bytes:
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionFailed("the ciphertext is shorter than its nonce and tag")
    nonce, body = sealed[:NONCE_SIZE], sealed[NONCE_SIZE:]
    try:
        if algorithm in (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256):
            return AESGCM(key).decrypt(nonce, body, aad)
        if algorithm is KeyAlgorithm.SM4:
            tag = body[-TAG_SIZE:]
            decryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce, tag)).decryptor()
            decryptor.authenticate_additional_data(aad)
            return decryptor.update(body[:-TAG_SIZE]) + decryptor.finalize()
    except InvalidTag:
        raise DecryptionFailed("the ciphertext or its info does not authenticate") from None
    raise UnsupportedAlgorithm(f"{algorithm.value} keys do not decrypt (no AEAD mode)")


def mac(algorithm: KeyAlgorithm, key: bytes, data: bytes) -> bytes:
    if algorithm is KeyAlgorithm.HMAC_SHA256:
        return _hmac(hashes.SHA256(), key, data)
    if algorithm is KeyAlgorithm.HMAC_SM3:
        return _hmac(hashes.SM3(), key, data)
    if algorithm in (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256):
        return _cmac(algorithms.AES(key), data)
    if algorithm is KeyAlgorithm.SM4:
        return _cmac(algorithms.SM4(key), data)
    if algorithm is KeyAlgorithm.TDES:
        # 2-key TDES is 3-key TDES with K3 = K1; pyca deprecates only the short spelling
        return _cmac(TripleDES(key + key[:8] if len(key) == 16 else key), data)
    raise UnsupportedAlgorithm(f"{algorithm.value} keys do not MAC")


def _hmac(hash_algorithm: hashes.HashAlgorithm, key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, hash_algorithm)
    h.update(data)
    return h.finalize()


def _cmac(cipher: algorithms.AES | algorithms.SM4 | TripleDES, data: bytes) -> bytes:
    c = cmac.CMAC(cipher)
    c.update(data)
    return c.finalize()


def key_wrap(kek: bytes, material: bytes, info: bytes) -> bytes:
    """AES key wrap with padding (RFC 5649)."""
    _no_info(info)
    return keywrap.aes_key_wrap_with_padding(kek, material)


def key_unwrap(kek: bytes, wrapped: bytes, info: bytes) -> bytes:
    _no_info(info)
    try:
        return keywrap.aes_key_unwrap_with_padding(kek, wrapped)
    except (keywrap.InvalidUnwrap, ValueError):
        raise DecryptionFailed("the wrapped key does not unwrap under this key") from None


def _no_info(info: bytes) -> None:
    # RFC 5649 has no associated data; silently ignoring info would drop a binding the
    # caller relies on.
    if info:
        raise InvalidInput("AES key wrap (RFC 5649) cannot bind info; pass info=b''")


def hkdf_sha256(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, None, info).derive(secret)


def strip_der_zero_padding(der: bytes) -> bytes:
    """``der`` without zero bytes after its outer DER element.

    SoftHSM2 pads a private key's PKCS#8 with zeros to a multiple of 8 bytes before RFC 5649
    wrapping (the padding then counts as key data), so keys it wraps unwrap with trailing
    zeros; anything but zeros after the element is left for the parser to reject.
    """
    if len(der) < 2 or der[0] != 0x30:
        return der
    first = der[1]
    if first < 0x80:
        header, length = 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(der) < 2 + count:
            return der
        header, length = 2 + count, int.from_bytes(der[2 : 2 + count], "big")
    end = header + length
    if end < len(der) and not any(der[end:]):
        return der[:end]
    return der
