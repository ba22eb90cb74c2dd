"""The suite interface every named crypto suite implements.

A suite bundles one signature scheme, one key-transport (KEM) scheme, one AEAD, one MAC,
one block-cipher MAC (CMAC), one hash and one KDF. Protocol code picks a suite by name
(``get_suite("p256")``) and never names an algorithm itself.

Suites operate on key *objects* (pyca/cryptography keys, or ``SM2PrivateKey`` /
``SM2PublicKey`` for the GM suite). Long-term private and secret keys are held by the
key store, which calls into the suite with the unwrapped key; protocol code holds only
handles and public keys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import StrEnum
from typing import TYPE_CHECKING, TypeAlias

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

if TYPE_CHECKING:
    from trustfleet.crypto.sm2 import SM2PrivateKey, SM2PublicKey


class KeyAlgorithm(StrEnum):
    """Every kind of key trustfleet stores or accepts, by a stable name."""

    EC_P256 = "ec-p256"
    ED25519 = "ed25519"
    X25519 = "x25519"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    SM2 = "sm2"
    AES_128 = "aes-128"
    AES_256 = "aes-256"
    TDES = "tdes"  # 16- or 24-byte (2-key or 3-key) triple DES, legacy payment profiles
    HMAC_SHA256 = "hmac-sha256"
    HMAC_SM3 = "hmac-sm3"
    SM4 = "sm4"

    @property
    def is_asymmetric(self) -> bool:
        return self in _ASYMMETRIC

    @property
    def secret_length(self) -> int:
        """Length in bytes of a freshly generated secret key (symmetric algorithms only)."""
        return _SECRET_LENGTHS[self]


_ASYMMETRIC = frozenset(
    {
        KeyAlgorithm.EC_P256,
        KeyAlgorithm.ED25519,
        KeyAlgorithm.X25519,
        KeyAlgorithm.RSA_2048,
        KeyAlgorithm.RSA_3072,
        KeyAlgorithm.SM2,
    }
)
_SECRET_LENGTHS = {
    KeyAlgorithm.AES_128: 16,
    KeyAlgorithm.AES_256: 32,
    KeyAlgorithm.TDES: 16,
    KeyAlgorithm.HMAC_SHA256: 32,
    KeyAlgorithm.HMAC_SM3: 32,
    KeyAlgorithm.SM4: 16,
}

PrivateKey: TypeAlias = (
    "ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey"
    " | rsa.RSAPrivateKey | SM2PrivateKey"
)
PublicKey: TypeAlias = (
    "ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | x25519.X25519PublicKey"
    " | rsa.RSAPublicKey | SM2PublicKey"
)


class Suite(ABC):
    """A named, swappable set of algorithms. Stateless; one shared instance per name."""

    name: str
    #: algorithm of keys made by :meth:`generate_signing_key`
    signing_algorithm: KeyAlgorithm
    #: algorithm of keys made by :meth:`generate_kem_key`
    kem_algorithm: KeyAlgorithm
    #: key and nonce sizes of :meth:`aead_seal`
    aead_key_size: int
    aead_nonce_size: int
    #: output size of :meth:`hash` and :meth:`mac`
    digest_size: int

    # -- keys --------------------------------------------------------------------------
    @abstractmethod
    def generate_signing_key(self) -> PrivateKey: ...

    @abstractmethod
    def generate_kem_key(self) -> PrivateKey: ...

    # -- signatures --------------------------------------------------------------------
    @abstractmethod
    def sign(self, key: PrivateKey, data: bytes) -> bytes:
        """Sign ``data``; the encoding is the scheme's usual one (DER for ECDSA and SM2)."""

    @abstractmethod
    def verify(self, key: PublicKey, data: bytes, signature: bytes) -> None:
        """Return on success; raise :class:`trustfleet.errors.InvalidSignature` otherwise."""

    # -- key transport -----------------------------------------------------------------
    @abstractmethod
    def kem_wrap(self, recipient: PublicKey, plaintext: bytes, info: bytes) -> bytes:
        """Encrypt ``plaintext`` (a key) to ``recipient``, bound to ``info``.

        ``info`` (a session id, transcript hash...) must be given again to unwrap; any
        change makes unwrapping fail.
        """

    @abstractmethod
    def kem_unwrap(self, key: PrivateKey, ciphertext: bytes, info: bytes) -> bytes:
        """Inverse of :meth:`kem_wrap`; raise :class:`trustfleet.errors.DecryptionFailed`."""

    # -- symmetric ---------------------------------------------------------------------
    @abstractmethod
    def aead_seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes: ...

    @abstractmethod
    def aead_open(self, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Raise :class:`trustfleet.errors.DecryptionFailed` on a bad tag."""

    @abstractmethod
    def mac(self, key: bytes, data: bytes) -> bytes:
        """HMAC with the suite's hash."""

    @abstractmethod
    def cmac(self, key: bytes, data: bytes) -> bytes:
        """Block-cipher MAC (AES-CMAC, or SM4-CMAC in the GM suite)."""

    @abstractmethod
    def hash(self, data: bytes) -> bytes: ...

    @abstractmethod
    def kdf(self, secret: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
        """HKDF with the suite's hash."""

    def key_agreement(self, private: PrivateKey, peer_public: PublicKey) -> bytes:
        """Raw Diffie-Hellman shared secret (ECDH P-256, X25519); feed it to :meth:`kdf`.

        Suites without a plain static DH raise :class:`trustfleet.errors.UnsupportedAlgorithm`.
        """
        from trustfleet.errors import UnsupportedAlgorithm

        raise UnsupportedAlgorithm(f"suite {self.name!r} has no key agreement")

    def mac_verify(self, key: bytes, data: bytes, tag: bytes) -> None:
        """Constant-time check of :meth:`mac`; raise ``InvalidSignature`` on mismatch."""
        import hmac as _hmac

        from trustfleet.errors import InvalidSignature

        if not _hmac.compare_digest(self.mac(key, data), tag):
            raise InvalidSignature("MAC does not verify")
