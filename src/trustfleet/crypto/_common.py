"""Symmetric building blocks shared by the suites, with pyca errors mapped to ours.

Everything here is a thin call into pyca/cryptography; the only logic is input checking
and turning pyca's exceptions into :mod:`trustfleet.errors` ones.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import cmac, hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustfleet.errors import DecryptionFailed, InvalidInput, InvalidKey

GCM_NONCE_SIZE = 12
TAG_SIZE = 16


# -- AEADs -----------------------------------------------------------------------------
# All three AEADs take a 12-byte nonce and append a 16-byte tag.


def check_aead_inputs(key: bytes, nonce: bytes, key_size: int, what: str) -> None:
    if len(key) != key_size:
        raise InvalidKey(f"{what} key must be {key_size} bytes, got {len(key)}")
    if len(nonce) != GCM_NONCE_SIZE:
        raise InvalidInput(f"{what} nonce must be {GCM_NONCE_SIZE} bytes, got {len(nonce)}")


def aes_gcm_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    check_aead_inputs(key, nonce, 16, "AES-128-GCM")
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aes_gcm_open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    check_aead_inputs(key, nonce, 16, "AES-128-GCM")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise DecryptionFailed("AES-GCM authentication failed") from None


def chacha_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    check_aead_inputs(key, nonce, 32, "ChaCha20-Poly1305")
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def chacha_open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    check_aead_inputs(key, nonce, 32, "ChaCha20-Poly1305")
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise DecryptionFailed("ChaCha20-Poly1305 authentication failed") from None


def sm4_gcm_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    check_aead_inputs(key, nonce, 16, "SM4-GCM")
    encryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(aad)
    body = encryptor.update(plaintext) + encryptor.finalize()
    return body + encryptor.tag


def sm4_gcm_open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    check_aead_inputs(key, nonce, 16, "SM4-GCM")
    if len(ciphertext) < TAG_SIZE:
        raise DecryptionFailed("SM4-GCM ciphertext is shorter than its tag")
    body, tag = ciphertext[:-TAG_SIZE], ciphertext[-TAG_SIZE:]
    decryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce, tag)).decryptor()
    decryptor.authenticate_additional_data(aad)
    try:
        return decryptor.update(body) + decryptor.finalize()
    except InvalidTag:
        raise DecryptionFailed("SM4-GCM authentication failed") from None


# -- MACs, hash, KDF -------------------------------------------------------------------


def hmac_digest(algorithm: hashes.HashAlgorithm, key: bytes, data: bytes) -> bytes:
    mac = hmac.HMAC(key, algorithm)
    mac.update(data)
    return mac.finalize()


def aes_cmac(key: bytes, data: bytes) -> bytes:
    if len(key) not in (16, 24, 32):
        raise InvalidKey(f"AES-CMAC key must be 16, 24 or 32 bytes, got {len(key)}")
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def sm4_cmac(key: bytes, data: bytes) -> bytes:
    if len(key) != 16:
        raise InvalidKey(f"SM4-CMAC key must be 16 bytes, got {len(key)}")
    mac = cmac.CMAC(algorithms.SM4(key))
    mac.update(data)
    return mac.finalize()


def digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def hkdf(
    algorithm: hashes.HashAlgorithm, secret: bytes, *, salt: bytes, info: bytes, length: int
) -> bytes:
    max_length = 255 * algorithm.digest_size
    if not 1 <= length <= max_length:
        raise InvalidInput(f"HKDF output length must be 1..{max_length} bytes, got {length}")
    return HKDF(algorithm, length, salt, info).derive(secret)
