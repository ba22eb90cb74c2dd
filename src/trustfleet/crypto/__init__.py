"""Named, swappable crypto suites and key encoding.

Protocol code asks ``get_suite(name)`` for a :class:`~trustfleet.crypto.base.Suite` and
never names an algorithm itself. The suites:

========  ==================  =========================  ===================  ========
name      signature           key transport (KEM)        AEAD                 hash/MAC
========  ==================  =========================  ===================  ========
p256      ECDSA P-256 SHA256  HPKE P-256/SHA256/AES128   AES-128-GCM          SHA-256
ed25519   Ed25519             HPKE X25519/SHA256/ChaCha  ChaCha20-Poly1305    SHA-256
rsa       RSA-PSS SHA-256     RSA-OAEP SHA-256           AES-128-GCM          SHA-256
gm        SM2 (SM3, Z value)  SM2 + SM4-GCM              SM4-GCM              SM3
========  ==================  =========================  ===================  ========
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey, Suite
from trustfleet.crypto.ed25519 import ED25519
from trustfleet.crypto.gm import GM, sm4_cbc_decrypt, sm4_cbc_encrypt
from trustfleet.crypto.keys import (
    algorithm_of,
    generate_private_key,
    load_private_key,
    load_public_key,
    private_key_to_der,
    private_key_to_pem,
    public_key_to_der,
    public_key_to_pem,
    suite_for_algorithm,
)
from trustfleet.crypto.p256 import P256
from trustfleet.crypto.rsa import RSA
from trustfleet.crypto.sm2 import DEFAULT_UID, SM2PrivateKey, SM2PublicKey
from trustfleet.errors import UnsupportedAlgorithm

#: every suite by name; read-only
SUITES: Mapping[str, Suite] = MappingProxyType({s.name: s for s in (P256, ED25519, RSA, GM)})


def get_suite(name: str) -> Suite:
    """The shared suite instance called ``name``; ``UnsupportedAlgorithm`` if unknown."""
    try:
        return SUITES[name]
    except (KeyError, TypeError):
        raise UnsupportedAlgorithm(f"unknown crypto suite {name!r}") from None


__all__ = [
    "DEFAULT_UID",
    "SUITES",
    "KeyAlgorithm",
    "PrivateKey",
    "PublicKey",
    "SM2PrivateKey",
    "SM2PublicKey",
    "Suite",
    "algorithm_of",
    "generate_private_key",
    "get_suite",
    "load_private_key",
    "load_public_key",
    "private_key_to_der",
    "private_key_to_pem",
    "public_key_to_der",
    "public_key_to_pem",
    "sm4_cbc_decrypt",
    "sm4_cbc_encrypt",
    "suite_for_algorithm",
]
