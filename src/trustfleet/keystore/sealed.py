"""Sealed keys: the soft store's rows, wrapped under a key encryption key inside the PKCS#11
token instead of a master key file, and each operation run inside the token when the token
can run it.

Rows are the soft store's (same table, same binding of handle, algorithm, usage,
exportability and public key, same unit of work: a key made inside a use case's transaction
exists only if it commits). Only the keyring differs: :class:`TokenKeyring` wraps and
unwraps in the token (:mod:`trustfleet.keystore.pkcs11_seal`).

Per operation (:mod:`trustfleet.keystore.custody` has the tables):

* **in the token** when the token lists the mechanism (KCVs by AES-CMAC or TDES-ECB, MACs by
  AES-CMAC, TDES-CMAC or HMAC-SHA256, AES-GCM, AES/TDES ECB and CBC, RSA-OAEP key transport
  when the token takes SHA-256 and a label): the key is unwrapped *inside the token* into a
  sensitive session object and the operation runs there. Those objects are kept (an LRU
  per process, keyed by everything the row authenticates and its wrapped material, like
  the soft store's cache), so a key used again is not unwrapped again; a destroy drops
  them. Nothing of the key is in process memory.
* **in process** otherwise (HPKE and SM2 key transport, TR-31, HKDF, SM2/SM4/HMAC-SM3,
  export): under policy ``sealed`` the key is unwrapped into process memory for that one
  call and dropped (no cache of clear keys; Python cannot wipe the bytes, it drops its
  reference); under policy ``in-token`` the call is refused with an error naming the
  mechanism the token lacks.

Secret keys are generated inside the token when it has their generation mechanism (and
sealed there with ``C_WrapKey``: they never exist in process memory unless an in-process
operation needs them); others are generated in process and sealed at once.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.mechanisms import GCMParams

from trustfleet import crypto
from trustfleet.crypto.base import KeyAlgorithm, PublicKey
from trustfleet.crypto.payment import kcv as kcvs
from trustfleet.errors import DecryptionFailed, InvalidKey, MasterKeyError, UnsupportedAlgorithm
from trustfleet.keystore import custody, payment_ops, policy
from trustfleet.keystore.base import KeyInfo, KeyUsage
from trustfleet.keystore.custody import Need
from trustfleet.keystore.master import MasterKeyring
from trustfleet.keystore.pkcs11 import Pkcs11KeyStore, token_errors
from trustfleet.keystore.pkcs11_objects import int_bytes
from trustfleet.keystore.pkcs11_seal import LoadRefused, TokenKeyring, is_token_kek_id
from trustfleet.keystore.soft import _LIVE_KEK_IDS, Material, SoftKeyStore, _CacheKey, _Row
from trustfleet.store import Database

T = TypeVar("T")

HANDLE_PREFIX = "sealed:"
DEFAULT_TOKEN_CACHE_SIZE = 1024
NONCE_SIZE = 12
TAG_BITS = 128
_AES = (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256)


class SealingKeyring:
    """Seals under the token's active KEK; opens rows under any token KEK and, while a soft
    store is being moved under the token (``trustfleet keystore seal``), rows still under a
    master key of ``legacy``."""

    def __init__(self, token: TokenKeyring, legacy: MasterKeyring | None = None) -> None:
        self.token = token
        self.legacy = legacy

    @property
    def kek_ids(self) -> list[str]:
        return self.token.kek_ids + (self.legacy.kek_ids if self.legacy else [])

    def has(self, kek_id: str) -> bool:
        if is_token_kek_id(kek_id):
            return self.token.has(kek_id)
        return self.legacy is not None and self.legacy.has(kek_id)

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        return self.token.seal(plaintext, aad)

    def open(self, kek_id: str, blob: bytes, aad: bytes) -> bytes:
        if is_token_kek_id(kek_id):
            return self.token.open(kek_id, blob, aad)
        if self.legacy is None:
            raise MasterKeyError(
                f"a stored key is still wrapped under the master key {kek_id}: run `trustfleet"
                " keystore seal` with the master key file to move it under the token"
            )
        return self.legacy.open(kek_id, blob, aad)

    def reload(self) -> SealingKeyring:
        self.token.reload()
        if self.legacy is not None:
            self.legacy = self.legacy.reload()
        return self


class _TokenObjects:
    """Session objects of sealed keys loaded into the token, by row (LRU). An object that
    leaves (evicted, its key destroyed, the store closed) is destroyed in the token."""

    def __init__(self, token: Pkcs11KeyStore, size: int) -> None:
        self._token = token
        self._size = size
        self._items: OrderedDict[_CacheKey, tuple[str, pkcs11.SecretKey]] = OrderedDict()

    def get(self, key: _CacheKey) -> pkcs11.SecretKey | None:
        with self._token.lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: _CacheKey, handle: str, obj: pkcs11.SecretKey) -> None:
        with self._token.lock:
            self._items[key] = (handle, obj)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                _, (_, old) = self._items.popitem(last=False)
                _destroy_quietly(old)

    def forget(self, handle: str) -> None:
        with self._token.lock:
            for key in [k for k, (h, _) in self._items.items() if h == handle]:
                _destroy_quietly(self._items.pop(key)[1])

    def clear(self) -> None:
        with self._token.lock:
            for _, obj in self._items.values():
                _destroy_quietly(obj)
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _destroy_quietly(obj: pkcs11.Object) -> None:
    with suppress(pkcs11.PKCS11Error):  # a session object also ends with its session
        obj.destroy()


class SealedKeyStore(SoftKeyStore):
    """Rows sealed under the token's KEK; operations in the token where it can run them."""

    backend = "pkcs11"
    handle_prefix = HANDLE_PREFIX
    handle_prefixes = (HANDLE_PREFIX, "soft:")

    def __init__(
        self,
        db: Database,
        token: Pkcs11KeyStore,
        keyring: TokenKeyring,
        *,
        legacy: MasterKeyring | None = None,
        policy: str = custody.SEALED,
        clock: Callable[[], datetime] | None = None,
        token_cache_size: int = DEFAULT_TOKEN_CACHE_SIZE,
    ) -> None:
        # cache_size=0: no clear key is kept in process memory
        super().__init__(db, SealingKeyring(keyring, legacy), cache_size=0, clock=clock)
        self._token = token
        self._ring = keyring
        self._mechanisms = token.mechanisms
        self.policy = custody.check_policy(policy)
        self._loaded = _TokenObjects(token, token_cache_size)
        self._probe_lock = threading.Lock()

    @property
    def in_token_only(self) -> bool:
        return self.policy == custody.IN_TOKEN

    def close(self) -> None:
        self._loaded.clear()

    # -- where a key lives and where its operations run --------------------------------

    def list(self) -> list[KeyInfo]:
        self._oaep_in_token()  # so that the listing can say where RSA-OAEP transport runs
        return super().list()

    def _info(self, row: _Row) -> KeyInfo:
        if not is_token_kek_id(row.kek_id):
            return row.info(self.backend)  # still under the soft store's master key
        token_ops: list[str] = []
        process_ops: list[str] = []
        for operation in row.operations():
            (token_ops if self._placed_in_token(row, operation) else process_ops).append(operation)
        return row.info(self.backend, "sealed", tuple(token_ops), tuple(process_ops))

    def _placed_in_token(self, row: _Row, operation: str) -> bool:
        if self._mechanisms.refused(_load_key(row)):
            return False
        if operation == custody.WRAP:  # RSA-OAEP; HPKE and SM2 transport run in process
            accepted = self._mechanisms.accepted(custody.OAEP_SHA256)
            return accepted and row.algorithm in custody.LOAD_TYPES
        need = self._need(row, operation)
        return need is not None and self._mechanisms.has(need)

    def _need(self, row: _Row, operation: str) -> Need | None:
        if operation == custody.BLOCK_CIPHER:
            return custody.block_need(row.algorithm, "ecb", KeyUsage.DECRYPT in row.usage)
        return custody.token_need(operation, row.algorithm)

    def _oaep_in_token(self) -> bool:
        """Whether the token wraps with RSA-OAEP-SHA256 and a label: tried once (with a
        throwaway key) if no key transport has told yet."""
        oaep = custody.OAEP_SHA256
        if self._mechanisms.accepted(oaep):
            return True
        if self._mechanisms.refused(oaep):
            return False
        if not self._mechanisms.supports(Mechanism.RSA_PKCS_OAEP, MechanismFlag.WRAP):
            self._mechanisms.refuse(oaep)
            return False
        with self._probe_lock:
            recipient = _probe_rsa_key()
            template = {Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True}
            try:
                with self._token.lock, token_errors("RSA-OAEP probe"):
                    probe = self._token.session.generate_key(
                        KeyType.AES, 128, store=False, template=template
                    )
                    try:
                        self._oaep_wrap(probe, recipient, b"probe")
                    finally:
                        _destroy_quietly(probe)
                self._mechanisms.accept(oaep)
            except UnsupportedAlgorithm:
                self._mechanisms.refuse(oaep)
        return self._mechanisms.accepted(oaep)

    # -- process memory: only when the token cannot run the operation ------------------

    def _material(self, row: _Row, operation: str = "") -> Material:
        if self.in_token_only:
            need = self._need(row, operation)
            if not is_token_kek_id(row.kek_id):
                reason = "the key is still under the soft store's master key (run `trustfleet"
                reason += " keystore seal`)"
            elif need is not None and self._mechanisms.has(need):
                reason = f"the token would not take the {row.algorithm.value} key for it"
            else:
                reason = custody.process_reason(operation, row.algorithm, need)
            what = (
                f"{operation or 'this operation'} with the {row.algorithm.value} key {row.handle}"
            )
            raise custody.refuse_in_token(what, reason)
        return super()._material(row, operation)

    def public_key(self, handle: str) -> PublicKey:
        row = self._row(handle)
        if row.public_key_der is None or not is_token_kek_id(row.kek_id):
            return super().public_key(handle)
        # the row's tag covers its public key: checked in the token, nothing unwrapped
        self._ring.verify(row.kek_id, row.wrapped, row.binding())
        return crypto.load_public_key(row.public_key_der)

    # -- keys loaded into the token -----------------------------------------------------

    def _in_token(self, row: _Row, operation: str, need: Need | None) -> Any:
        """The row's key as a session object of the token, for ``operation``; None when it
        runs in process (policy ``sealed``). Under policy ``in-token`` what cannot run in the
        token is refused by :meth:`_material`."""
        if need is None or not self._mechanisms.has(need):
            return None
        if not is_token_kek_id(row.kek_id) or self._mechanisms.refused(_load_key(row)):
            return None
        if self._mechanisms.refused(_operation_key(row, operation, need)):
            return None
        cache_key = row.cache_key()
        obj = self._loaded.get(cache_key)
        if obj is not None:
            return obj
        try:
            obj = self._load(row)
        except LoadRefused:
            self._mechanisms.refuse(_load_key(row))
            return None
        self._loaded.put(cache_key, row.handle, obj)
        return obj

    def _load(self, row: _Row) -> Any:
        template = {
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: KeyUsage.WRAPPABLE in row.usage,
            **_token_functions(row.algorithm, row.usage),
        }
        key_type = custody.LOAD_TYPES.get(row.algorithm)
        if key_type is None:
            raise LoadRefused(f"{row.algorithm.value} keys are not loaded into the token")
        try:
            return self._ring.load(row.kek_id, row.wrapped, row.binding(), key_type, template)
        except LoadRefused:
            if key_type is not KeyType.DES2:
                raise
            # a 3-key TDES key
            return self._ring.load(row.kek_id, row.wrapped, row.binding(), KeyType.DES3, template)

    def _run(
        self,
        row: _Row,
        operation: str,
        need: Need | None,
        in_token: Callable[[Any], T],
        in_process: Callable[[], T],
        *,
        failure: type[DecryptionFailed] | None = None,
    ) -> T:
        obj = self._in_token(row, operation, need)
        if obj is not None:
            assert need is not None
            try:
                with self._token.lock, token_errors(f"{operation} in the token", failure=failure):
                    return in_token(obj)
            except UnsupportedAlgorithm:
                # listed but refused when asked (parameters, key type): not again
                self._mechanisms.refuse(_operation_key(row, operation, need))
                self._loaded.forget(row.handle)
        return in_process()

    # -- creating keys -------------------------------------------------------------------

    def generate(
        self, algorithm: KeyAlgorithm, usage: KeyUsage, *, label: str = "", exportable: bool = False
    ) -> KeyInfo:
        policy.check_new_key(algorithm, usage, label)
        mechanism = custody.SECRET_GENERATION.get(algorithm)
        if (
            mechanism is not None
            and self._mechanisms.supports(mechanism, MechanismFlag.GENERATE)
            and not self._mechanisms.refused(f"generate:{algorithm.value}")
        ):
            try:
                return self._generate_in_token(algorithm, usage, label, exportable, mechanism)
            except (UnsupportedAlgorithm, InvalidKey):
                self._mechanisms.refuse(f"generate:{algorithm.value}")
        if self.in_token_only:
            reason = (
                custody.process_reason(custody.EXPORT, algorithm)
                if mechanism is None
                else f"the token has no {custody.mechanism_name(mechanism)}"
            )
            raise custody.refuse_in_token(f"generating a {algorithm.value} key", reason)
        return super().generate(algorithm, usage, label=label, exportable=exportable)

    def _generate_in_token(
        self,
        algorithm: KeyAlgorithm,
        usage: KeyUsage,
        label: str,
        exportable: bool,
        mechanism: Mechanism,
    ) -> KeyInfo:
        key_type = custody.LOAD_TYPES[algorithm]
        bits = None if key_type is KeyType.DES2 else algorithm.secret_length * 8
        template = {
            Attribute.TOKEN: False,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: True,  # to be sealed under the KEK
            **_token_functions(algorithm, usage),
        }
        session = self._token.session
        with self._token.lock:
            with token_errors("key generation"):
                obj = session.generate_key(
                    key_type, bits, store=False, mechanism=mechanism, template=template
                )
            assert isinstance(obj, pkcs11.SecretKey)
            try:
                row = self._new_row(algorithm, usage, label, exportable, None)
                kek_id, wrapped = self._ring.seal_object(obj, row.binding())
                row = replace(row, kek_id=kek_id, wrapped=wrapped)
                self._insert(row)
                if KeyUsage.WRAPPABLE not in usage:
                    obj[Attribute.EXTRACTABLE] = False  # sealed: nothing more leaves
            except BaseException:
                _destroy_quietly(obj)
                raise
            self._loaded.put(row.cache_key(), row.handle, obj)
        return self._info(row)

    # -- operations ----------------------------------------------------------------------

    def _do_mac(self, row: _Row, data: bytes) -> bytes:
        need = custody.token_need(custody.MAC, row.algorithm)

        def in_token(key: Any) -> bytes:
            assert need is not None
            return bytes(key.sign(data, mechanism=Mechanism(need.mechanism)))

        return self._run(
            row, custody.MAC, need, in_token, lambda: super(SealedKeyStore, self)._do_mac(row, data)
        )

    def _do_kcv(self, row: _Row) -> bytes:
        need = custody.token_need(custody.KCV, row.algorithm)

        def in_token(key: Any) -> bytes:
            if row.algorithm is KeyAlgorithm.TDES:
                return bytes(key.encrypt(bytes(8), mechanism=Mechanism.DES3_ECB))[
                    : kcvs.TDES_KCV_LENGTH
                ]
            return bytes(key.sign(bytes(16), mechanism=Mechanism.AES_CMAC))[
                : kcvs.AES_CMAC_KCV_LENGTH
            ]

        return self._run(
            row, custody.KCV, need, in_token, lambda: super(SealedKeyStore, self)._do_kcv(row)
        )

    def _do_encrypt(self, row: _Row, plaintext: bytes, info: bytes) -> bytes:
        need = custody.token_need(custody.ENCRYPT, row.algorithm)

        def in_token(key: Any) -> bytes:
            nonce = os.urandom(NONCE_SIZE)
            sealed = key.encrypt(
                plaintext,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(nonce, info or None, TAG_BITS),
            )
            return nonce + bytes(sealed)

        return self._run(
            row,
            custody.ENCRYPT,
            need,
            in_token,
            lambda: super(SealedKeyStore, self)._do_encrypt(row, plaintext, info),
        )

    def _do_decrypt(self, row: _Row, ciphertext: bytes, info: bytes) -> bytes:
        need = custody.token_need(custody.DECRYPT, row.algorithm)

        def in_token(key: Any) -> bytes:
            if len(ciphertext) < NONCE_SIZE + TAG_BITS // 8:
                raise DecryptionFailed("the ciphertext is shorter than its nonce and tag")
            nonce, body = ciphertext[:NONCE_SIZE], ciphertext[NONCE_SIZE:]
            return bytes(
                key.decrypt(
                    body,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, info or None, TAG_BITS),
                )
            )

        return self._run(
            row,
            custody.DECRYPT,
            need,
            in_token,
            lambda: super(SealedKeyStore, self)._do_decrypt(row, ciphertext, info),
            failure=DecryptionFailed,
        )

    def _do_block_cipher(
        self, row: _Row, data: bytes, decrypt: bool, mode: str, iv: bytes
    ) -> bytes:
        payment_ops.check_block_input(row.algorithm, data, mode, iv)
        need = custody.block_need(row.algorithm, mode, decrypt)

        def in_token(key: Any) -> bytes:
            assert need is not None
            mechanism = Mechanism(need.mechanism)
            param = iv or None
            if decrypt:
                return bytes(key.decrypt(data, mechanism=mechanism, mechanism_param=param))
            return bytes(key.encrypt(data, mechanism=mechanism, mechanism_param=param))

        return self._run(
            row,
            custody.BLOCK_CIPHER,
            need,
            in_token,
            lambda: super(SealedKeyStore, self)._do_block_cipher(row, data, decrypt, mode, iv),
        )

    def _do_wrap_to(self, row: _Row, recipient: PublicKey, info: bytes) -> bytes:
        recipient_algorithm = crypto.algorithm_of(recipient)  # refuses what is not accepted
        oaep = custody.OAEP_SHA256
        if (
            isinstance(recipient, rsa.RSAPublicKey)
            and self._mechanisms.supports(Mechanism.RSA_PKCS_OAEP, MechanismFlag.WRAP)
            and not self._mechanisms.refused(oaep)
        ):
            need = Need(int(Mechanism.RSA_PKCS_OAEP), MechanismFlag.WRAP)
            obj = self._in_token(row, custody.WRAP, need)
            if obj is not None:
                try:
                    with self._token.lock, token_errors("RSA-OAEP key transport"):
                        wrapped = self._oaep_wrap(obj, recipient, info)
                    self._mechanisms.accept(oaep)
                    return wrapped
                except UnsupportedAlgorithm:
                    self._mechanisms.refuse(oaep)
        if self.in_token_only:
            raise custody.refuse_in_token(
                f"key transport to a {recipient_algorithm.value} public key",
                custody.transport_reason(recipient_algorithm, self._mechanisms),
            )
        return super()._do_wrap_to(row, recipient, info)

    def _oaep_wrap(self, key: Any, recipient: rsa.RSAPublicKey, label: bytes) -> bytes:
        numbers = recipient.public_numbers()
        wrapping: Any = self._token.session.create_object(
            {
                Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                Attribute.KEY_TYPE: KeyType.RSA,
                Attribute.TOKEN: False,
                Attribute.WRAP: True,
                Attribute.MODULUS: int_bytes(numbers.n),
                Attribute.PUBLIC_EXPONENT: int_bytes(numbers.e),
            }
        )
        try:
            param: Any = (Mechanism.SHA256, MGF.SHA256, label or None)
            return bytes(
                wrapping.wrap_key(key, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=param)
            )
        finally:
            _destroy_quietly(wrapping)

    # -- lifetime ------------------------------------------------------------------------

    def destroy(self, handle: str) -> None:
        super().destroy(handle)
        self._loaded.forget(handle)

    def check_master_key(self) -> None:
        """Raise MasterKeyError unless every live row opens: under a KEK the token holds,
        or (while moving a soft store) under a loaded master key."""
        try:
            super().check_master_key()
        except MasterKeyError:
            self.master.reload()
            used = self._db.read(lambda reads: reads.all(_LIVE_KEK_IDS))
            missing = sorted(r.kek_id for r in used if not self.master.has(r.kek_id))
            if not missing:
                return
            soft = [k for k in missing if not is_token_kek_id(k)]
            hint = (
                "; they are still under the soft store's master key: run `trustfleet keystore"
                " seal` with the master key file"
                if soft
                else "; use the token this database was sealed with"
            )
            raise MasterKeyError(
                f"stored keys are wrapped under {', '.join(missing)}, which neither the token"
                f" nor a loaded master key holds{hint}"
            ) from None


def _token_functions(algorithm: KeyAlgorithm, usage: KeyUsage) -> dict[Attribute, bool]:
    """The functions a sealed key's session object gets: what its operations placed in
    the token use, no more (the store checks the key's usage flags before every call)."""
    kcv_by_cmac = algorithm in _AES
    kcv_by_ecb = algorithm is KeyAlgorithm.TDES
    return {
        Attribute.SIGN: KeyUsage.MAC in usage or kcv_by_cmac,
        Attribute.VERIFY: False,
        Attribute.ENCRYPT: KeyUsage.ENCRYPT in usage or kcv_by_ecb,
        Attribute.DECRYPT: KeyUsage.DECRYPT in usage,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }


def _load_key(row: _Row) -> str:
    return f"load:{row.algorithm.value}"


def _operation_key(row: _Row, operation: str, need: Need) -> str:
    return f"{need.name}:{row.algorithm.value}:{operation}"


_PROBE_KEY: list[rsa.RSAPublicKey] = []


def _probe_rsa_key() -> rsa.RSAPublicKey:
    if not _PROBE_KEY:
        _PROBE_KEY.append(rsa.generate_private_key(65537, 2048).public_key())
    return _PROBE_KEY[0]
