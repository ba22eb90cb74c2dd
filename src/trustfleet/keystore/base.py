"""The KeyStore interface: every private or secret key lives behind it.

Callers hold opaque handles (``str``) and never key material. Each key carries usage
flags that every operation checks, and an ``exportable`` flag: a non-exportable key's
material cannot be read out by any call; it leaves the store only wrapped, and only when
its usage includes ``WRAPPABLE`` (see :meth:`KeyStore.wrap`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import Flag, auto
from typing import TYPE_CHECKING

from trustfleet.crypto.base import KeyAlgorithm, PublicKey
from trustfleet.errors import UnsupportedAlgorithm

if TYPE_CHECKING:
    from trustfleet.crypto.payment.tr31 import KeyBlockHeader


class KeyUsage(Flag):
    """What a key may be used for. Enforced by every backend on every call."""

    NONE = 0
    SIGN = auto()  # make signatures (asymmetric)
    DECRYPT = auto()  # kem-unwrap / decrypt data sent to this key (asymmetric or AEAD)
    ENCRYPT = auto()  # AEAD-encrypt data under this secret key
    WRAP = auto()  # wrap (encrypt) other keys under this key
    UNWRAP = auto()  # import other keys wrapped under this key
    WRAPPABLE = auto()  # this key may itself leave the store wrapped under another key
    DERIVE = auto()  # key agreement / key derivation
    MAC = auto()  # compute and verify MACs (HMAC or CMAC)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """Public facts about a stored key. Never holds private or secret material."""

    handle: str
    algorithm: KeyAlgorithm
    usage: KeyUsage
    exportable: bool
    label: str
    backend: str
    created_at: datetime
    #: SubjectPublicKeyInfo DER of the public half, for asymmetric keys
    public_key_der: bytes | None = None
    #: where the key lives: ``database`` (a row wrapped under the soft store's master key),
    #: ``sealed`` (a row wrapped under a key inside the PKCS#11 token) or ``token`` (an
    #: object inside the token)
    custody: str = "database"
    #: the operations of this key that run inside the token (names from
    #: :mod:`trustfleet.keystore.custody`); the others run in process memory
    token_operations: tuple[str, ...] = ()
    #: the operations of this key that run in process memory (the key is unwrapped for the
    #: operation and dropped afterwards)
    process_operations: tuple[str, ...] = ()

    @property
    def extractable(self) -> bool:
        """Whether the material can leave its custody at all: in clear (``exportable``) or
        wrapped under another key (``WRAPPABLE``)."""
        return self.exportable or KeyUsage.WRAPPABLE in self.usage


class KeyStore(ABC):
    """One interface for all backends (soft, PKCS#11)."""

    backend: str

    @abstractmethod
    def generate(
        self, algorithm: KeyAlgorithm, usage: KeyUsage, *, label: str = "", exportable: bool = False
    ) -> KeyInfo: ...

    @abstractmethod
    def import_key(
        self,
        algorithm: KeyAlgorithm,
        material: bytes,
        usage: KeyUsage,
        *,
        label: str = "",
        exportable: bool = False,
    ) -> KeyInfo:
        """Import a private key (PKCS#8 DER, or raw for SM2) or a raw secret key."""

    @abstractmethod
    def info(self, handle: str) -> KeyInfo: ...

    @abstractmethod
    def list(self) -> list[KeyInfo]: ...

    @abstractmethod
    def public_key(self, handle: str) -> PublicKey: ...

    @abstractmethod
    def sign(self, handle: str, data: bytes) -> bytes:
        """Sign with the scheme of the key's algorithm (ECDSA-SHA256, Ed25519,
        RSA-PSS-SHA256, SM2 with the default user ID). Needs ``SIGN``."""

    @abstractmethod
    def decrypt(self, handle: str, ciphertext: bytes, *, info: bytes = b"") -> bytes:
        """Asymmetric key: kem-unwrap (the suite's ``kem_unwrap``). Secret key: AEAD-open a
        ``encrypt`` output with ``info`` as associated data. Needs ``DECRYPT``."""

    @abstractmethod
    def encrypt(self, handle: str, plaintext: bytes, *, info: bytes = b"") -> bytes:
        """AEAD-seal under a secret key (nonce prepended). Needs ``ENCRYPT``."""

    @abstractmethod
    def wrap(self, handle: str, *, under: str | PublicKey, info: bytes = b"") -> bytes:
        """Export the secret key ``handle`` wrapped under another stored key (``under`` is a
        handle: AES key wrap with padding, RFC 5649) or to a public key (``under`` is a
        public key: the suite's ``kem_wrap`` bound to ``info``). The wrapped key needs
        ``WRAPPABLE``; a wrapping handle needs ``WRAP`` and must be an AES key. RFC 5649 has
        no associated data, so a non-empty ``info`` with a handle is an InvalidInput error.
        The wrapped material is the PKCS#8 DER of a private key or the raw secret."""

    @abstractmethod
    def unwrap(
        self,
        wrapping_handle: str,
        wrapped: bytes,
        algorithm: KeyAlgorithm,
        usage: KeyUsage,
        *,
        info: bytes = b"",
        label: str = "",
        exportable: bool = False,
    ) -> KeyInfo:
        """Import a key wrapped by :meth:`wrap` under ``wrapping_handle`` (needs ``UNWRAP``):
        an AES handle (RFC 5649) or an asymmetric one (the suite's ``kem_unwrap`` with
        ``info``)."""

    @abstractmethod
    def derive(
        self,
        handle: str,
        algorithm: KeyAlgorithm,
        usage: KeyUsage,
        *,
        peer_public: PublicKey | None = None,
        info: bytes = b"",
        label: str = "",
        exportable: bool = False,
    ) -> KeyInfo:
        """New secret key from ECDH/X25519 with ``peer_public`` (asymmetric handle) or from
        the secret key itself, through HKDF-SHA256 (no salt) with ``info``. Needs ``DERIVE``.
        A backend that cannot derive inside its boundary raises UnsupportedAlgorithm."""

    @abstractmethod
    def mac(self, handle: str, data: bytes) -> bytes:
        """HMAC (hmac-* keys) or CMAC (aes-*, sm4, tdes keys). Needs ``MAC``."""

    @abstractmethod
    def export(self, handle: str) -> bytes:
        """Key material in the clear; only for ``exportable`` keys, else KeyNotExportable."""

    @abstractmethod
    def destroy(self, handle: str) -> None:
        """Erase the key. Later calls with the handle raise KeyNotFound."""

    # -- payment-key operations (the soft store has them; a payment HSM backend would) ----

    def kcv(self, handle: str) -> bytes:
        """Key check value of a secret key (TDES: 3 bytes of TDES-ECB of zeros; AES: the first
        5 bytes of AES-CMAC of zeros). A KCV identifies a key without revealing it, so any
        secret key may give one, whatever its usage."""
        raise UnsupportedAlgorithm(f"the {self.backend} key store cannot compute KCVs")

    def wrap_tr31(self, handle: str, *, under: str, header: KeyBlockHeader) -> str:
        """The key ``handle`` as a TR-31 key block under the key block protection key
        ``under``. Needs ``WRAPPABLE`` on the key and ``WRAP`` on ``under``."""
        raise UnsupportedAlgorithm(f"the {self.backend} key store cannot make TR-31 key blocks")

    def unwrap_tr31(
        self,
        under: str,
        block: str,
        *,
        expected_usage: str | Iterable[str],
        expected_modes: Iterable[str],
        usage: KeyUsage,
        label: str = "",
    ) -> tuple[KeyBlockHeader, KeyInfo]:
        """Import the key of a TR-31 block protected by ``under`` (needs ``UNWRAP``), after
        enforcing its key usage and mode of use. Never exportable."""
        raise UnsupportedAlgorithm(f"the {self.backend} key store cannot read TR-31 key blocks")

    def block_cipher(
        self, handle: str, data: bytes, *, decrypt: bool, mode: str = "ecb", iv: bytes = b""
    ) -> bytes:
        """Raw AES/TDES/SM4 ECB or CBC over whole blocks (no padding), e.g. for PIN blocks.
        Needs ``ENCRYPT`` or ``DECRYPT``."""
        raise UnsupportedAlgorithm(f"the {self.backend} key store has no raw block cipher")

    def ping(self) -> None:
        """Raise unless the store can serve keys now (readiness checks call it)."""
        self.list()

    def mac_verify(self, handle: str, data: bytes, tag: bytes) -> None:
        import hmac as _hmac

        from trustfleet.errors import InvalidSignature

        if not _hmac.compare_digest(self.mac(handle, data), tag):
            raise InvalidSignature("MAC does not verify")
