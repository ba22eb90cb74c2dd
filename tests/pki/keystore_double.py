"""A minimal in-memory KeyStore for the PKI tests until the real soft store lands.

Signs exactly as the key store interface specifies: DER ECDSA over SHA-256, Ed25519, and
RSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt. Everything else is unsupported.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, NoReturn

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from trustfleet.crypto.base import KeyAlgorithm, PublicKey
from trustfleet.errors import KeyNotFound, KeyUsageNotAllowed
from trustfleet.keystore.base import KeyInfo, KeyStore, KeyUsage

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_Private = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class InMemoryKeyStore(KeyStore):
    backend = "memory-test-double"

    def __init__(self) -> None:
        self._keys: dict[str, tuple[KeyInfo, _Private]] = {}
        self.destroyed: list[str] = []

    def generate(
        self, algorithm: KeyAlgorithm, usage: KeyUsage, *, label: str = "", exportable: bool = False
    ) -> KeyInfo:
        key = _generate(algorithm)
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        info = KeyInfo(
            handle="mem:" + secrets.token_hex(8),
            algorithm=algorithm,
            usage=usage,
            exportable=exportable,
            label=label,
            backend=self.backend,
            created_at=datetime.now(UTC),
            public_key_der=spki,
        )
        self._keys[info.handle] = (info, key)
        return info

    def _get(self, handle: str) -> tuple[KeyInfo, _Private]:
        if handle not in self._keys:
            raise KeyNotFound()
        return self._keys[handle]

    def info(self, handle: str) -> KeyInfo:
        return self._get(handle)[0]

    def list(self) -> list[KeyInfo]:
        return [info for info, _ in self._keys.values()]

    def public_key(self, handle: str) -> PublicKey:
        return self._get(handle)[1].public_key()

    def sign(self, handle: str, data: bytes) -> bytes:
        info, key = self._get(handle)
        if KeyUsage.SIGN not in info.usage:
            raise KeyUsageNotAllowed()
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(hashes.SHA256()))
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, _PSS, hashes.SHA256())
        return key.sign(data)

    def destroy(self, handle: str) -> None:
        self._get(handle)
        del self._keys[handle]
        self.destroyed.append(handle)

    def import_key(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError

    def decrypt(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError

    def encrypt(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError

    def wrap(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError

    def unwrap(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError

    def derive(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError

    def mac(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError

    def export(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError


def _generate(algorithm: KeyAlgorithm) -> _Private:
    if algorithm is KeyAlgorithm.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm in (KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072):
        return rsa.generate_private_key(65537, 3072 if algorithm is KeyAlgorithm.RSA_3072 else 2048)
    if algorithm is KeyAlgorithm.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    raise NotImplementedError(algorithm)
