"""The PKCS#11 backend as configured (``keystore_backend = "pkcs11"``): the token is the root
of trust and every key says where it lives.

* Signing-only asymmetric keys that are not exportable (CA keys, the TMK work key) are
  generated *in the token* when it can generate and sign with their algorithm
  (:data:`custody.SIGNING`), non-extractable, and sign there (:class:`Pkcs11KeyStore`,
  handles ``pkcs11:...``).
* Every other key is *sealed* (:class:`SealedKeyStore`, handles ``sealed:...``, and
  ``soft:...`` for rows moved from a soft store): a row wrapped under a key encryption key
  that never leaves the token; each operation runs in the token when it can
  (:mod:`trustfleet.keystore.sealed`).

No master key file is used, except to open rows of a soft store that ``trustfleet keystore
seal`` has not moved under the token yet.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pkcs11 import MechanismFlag

from trustfleet.crypto.base import KeyAlgorithm, PublicKey
from trustfleet.errors import InvalidInput, KeyNotFound, MasterKeyError, UnsupportedAlgorithm
from trustfleet.keystore import custody, policy
from trustfleet.keystore.base import KeyInfo, KeyStore, KeyUsage
from trustfleet.keystore.master import (
    _LIVE_NOT_UNDER,
    MASTER_KEY_ENV,
    MasterKeyring,
    load_master_keyring,
    rewrap_all,
)
from trustfleet.keystore.pkcs11 import HANDLE_PREFIX as TOKEN_PREFIX
from trustfleet.keystore.pkcs11 import Pkcs11KeyStore
from trustfleet.keystore.pkcs11_seal import TokenKeyring
from trustfleet.keystore.sealed import SealedKeyStore, SealingKeyring

if TYPE_CHECKING:
    from trustfleet.crypto.payment.tr31 import KeyBlockHeader
    from trustfleet.store import Database


class HsmKeyStore(KeyStore):
    """Keys in the token (signing keys) or sealed under it (all others)."""

    backend = "pkcs11"

    def __init__(
        self,
        db: Database,
        module_path: str,
        token_label: str,
        user_pin: str,
        *,
        policy: str = custody.SEALED,
        master: MasterKeyring | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.policy = custody.check_policy(policy)
        self.token = Pkcs11KeyStore(module_path, token_label, user_pin)
        try:
            self.keyring = TokenKeyring(self.token)
            self.sealed = SealedKeyStore(
                db, self.token, self.keyring, legacy=master, policy=self.policy, clock=clock
            )
        except BaseException:
            self.token.close()
            raise

    @property
    def mechanisms(self) -> custody.Mechanisms:
        return self.token.mechanisms

    def close(self) -> None:
        self.sealed.close()
        self.token.close()

    def _store_of(self, handle: str) -> KeyStore:
        if isinstance(handle, str) and handle.startswith(TOKEN_PREFIX):
            return self.token
        return self.sealed

    # -- where a new key goes -------------------------------------------------------------

    def token_placement(
        self, algorithm: KeyAlgorithm, usage: KeyUsage, exportable: bool, *, generate: bool
    ) -> str | None:
        """None if a key of this kind goes into the token; else why it is sealed."""
        if not algorithm.is_asymmetric:
            return "secret keys are sealed under the token's key encryption key"
        if usage != KeyUsage.SIGN:
            return "only signing-only keys are kept in the token"
        if exportable:
            return "an exportable key is sealed (its export runs in process)"
        mechanisms = custody.SIGNING.get(algorithm)
        if mechanisms is None:
            return custody.process_reason(custody.SIGN, algorithm)
        keygen, sign = mechanisms
        needs = [custody.Need(int(sign), MechanismFlag.SIGN)]
        if generate:
            needs.append(custody.Need(int(keygen), MechanismFlag.GENERATE_KEY_PAIR))
        missing = self.mechanisms.missing(needs)
        if missing:
            return f"the token has no {' and no '.join(missing)}"
        return None

    def _refuse_sealed_asymmetric(self, algorithm: KeyAlgorithm, usage: KeyUsage, why: str) -> None:
        if self.policy == custody.IN_TOKEN and algorithm.is_asymmetric:
            raise custody.refuse_in_token(
                f"a {algorithm.value} key with usage {policy.usage_names(usage)}", why
            )

    def generate(
        self, algorithm: KeyAlgorithm, usage: KeyUsage, *, label: str = "", exportable: bool = False
    ) -> KeyInfo:
        policy.check_new_key(algorithm, usage, label)
        why = self.token_placement(algorithm, usage, exportable, generate=True)
        if why is None:
            return _in_token(self.token.generate(algorithm, usage, label=label))
        self._refuse_sealed_asymmetric(algorithm, usage, why)
        return self.sealed.generate(algorithm, usage, label=label, exportable=exportable)

    def import_key(
        self,
        algorithm: KeyAlgorithm,
        material: bytes,
        usage: KeyUsage,
        *,
        label: str = "",
        exportable: bool = False,
    ) -> KeyInfo:
        policy.check_new_key(algorithm, usage, label)
        why = self.token_placement(algorithm, usage, exportable, generate=False)
        if why is None:
            return _in_token(self.token.import_key(algorithm, material, usage, label=label))
        self._refuse_sealed_asymmetric(algorithm, usage, why)
        return self.sealed.import_key(
            algorithm, material, usage, label=label, exportable=exportable
        )

    # -- reading --------------------------------------------------------------------------

    def info(self, handle: str) -> KeyInfo:
        store = self._store_of(handle)
        found = store.info(handle)
        return _in_token(found) if store is self.token else found

    def list(self) -> list[KeyInfo]:
        keys = [_in_token(k) for k in self.token.list()] + self.sealed.list()
        return sorted(keys, key=lambda k: (k.created_at, k.handle))

    def public_key(self, handle: str) -> PublicKey:
        return self._store_of(handle).public_key(handle)

    def ping(self) -> None:
        self.token.ping()
        self.sealed.check_master_key()

    def check_master_key(self) -> None:
        self.sealed.check_master_key()

    # -- operations: by the key's custody -------------------------------------------------

    def sign(self, handle: str, data: bytes) -> bytes:
        return self._store_of(handle).sign(handle, data)

    def decrypt(self, handle: str, ciphertext: bytes, *, info: bytes = b"") -> bytes:
        return self._store_of(handle).decrypt(handle, ciphertext, info=info)

    def encrypt(self, handle: str, plaintext: bytes, *, info: bytes = b"") -> bytes:
        return self._store_of(handle).encrypt(handle, plaintext, info=info)

    def mac(self, handle: str, data: bytes) -> bytes:
        return self._store_of(handle).mac(handle, data)

    def wrap(self, handle: str, *, under: str | PublicKey, info: bytes = b"") -> bytes:
        store = self._same_store(handle, under)
        return store.wrap(handle, under=under, info=info)

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
        return self._store_of(wrapping_handle).unwrap(
            wrapping_handle,
            wrapped,
            algorithm,
            usage,
            info=info,
            label=label,
            exportable=exportable,
        )

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
        return self._store_of(handle).derive(
            handle,
            algorithm,
            usage,
            peer_public=peer_public,
            info=info,
            label=label,
            exportable=exportable,
        )

    def export(self, handle: str) -> bytes:
        return self._store_of(handle).export(handle)

    def destroy(self, handle: str) -> None:
        self._store_of(handle).destroy(handle)

    def kcv(self, handle: str) -> bytes:
        return self._store_of(handle).kcv(handle)

    def wrap_tr31(self, handle: str, *, under: str, header: KeyBlockHeader) -> str:
        return self._same_store(handle, under).wrap_tr31(handle, under=under, header=header)

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
        return self._store_of(under).unwrap_tr31(
            under,
            block,
            expected_usage=expected_usage,
            expected_modes=expected_modes,
            usage=usage,
            label=label,
        )

    def block_cipher(
        self, handle: str, data: bytes, *, decrypt: bool, mode: str = "ecb", iv: bytes = b""
    ) -> bytes:
        return self._store_of(handle).block_cipher(handle, data, decrypt=decrypt, mode=mode, iv=iv)

    def _same_store(self, handle: str, under: str | PublicKey) -> KeyStore:
        store = self._store_of(handle)
        if isinstance(under, str) and under != handle and self._store_of(under) is not store:
            self._store_of(under).info(under)  # an unknown handle is KeyNotFound first
            raise UnsupportedAlgorithm(
                "a key in the token and a sealed key cannot wrap one another (wrap both"
                " where they live)"
            )
        if isinstance(under, str) and not under:
            raise KeyNotFound(f"no key has handle {under!r}")
        if under == handle:
            raise InvalidInput("a key cannot be wrapped under itself")
        return store


def _in_token(info: KeyInfo) -> KeyInfo:
    """A token object's KeyInfo with its custody: everything it does runs in the token."""
    operations = custody.operations_of(info.algorithm, info.usage, info.exportable)
    return replace(info, custody="token", token_operations=tuple(operations))


