"""The soft key store: keys in the shared database, wrapped under the master key.

Every row's material is ``AES-256-GCM(master key, PKCS#8 DER or raw secret)`` with the
row's handle, algorithm, usage, exportability and public key as associated data (see
:meth:`trustfleet.keystore.models.StoredKey.binding`): editing a flag or swapping material
between rows makes the key fail with :class:`KeyIntegrityError` instead of widening its use.

Any node sharing the database and the master key serves any key. Each call reads the key's
row (one indexed select) so a destroy on another node takes effect at once; unwrapped key
objects are cached per process, keyed by everything the row authenticates and the wrapped
material itself, so a changed row never hits a stale cache entry.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TypeAlias, cast

from sqlalchemy import Row, bindparam, insert, select, update

from trustfleet import crypto
from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey
from trustfleet.crypto.payment import tr31
from trustfleet.crypto.payment.tr31 import KeyBlockHeader
from trustfleet.crypto.sm2 import SM2PrivateKey
from trustfleet.errors import (
    InvalidInput,
    InvalidKey,
    KeyNotExportable,
    KeyNotFound,
    MasterKeyError,
    UnsupportedAlgorithm,
)
from trustfleet.keystore import custody, payment_ops, policy, secret_ops
from trustfleet.keystore.base import KeyInfo, KeyStore, KeyUsage
from trustfleet.keystore.master import Keyring
from trustfleet.keystore.models import StoredKey, row_binding
from trustfleet.store import Database

HANDLE_PREFIX = "soft:"
DEFAULT_CACHE_SIZE = 1024
SM2_RAW_SIZE = 32

Material: TypeAlias = "PrivateKey | bytes"
_CacheKey: TypeAlias = tuple[str, KeyAlgorithm, KeyUsage, bool, bytes | None, str, bytes]


@dataclass(frozen=True, slots=True)
class _Row:
    handle: str
    algorithm: KeyAlgorithm
    usage: KeyUsage
    exportable: bool
    label: str
    created_at: datetime
    public_key_der: bytes | None
    wrapped: bytes
    kek_id: str

    def binding(self) -> bytes:
        usage = self.usage.value
        return row_binding(
            self.handle, self.algorithm.value, usage, self.exportable, self.public_key_der
        )

    def cache_key(self) -> _CacheKey:
        """Everything the row authenticates, and what it wraps: a changed row misses."""
        return (
            self.handle,
            self.algorithm,
            self.usage,
            self.exportable,
            self.public_key_der,
            self.kek_id,
            self.wrapped,
        )

    def info(
        self,
        backend: str,
        custody: str = "database",
        token_operations: tuple[str, ...] = (),
        process_operations: tuple[str, ...] | None = None,
    ) -> KeyInfo:
        if process_operations is None:
            process_operations = tuple(self.operations())
        return KeyInfo(
            handle=self.handle,
            algorithm=self.algorithm,
            usage=self.usage,
            exportable=self.exportable,
            label=self.label,
            backend=backend,
            created_at=self.created_at,
            public_key_der=self.public_key_der,
            custody=custody,
            token_operations=token_operations,
            process_operations=process_operations,
        )

    def operations(self) -> list[str]:
        return custody.operations_of(self.algorithm, self.usage, self.exportable)


_SelectedRow: TypeAlias = "Row[str, str, int, bool, str, datetime, bytes | None, bytes, str]"
_COLUMNS = (
    StoredKey.handle,
    StoredKey.algorithm,
    StoredKey.usage,
    StoredKey.exportable,
    StoredKey.label,
    StoredKey.created_at,
    StoredKey.public_key_der,
    StoredKey.wrapped,
    StoredKey.kek_id,
)

# Built once: every key operation reads its row, and a TMK download makes several keys.
_SELECT_LIVE = select(*_COLUMNS).where(
    StoredKey.handle == bindparam("handle"), StoredKey.destroyed_at.is_(None)
)
_INSERT_KEY = insert(StoredKey).values(  # destroyed_at stays NULL
    {column.key: bindparam(column.key) for column in _COLUMNS}
)
_LIST_LIVE = (
    select(*_COLUMNS)
    .where(StoredKey.destroyed_at.is_(None))
    .order_by(StoredKey.created_at, StoredKey.handle)
)
_DESTROY = (
    update(StoredKey)
    .where(StoredKey.handle == bindparam("handle"), StoredKey.destroyed_at.is_(None))
    .values(wrapped=b"", destroyed_at=bindparam("now"))
)
_LIVE_KEK_IDS = select(StoredKey.kek_id).where(StoredKey.destroyed_at.is_(None)).distinct()
#: the rows of the keys the open unit of work made (Database.open_work_info): a key made
#: and used in one transaction, a TMK and its wrap, is not read back
_MADE_IN_TRANSACTION = "keystore.soft.made"


class _LRU:
    """A small thread-safe LRU of unwrapped key material."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[_CacheKey, tuple[str, Material]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: _CacheKey) -> Material | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: _CacheKey, handle: str, material: Material) -> None:
        if self._size <= 0:
            return
        with self._lock:
            self._items[key] = (handle, material)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def forget(self, handle: str) -> None:
        with self._lock:
            for key in [k for k, (h, _) in self._items.items() if h == handle]:
                del self._items[key]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class SoftKeyStore(KeyStore):
    backend = "soft"
    #: prefix of the handles of keys this store makes
    handle_prefix = HANDLE_PREFIX
    #: prefixes of the handles of rows this store serves
    handle_prefixes: tuple[str, ...] = (HANDLE_PREFIX,)

    def __init__(
        self,
        db: Database,
        master: Keyring,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._db = db
        self._master = master
        self._cache = _LRU(cache_size)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._master_lock = threading.Lock()

    @property
    def master(self) -> Keyring:
        return self._master

    # -- creating keys -----------------------------------------------------------------

    def generate(
        self, algorithm: KeyAlgorithm, usage: KeyUsage, *, label: str = "", exportable: bool = False
    ) -> KeyInfo:
        policy.check_new_key(algorithm, usage, label)
        material: Material
        if algorithm.is_asymmetric:
            material = crypto.generate_private_key(algorithm)
        else:
            material = _random_secret(algorithm)
        return self._store(algorithm, material, usage, label, exportable)

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
        parsed = _parse_material(algorithm, material)
        return self._store(algorithm, parsed, usage, label, exportable)

    def _store(
        self,
        algorithm: KeyAlgorithm,
        material: Material,
        usage: KeyUsage,
        label: str,
        exportable: bool,
    ) -> KeyInfo:
        public_der = None
        if not isinstance(material, bytes):
            public_der = crypto.public_key_to_der(material.public_key())
        row = self._new_row(algorithm, usage, label, exportable, public_der)
        kek_id, wrapped = self._master.seal(_material_bytes(material), row.binding())
        row = replace(row, wrapped=wrapped, kek_id=kek_id)
        self._insert(row)
        self._cache.put(row.cache_key(), row.handle, material)  # a new key is used at once
        return self._info(row)

    def _new_row(
        self,
        algorithm: KeyAlgorithm,
        usage: KeyUsage,
        label: str,
        exportable: bool,
        public_der: bytes | None,
    ) -> _Row:
        """A row for a new key, its material not wrapped yet."""
        return _Row(
            handle=self.handle_prefix + uuid.uuid4().hex,
            algorithm=algorithm,
            usage=usage,
            exportable=exportable,
            label=label,
            created_at=self._clock(),
            public_key_der=public_der,
            wrapped=b"",
            kek_id="",
        )

    def _insert(self, row: _Row) -> None:
        # Joins the caller's unit of work if there is one: the key then exists only if
        # that work commits.
        with self._db.work() as work:
            work.run(
                _INSERT_KEY,
                handle=row.handle,
                algorithm=row.algorithm.value,
                usage=row.usage.value,
                exportable=row.exportable,
                label=row.label,
                created_at=row.created_at,
                public_key_der=row.public_key_der,
                wrapped=row.wrapped,
                kek_id=row.kek_id,
            )
            work.info.setdefault(_MADE_IN_TRANSACTION, {})[row.handle] = row

    def _info(self, row: _Row) -> KeyInfo:
        return row.info(self.backend)

    # -- reading -----------------------------------------------------------------------

    def info(self, handle: str) -> KeyInfo:
        return self._info(self._row(handle))

    def list(self) -> list[KeyInfo]:
        rows = self._db.read(lambda reads: reads.all(_LIST_LIVE))
        return [self._info(_to_row(r)) for r in rows]

    def public_key(self, handle: str) -> PublicKey:
        row = self._row(handle)
        if row.public_key_der is None:
            raise InvalidInput(f"key {handle} is a secret key and has no public key")
        # from the authenticated material, not the row's public key column
        return _private(row, self._material(row, "public-key")).public_key()

    def _row(self, handle: str) -> _Row:
        if not isinstance(handle, str) or not handle.startswith(self.handle_prefixes):
            raise KeyNotFound(f"no key has handle {handle!r}")
        made = self._db.open_work_info()
        if made is not None and (new := made.get(_MADE_IN_TRANSACTION, {}).get(handle)):
            return cast(_Row, new)  # nobody else sees it before the transaction commits
        found = self._db.read(lambda reads: reads.one(_SELECT_LIVE, handle=handle))
        if found is None:
            raise KeyNotFound(f"no key has handle {handle!r}")
        return _to_row(found)

    def _use(self, handle: str, needed: KeyUsage, operation: str) -> tuple[_Row, Material]:
        row = self._checked(handle, needed)
        return row, self._material(row, operation)

    def _checked(self, handle: str, needed: KeyUsage) -> _Row:
        row = self._row(handle)
        policy.require(handle, row.usage, needed)
        return row

    def _material(self, row: _Row, operation: str = "") -> Material:
        """The key in process memory, for ``operation`` (cached per process here; the
        sealed store of the PKCS#11 backend keeps nothing)."""
        cache_key = row.cache_key()
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        plain = self._open(row, row.binding())
        material = _load_material(row.algorithm, plain)
        self._cache.put(cache_key, row.handle, material)
        return material

    def _open(self, row: _Row, aad: bytes) -> bytes:
        master = self._master
        if not master.has(row.kek_id):
            # Another process may have rotated the master key file under us.
            with self._master_lock:
                self._master = master = self._master.reload()
        return master.open(row.kek_id, row.wrapped, aad)

    # -- private and secret operations -------------------------------------------------
    #
    # Each public operation checks the key's row and usage, then calls a ``_do_*`` hook
    # with the row: the sealed store of the PKCS#11 backend overrides the hooks to run what
    # the token can run inside it.

    def sign(self, handle: str, data: bytes) -> bytes:
        return self._do_sign(self._checked(handle, KeyUsage.SIGN), data)

    def _do_sign(self, row: _Row, data: bytes) -> bytes:
        key = _private(row, self._material(row, custody.SIGN))
        return crypto.suite_for_algorithm(row.algorithm).sign(key, data)

    def decrypt(self, handle: str, ciphertext: bytes, *, info: bytes = b"") -> bytes:
        return self._do_decrypt(self._checked(handle, KeyUsage.DECRYPT), ciphertext, info)

    def _do_decrypt(self, row: _Row, ciphertext: bytes, info: bytes) -> bytes:
        key = self._material(row, custody.DECRYPT)
        if isinstance(key, bytes):
            return secret_ops.aead_open(row.algorithm, key, ciphertext, info)
        return crypto.suite_for_algorithm(row.algorithm).kem_unwrap(key, ciphertext, info)

    def encrypt(self, handle: str, plaintext: bytes, *, info: bytes = b"") -> bytes:
        return self._do_encrypt(self._checked(handle, KeyUsage.ENCRYPT), plaintext, info)

    def _do_encrypt(self, row: _Row, plaintext: bytes, info: bytes) -> bytes:
        key = _secret(row, self._material(row, custody.ENCRYPT))
        return secret_ops.aead_seal(row.algorithm, key, plaintext, info)

    def mac(self, handle: str, data: bytes) -> bytes:
        return self._do_mac(self._checked(handle, KeyUsage.MAC), data)

    def _do_mac(self, row: _Row, data: bytes) -> bytes:
        return secret_ops.mac(row.algorithm, _secret(row, self._material(row, custody.MAC)), data)

    def wrap(self, handle: str, *, under: str | PublicKey, info: bytes = b"") -> bytes:
        if under == handle:
            raise InvalidInput("a key cannot be wrapped under itself")
        row = self._checked(handle, KeyUsage.WRAPPABLE)
        if not isinstance(under, str):
            return self._do_wrap_to(row, under, info)
        kek_row = self._checked(under, KeyUsage.WRAP)
        _require_key_wrap(kek_row)
        if info:  # checked before any key is unwrapped
            raise InvalidInput("AES key wrap (RFC 5649) cannot bind info; pass info=b''")
        material = _material_bytes(self._material(row, custody.WRAP))
        kek = _secret(kek_row, self._material(kek_row, custody.KEY_WRAP))
        return secret_ops.key_wrap(kek, material, info)

    def _do_wrap_to(self, row: _Row, recipient: PublicKey, info: bytes) -> bytes:
        """Key transport of ``row``'s key to a public key (the recipient's suite)."""
        suite = crypto.suite_for_algorithm(crypto.algorithm_of(recipient))
        material = _material_bytes(self._material(row, custody.WRAP))
        return suite.kem_wrap(recipient, material, info)

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
        policy.check_new_key(algorithm, usage, label)
        kek_row, kek = self._use(wrapping_handle, KeyUsage.UNWRAP, custody.UNWRAP)
        if isinstance(kek, bytes):
            _require_key_wrap(kek_row)
            plain = secret_ops.key_unwrap(kek, wrapped, info)
            if algorithm.is_asymmetric:
                plain = secret_ops.strip_der_zero_padding(plain)
        else:
            suite = crypto.suite_for_algorithm(kek_row.algorithm)
            plain = suite.kem_unwrap(kek, wrapped, info)
        return self._store(algorithm, _parse_material(algorithm, plain), usage, label, exportable)

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
        policy.check_new_key(algorithm, usage, label)
        if algorithm.is_asymmetric:
            raise UnsupportedAlgorithm("derive makes secret keys only")
        row, key = self._use(handle, KeyUsage.DERIVE, custody.DERIVE)
        if isinstance(key, bytes):
            if peer_public is not None:
                raise InvalidInput(f"key {handle} is a secret key: derive takes no peer_public")
            secret = key
        else:
            if peer_public is None:
                raise InvalidInput(f"key {handle} is asymmetric: derive needs peer_public")
            secret = crypto.suite_for_algorithm(row.algorithm).key_agreement(key, peer_public)
        derived = secret_ops.hkdf_sha256(secret, info, algorithm.secret_length)
        return self._store(algorithm, derived, usage, label, exportable)

    # -- payment-key operations --------------------------------------------------------

    def kcv(self, handle: str) -> bytes:
        row = self._row(handle)
        policy.require_secret(handle, row.algorithm, "a KCV")
        return self._do_kcv(row)

    def _do_kcv(self, row: _Row) -> bytes:
        return payment_ops.kcv(row.algorithm, _secret(row, self._material(row, custody.KCV)))

    def wrap_tr31(self, handle: str, *, under: str, header: KeyBlockHeader) -> str:
        if under == handle:
            raise InvalidInput("a key cannot be wrapped under itself")
        row = self._checked(handle, KeyUsage.WRAPPABLE)
        kbpk_row = self._checked(under, KeyUsage.WRAP)
        payment_ops.check_tr31_header(row.algorithm, kbpk_row.algorithm, header)
        kbpk = _secret(kbpk_row, self._material(kbpk_row, custody.TR31))
        return tr31.wrap(kbpk, header, _secret(row, self._material(row, custody.TR31)))

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
        kbpk_row = self._checked(under, KeyUsage.UNWRAP)
        if kbpk_row.algorithm not in payment_ops.TR31_VERSION:
            raise UnsupportedAlgorithm(
                f"{kbpk_row.algorithm.value} keys cannot protect TR-31 blocks"
            )
        kbpk = _secret(kbpk_row, self._material(kbpk_row, custody.TR31))
        header, key = payment_ops.unwrap_tr31(kbpk, block, expected_usage, expected_modes)
        algorithm = payment_ops.algorithm_of_block_key(header, key)
        policy.check_new_key(algorithm, usage, label)
        policy.check_secret(algorithm, key)
        return header, self._store(algorithm, key, usage, label, exportable=False)

    def block_cipher(
        self, handle: str, data: bytes, *, decrypt: bool, mode: str = "ecb", iv: bytes = b""
    ) -> bytes:
        row = self._checked(handle, KeyUsage.DECRYPT if decrypt else KeyUsage.ENCRYPT)
        return self._do_block_cipher(row, data, decrypt, mode, iv)

    def _do_block_cipher(
        self, row: _Row, data: bytes, decrypt: bool, mode: str, iv: bytes
    ) -> bytes:
        key = _secret(row, self._material(row, custody.BLOCK_CIPHER))
        return payment_ops.block_cipher(row.algorithm, key, data, decrypt=decrypt, mode=mode, iv=iv)

    def export(self, handle: str) -> bytes:
        row = self._row(handle)
        if not row.exportable:
            raise KeyNotExportable(f"key {handle} is not exportable")
        return _material_bytes(self._material(row, custody.EXPORT))

    def destroy(self, handle: str) -> None:
        with self._db.work() as work:
            destroyed = work.run(_DESTROY, handle=handle, now=self._clock())
            work.checkpoint_after_commit()  # the WAL's copies of the wrapped key go too
        if not destroyed:
            raise KeyNotFound(f"no key has handle {handle!r}")
        self._cache.forget(handle)

    def ping(self) -> None:
        self.check_master_key()

    def check_master_key(self) -> None:
        """Raise MasterKeyError unless every live key's master key is loaded."""
        used = self._db.read(lambda reads: reads.all(_LIVE_KEK_IDS))
        missing = sorted(row.kek_id for row in used if not self._master.has(row.kek_id))
        if missing:
            raise MasterKeyError(
                f"stored keys are wrapped under master keys {', '.join(missing)}, which are"
                f" not loaded (loaded: {', '.join(self._master.kek_ids)})"
            )


# -- helpers ---------------------------------------------------------------------------


def _to_row(r: _SelectedRow) -> _Row:
    created_at: datetime = r.created_at
    if created_at.tzinfo is None:  # SQLite drops the zone; we always store UTC
        created_at = created_at.replace(tzinfo=UTC)
    try:
        algorithm = KeyAlgorithm(r.algorithm)
    except ValueError:
        raise InvalidKey(f"key {r.handle} has an unknown algorithm") from None
    return _Row(
        handle=r.handle,
        algorithm=algorithm,
        usage=KeyUsage(r.usage & _ALL_USAGE),
        exportable=bool(r.exportable),
        label=r.label,
        created_at=created_at,
        public_key_der=r.public_key_der,
        wrapped=r.wrapped,
        kek_id=r.kek_id,
    )


_ALL_USAGE = sum(flag.value for flag in KeyUsage)


def _random_secret(algorithm: KeyAlgorithm) -> bytes:
    while True:
        secret = secrets.token_bytes(algorithm.secret_length)
        try:
            policy.check_secret(algorithm, secret)
        except InvalidKey:  # degenerate TDES, astronomically unlikely
            continue
        return secret


def _parse_material(algorithm: KeyAlgorithm, material: bytes) -> Material:
    """Imported bytes as a key object (asymmetric) or checked secret bytes."""
    if not isinstance(material, bytes):
        raise InvalidInput("key material must be bytes")
    if not algorithm.is_asymmetric:
        policy.check_secret(algorithm, material)
        return material
    if algorithm is KeyAlgorithm.SM2 and len(material) == SM2_RAW_SIZE:
        return SM2PrivateKey.from_bytes(material)
    key = crypto.load_private_key(material)
    if crypto.algorithm_of(key) is not algorithm:
        raise InvalidKey(f"the key material is not an {algorithm.value} private key")
    return key


def _load_material(algorithm: KeyAlgorithm, plain: bytes) -> Material:
    if algorithm.is_asymmetric:
        return crypto.load_private_key(plain)
    return plain


def _material_bytes(material: Material) -> bytes:
    if isinstance(material, bytes):
        return material
    return crypto.private_key_to_der(material)


def _private(row: _Row, key: Material) -> PrivateKey:
    if isinstance(key, bytes):
        raise UnsupportedAlgorithm(f"key {row.handle} is {row.algorithm.value}, not a private key")
    return key


def _secret(row: _Row, key: Material) -> bytes:
    if not isinstance(key, bytes):
        raise UnsupportedAlgorithm(f"key {row.handle} is {row.algorithm.value}, not a secret key")
    return key


def _require_key_wrap(row: _Row) -> None:
    if row.algorithm not in policy.KEY_WRAP_ALGORITHMS:
        raise UnsupportedAlgorithm(
            f"key {row.handle} is {row.algorithm.value}; key wrapping (RFC 5649) needs an AES key"
        )
