"""The capability's keys, and how terminal keys are sealed at rest.

Terminal keys are many (millions per import) and short-lived in use, so they are not
key store objects: a million key store calls (each reading a row, or a token round trip)
would be the whole cost of an import. Instead each import gets a random data-encryption key
(DEK); every key of the import is sealed under it with AES-256-GCM, the row's identity as
associated data; and the DEK is stored only as the key store sealed it
(``keystore.encrypt`` under the capability's key-encryption key, KEK, which never leaves the
store). One key store call per import, and one per key-sync request to open its key's DEK.

The trade-off: a DEK (and, while a request is checked and its delivery sealed, the
terminal's key) is in this process's memory in the clear, which a key store object would
not be. It is never logged, returned or written unsealed. Rotating the KEK re-seals DEKs,
not keys. Everything here uses only the KeyStore interface (encrypt, decrypt, mac,
generate), so it works the same with the soft store and with PKCS#11.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as pyca_hmac
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_public_key,
)
from sqlalchemy import bindparam, select

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import DecryptionFailed
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.keysync.models import ServiceKey
from trustfleet.store import Database, IntegrityViolation
from trustfleet.wire import transcript, utcnow

KEK = "kek"
FINGERPRINT = "fingerprint"
IMPORT = "import"
DEK_SIZE = 32
NONCE_SIZE = 12
FINGERPRINT_SIZE = 16
_SHA256 = hashes.SHA256()

_KEY_ROW_LABEL = b"trustfleet keysync terminal key v1"
_KEY_ROW_PREFIX = transcript(_KEY_ROW_LABEL)
_DEK_LABEL = b"trustfleet keysync import dek v1"
_IMPORT_KEY_LABEL = b"trustfleet keysync import private key v1"
_FINGERPRINT_KEY_INPUT = b"trustfleet keysync fingerprint key v1"

_SERVICE_KEY = select(
    ServiceKey.key_handle, ServiceKey.public_key_der, ServiceKey.sealed_private
).where(ServiceKey.purpose == bindparam("b_purpose"))

#: fingerprint keys by the handle of the key store key they come from (immutable)
_fingerprint_keys: dict[str, bytes] = {}
_lock = threading.Lock()


def key_row_aad(key_id: str, terminal_id: str, application_id: str | None, algorithm: str) -> bytes:
    """``transcript(label, key ID, terminal ID, application ID or "", algorithm)``, written
    out (a million rows per import call it)."""
    k, t, a, g = (
        key_id.encode(),
        terminal_id.encode(),
        (application_id or "").encode(),
        algorithm.encode(),
    )
    return b"".join(
        (
            _KEY_ROW_PREFIX,
            len(k).to_bytes(4, "big"), k,
            len(t).to_bytes(4, "big"), t,
            len(a).to_bytes(4, "big"), a,
            len(g).to_bytes(4, "big"), g,
        )
    )  # fmt: skip


def dek_info(import_id: str) -> bytes:
    return transcript(_DEK_LABEL, import_id.encode())


def seal_key(dek: AESGCM, key: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return nonce + dek.encrypt(nonce, key, aad)


def open_key(dek: AESGCM, sealed: bytes, aad: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return dek.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecryptionFailed("a stored terminal key does not authenticate") from None


def fingerprint(fingerprint_key: bytes, key: bytes) -> str:
    """A keyed hash of a key (HMAC-SHA256, truncated): equal keys give equal fingerprints,
    and it tells nothing about the key to anyone without the key store."""
    mac = pyca_hmac.HMAC(fingerprint_key, _SHA256)
    mac.update(key)
    return mac.finalize()[:FINGERPRINT_SIZE].hex()


class Vault:
    """The capability's key store keys, made on first use (any node; the first one to
    commit wins, the others destroy theirs)."""

    def __init__(
        self, db: Database, keystore: KeyStore, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._db = db
        self._keystore = keystore
        self._clock = clock

    @property
    def keystore(self) -> KeyStore:
        return self._keystore

    def _row(self, purpose: str) -> Any:
        return self._db.read(lambda reads: reads.one(_SERVICE_KEY, b_purpose=purpose))

    def _ensure(self, purpose: str, make: Callable[[], dict[str, object]]) -> object:
        found = self._row(purpose)
        if found is not None:
            return found
        values = make()  # key store calls: outside any unit of work
        try:
            with self._db.work() as uow:
                uow.insert(ServiceKey, purpose=purpose, created_at=self._clock(), **values)
        except IntegrityViolation:  # another node made it first: use theirs
            handle = values.get("key_handle")
            if isinstance(handle, str) and purpose != IMPORT:
                self._keystore.destroy(handle)
        found = self._row(purpose)
        assert found is not None
        return found

    def kek(self) -> str:
        """The handle of the AES-256 key that seals DEKs and secrets."""
        row = self._ensure(
            KEK,
            lambda: {
                "key_handle": self._keystore.generate(
                    KeyAlgorithm.AES_256,
                    KeyUsage.ENCRYPT | KeyUsage.DECRYPT,
                    label="keysync key-encryption key",
                ).handle
            },
        )
        handle = getattr(row, "key_handle", None)
        assert isinstance(handle, str)
        return handle

    def seal(self, plaintext: bytes, info: bytes) -> tuple[str, bytes]:
        """``plaintext`` sealed by the key store under the KEK: (KEK handle, sealed)."""
        handle = self.kek()
        return handle, self._keystore.encrypt(handle, plaintext, info=info)

    def open(self, kek_handle: str, sealed: bytes, info: bytes) -> bytes:
        return self._keystore.decrypt(kek_handle, sealed, info=info)

    # -- DEKs ------------------------------------------------------------------------

    def new_dek(self, import_id: str) -> tuple[str, bytes, AESGCM]:
        """A fresh DEK for an import: (KEK handle, sealed DEK, the DEK ready to use)."""
        dek = AESGCM.generate_key(bit_length=8 * DEK_SIZE)
        handle, sealed = self.seal(dek, dek_info(import_id))
        return handle, sealed, AESGCM(dek)

    def open_dek(self, kek_handle: str, sealed_dek: bytes, import_id: str) -> AESGCM:
        return AESGCM(self.open(kek_handle, sealed_dek, dek_info(import_id)))

    # -- the fingerprint key ----------------------------------------------------------

    def fingerprint_key(self) -> bytes:
        row = self._ensure(
            FINGERPRINT,
            lambda: {
                "key_handle": self._keystore.generate(
                    KeyAlgorithm.HMAC_SHA256, KeyUsage.MAC, label="keysync fingerprint key"
                ).handle
            },
        )
        handle = getattr(row, "key_handle", None)
        assert isinstance(handle, str)
        with _lock:
            cached = _fingerprint_keys.get(handle)
        if cached is None:
            cached = self._keystore.mac(handle, _FINGERPRINT_KEY_INPUT)
            with _lock:
                _fingerprint_keys[handle] = cached
        return cached

    # -- the import key pair (manifests are sealed to it) -------------------------------

    def _make_import_key(self) -> dict[str, object]:
        private = x25519.X25519PrivateKey.generate()
        raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        handle, sealed = self.seal(raw, _IMPORT_KEY_LABEL)
        public = private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return {"key_handle": handle, "public_key_der": public, "sealed_private": sealed}

    def import_public_key(self) -> x25519.X25519PublicKey:
        row = self._ensure(IMPORT, self._make_import_key)
        der = getattr(row, "public_key_der", None)
        assert isinstance(der, bytes)
        key = load_der_public_key(der)
        assert isinstance(key, x25519.X25519PublicKey)
        return key

    def import_private_key(self) -> x25519.X25519PrivateKey:
        row = self._ensure(IMPORT, self._make_import_key)
        handle, sealed = getattr(row, "key_handle", None), getattr(row, "sealed_private", None)
        assert isinstance(handle, str) and isinstance(sealed, bytes)
        return x25519.X25519PrivateKey.from_private_bytes(
            self.open(handle, sealed, _IMPORT_KEY_LABEL)
        )
