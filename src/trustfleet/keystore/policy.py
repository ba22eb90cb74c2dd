"""What each key algorithm can do, and the checks every backend applies before acting."""

from __future__ import annotations

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import InvalidInput, InvalidKey, KeyUsageNotAllowed, UnsupportedAlgorithm
from trustfleet.keystore.base import KeyUsage

U = KeyUsage
_AEAD_SECRET = U.ENCRYPT | U.DECRYPT | U.MAC | U.DERIVE | U.WRAPPABLE

#: the usages each algorithm can serve at all; asking for more is an input error
POSSIBLE_USAGE: dict[KeyAlgorithm, KeyUsage] = {
    KeyAlgorithm.EC_P256: U.SIGN | U.DECRYPT | U.UNWRAP | U.DERIVE | U.WRAPPABLE,
    KeyAlgorithm.ED25519: U.SIGN | U.WRAPPABLE,
    KeyAlgorithm.X25519: U.DECRYPT | U.UNWRAP | U.DERIVE | U.WRAPPABLE,
    KeyAlgorithm.RSA_2048: U.SIGN | U.DECRYPT | U.UNWRAP | U.WRAPPABLE,
    KeyAlgorithm.RSA_3072: U.SIGN | U.DECRYPT | U.UNWRAP | U.WRAPPABLE,
    KeyAlgorithm.SM2: U.SIGN | U.DECRYPT | U.UNWRAP | U.DERIVE | U.WRAPPABLE,
    KeyAlgorithm.AES_128: _AEAD_SECRET | U.WRAP | U.UNWRAP,
    KeyAlgorithm.AES_256: _AEAD_SECRET | U.WRAP | U.UNWRAP,
    KeyAlgorithm.SM4: _AEAD_SECRET,
    KeyAlgorithm.TDES: U.MAC | U.DERIVE | U.WRAPPABLE | U.WRAP | U.UNWRAP | U.ENCRYPT | U.DECRYPT,
    KeyAlgorithm.HMAC_SHA256: U.MAC | U.DERIVE | U.WRAPPABLE,
    KeyAlgorithm.HMAC_SM3: U.MAC | U.DERIVE | U.WRAPPABLE,
}

AEAD_ALGORITHMS = frozenset({KeyAlgorithm.AES_128, KeyAlgorithm.AES_256, KeyAlgorithm.SM4})
KEY_WRAP_ALGORITHMS = frozenset({KeyAlgorithm.AES_128, KeyAlgorithm.AES_256})
MAX_LABEL_LENGTH = 200
HMAC_KEY_SIZES = range(16, 129)


def usage_names(usage: KeyUsage) -> str:
    return "|".join(flag.name or "" for flag in KeyUsage if flag and flag in usage) or "NONE"


def check_new_key(algorithm: KeyAlgorithm, usage: KeyUsage, label: str) -> None:
    """Input checks for a key about to be created (generated, imported, unwrapped, derived)."""
    if not isinstance(algorithm, KeyAlgorithm):
        raise InvalidInput(f"unknown key algorithm {algorithm!r}")
    extra = usage & ~POSSIBLE_USAGE[algorithm]
    if extra:
        raise InvalidInput(f"{algorithm.value} keys cannot have usage {usage_names(extra)}")
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidInput(f"a key label is at most {MAX_LABEL_LENGTH} characters")


def require(handle: str, usage: KeyUsage, needed: KeyUsage) -> None:
    if needed not in usage:
        raise KeyUsageNotAllowed(
            f"key {handle} has usage {usage_names(usage)}; this operation needs"
            f" {usage_names(needed)}"
        )


def check_secret(algorithm: KeyAlgorithm, secret: bytes) -> None:
    """Length (and, for 2-key TDES, non-degeneracy) of imported secret key material."""
    if algorithm.is_asymmetric:
        return
    if algorithm is KeyAlgorithm.TDES:
        if len(secret) not in (16, 24):
            raise InvalidKey("a TDES key is 16 or 24 bytes")
        if secret[:8] == secret[8:16]:
            raise InvalidKey("a TDES key whose first two halves are equal is single DES")
    elif algorithm in (KeyAlgorithm.HMAC_SHA256, KeyAlgorithm.HMAC_SM3):
        if len(secret) not in HMAC_KEY_SIZES:
            raise InvalidKey("an HMAC key is 16 to 128 bytes")
    elif len(secret) != algorithm.secret_length:
        raise InvalidKey(f"an {algorithm.value} key is {algorithm.secret_length} bytes")


def require_secret(handle: str, algorithm: KeyAlgorithm, what: str) -> None:
    if algorithm.is_asymmetric:
        raise UnsupportedAlgorithm(f"key {handle} is {algorithm.value}: {what} needs a secret key")
