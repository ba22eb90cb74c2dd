"""Decryption of encrypted PKCS#8 (PBES2, RFC 8018) for keys pyca cannot parse (SM2).

pyca/cryptography decrypts encrypted PKCS#8 itself, but refuses to return a key on a
curve it does not know; for those we read the PBES2 parameters with asn1crypto and run
PBKDF2 and AES-CBC from pyca. Only PBES2 with PBKDF2-HMAC and AES-CBC is accepted, which
is what OpenSSL 3 and pyca write.
"""

from __future__ import annotations

from asn1crypto import keys as asn1_keys
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from trustfleet.errors import InvalidKey

#: refuse absurd iteration counts rather than spin for minutes on a hostile file
MAX_ITERATIONS = 10_000_000
_PRFS: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def is_encrypted(der: bytes) -> bool:
    try:
        info = asn1_keys.EncryptedPrivateKeyInfo.load(der, strict=True)
        info["encryption_algorithm"]["algorithm"].dotted  # noqa: B018  (forces the parse)
    except (ValueError, TypeError, KeyError):
        return False
    return True


def decrypt(der: bytes, password: bytes) -> bytes:
    """The PrivateKeyInfo DER inside an EncryptedPrivateKeyInfo."""
    try:
        info = asn1_keys.EncryptedPrivateKeyInfo.load(der, strict=True)
        scheme = info["encryption_algorithm"]
        supported = (
            scheme["algorithm"].native == "pbes2"
            and scheme.kdf == "pbkdf2"
            and scheme.kdf_hmac in _PRFS
            and scheme.encryption_cipher == "aes"
            and scheme.encryption_mode == "cbc"
        )
        if not supported:
            raise InvalidKey("the private key's encryption is not PBES2/PBKDF2/AES-CBC")
        iterations = scheme.kdf_iterations
        salt, iv, key_length = scheme.kdf_salt, scheme.encryption_iv, scheme.key_length
        ciphertext = info["encrypted_data"].native
    except (ValueError, TypeError, KeyError):
        raise InvalidKey("the encrypted private key is malformed") from None
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise InvalidKey("the encrypted private key has an unreasonable iteration count")
    kdf = PBKDF2HMAC(_PRFS[scheme.kdf_hmac](), key_length, salt, iterations)
    return _aes_cbc_open(kdf.derive(password), iv, ciphertext)


def _aes_cbc_open(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    if len(ciphertext) % 16 or not ciphertext:
        raise InvalidKey("the encrypted private key is malformed")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        padded = decryptor.update(ciphertext) + decryptor.finalize()
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise InvalidKey("cannot decrypt the private key: wrong password or corrupt data") from None