# -- moving a soft store under the token ------------------------------------------------


@dataclass(frozen=True, slots=True)
class SealReport:
    sealed: int
    kek_id: str
    master_key_removed: bool


def seal_soft_store(
    db: Database,
    store: HsmKeyStore,
    master_key_path: Path,
    *,
    remove_master_key: bool = True,
    batch_size: int = 100,
    after_row: Callable[[int], None] | None = None,
) -> SealReport:
    """Re-wrap every live row of the key store under the token's active KEK: rows of a soft
    store (under a master key) and rows under an older token KEK. Each row changes in one
    compare-and-set UPDATE, so the job can stop anywhere and be run again; the master key
    file is removed only when no live row needs it any more (and only if it is a file:
    ``TRUSTFLEET_MASTER_KEY`` is left to the operator). Handles do not change, so nothing
    that refers to a key does."""
    ring = store.sealed.master
    assert isinstance(ring, SealingKeyring)
    if ring.legacy is None:
        with suppress(MasterKeyError):
            ring.legacy = load_master_keyring(master_key_path)
    store.sealed.check_master_key()  # every row opens before anything changes
    active = store.keyring.active.kek_id
    sealed = rewrap_all(db, ring, active, batch_size, after_row)
    if db.read(lambda reads: reads.scalar(_LIVE_NOT_UNDER, kek_id=active)):
        raise MasterKeyError("keys were added under another key during sealing; run it again")
    removed = False
    if remove_master_key and master_key_path.exists() and not os.environ.get(MASTER_KEY_ENV):
        master_key_path.unlink()
        removed = True
    ring.legacy = None
    return SealReport(sealed=sealed, kek_id=active, master_key_removed=removed)
