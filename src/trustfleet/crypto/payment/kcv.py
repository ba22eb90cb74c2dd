"""Key check values (KCVs): short public fingerprints that confirm the right key arrived.

Two methods, as ANSI X9.24-1:2017 and the TR-31 / X9.143 ``KC``/``KP`` optional blocks
define them:

- legacy (TDES): encrypt one block of binary zeros in ECB and keep the leftmost
  3 bytes (6 hex digits), the value every payment HSM prints;
- CMAC (AES): AES-CMAC over one block (16 bytes) of binary zeros and keep the leftmost
  5 bytes (40 bits). X9.24-1:2017 moved AES to CMAC because encrypting a known block
  would give an attacker a plaintext/ciphertext pair under the key.

A KCV is a truncated one-way value, not a secret, but it still identifies a key: treat it
as an identifier, not as something to show to anyone who must not correlate keys.
"""

from __future__ import annotations

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import InvalidInput, InvalidKey, UnsupportedAlgorithm

TDES_KCV_LENGTH = 3
AES_CMAC_KCV_LENGTH = 5

_TDES_KEY_LENGTHS = (16, 24)
_AES_KEY_LENGTHS = {KeyAlgorithm.AES_128: 16, KeyAlgorithm.AES_256: 32}


def tdes_cipher_key(key: bytes) -> bytes:
    """Return ``key`` as a 24-byte TDES key (a 2-key key K1|K2 becomes K1|K2|K1).

    pyca/cryptography deprecates 16-byte TripleDES keys; the 24-byte form is the same
    cipher, so expanding it keeps the result identical without the warning.
    """
    if len(key) not in _TDES_KEY_LENGTHS:
        raise InvalidKey("a TDES key is 16 (2-key) or 24 (3-key) bytes")
    return key if len(key) == 24 else key + key[:8]


def kcv_tdes(key: bytes, length: int = TDES_KCV_LENGTH) -> bytes:
    """Legacy KCV: the first ``length`` bytes of TDES-ECB(key, 8 zero bytes)."""
    _check_length(length, 8)
    # One block of zeros in ECB is the definition of the legacy KCV, not a data mode.
    encryptor = Cipher(TripleDES(tdes_cipher_key(key)), modes.ECB()).encryptor()  # noqa: S305
    return (encryptor.update(bytes(8)) + encryptor.finalize())[:length]


def kcv_aes_cmac(key: bytes, length: int = AES_CMAC_KCV_LENGTH) -> bytes:
    """CMAC KCV: the first ``length`` bytes of AES-CMAC(key, 16 zero bytes)."""
    _check_length(length, 16)
    if len(key) not in (16, 24, 32):
        raise InvalidKey("an AES key is 16, 24 or 32 bytes")
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(bytes(16))
    return mac.finalize()[:length]


def kcv(algorithm: KeyAlgorithm, key: bytes) -> bytes:
    """The standard KCV for a key of ``algorithm``: legacy for TDES, CMAC for AES."""
    if algorithm is KeyAlgorithm.TDES:
        return kcv_tdes(key)
    expected_length = _AES_KEY_LENGTHS.get(algorithm)
    if expected_length is None:
        raise UnsupportedAlgorithm(f"no key check value is defined for {algorithm.value}")
    if len(key) != expected_length:
        raise InvalidKey(f"an {algorithm.value} key is {expected_length} bytes")
    return kcv_aes_cmac(key)


def _check_length(length: int, block_size: int) -> None:
    if not 1 <= length <= block_size:
        raise InvalidInput(f"a KCV length is between 1 and {block_size} bytes")
