"""The soft store's master keys (key-encryption keys, KEKs) and their rotation.

A keyring holds one or more 32-byte AES-256-GCM keys; the first is *active* (it wraps new
keys), the others only unwrap rows not yet re-wrapped. Each key is named by its ``kek_id``,
the first 16 hex digits of its SHA-256, which every stored row records.

Sources, in order: the environment variable ``TRUSTFLEET_MASTER_KEY``, else the master key
file (default ``<data dir>/master.key``, mode 0600; a file readable by group or others is
refused). Both accept the same formats:

* JSON, as written by this module: ``{"version": 1, "keys": [{"id": "<kek_id>",
  "key": "<base64>"}, ...]}`` (active first; each ``id`` must match its key);
* plain text: base64 keys separated by whitespace or commas, active first, each optionally
  prefixed by ``<kek_id>:``.

Rotation (:func:`rotate_master_key`) never leaves a row unreadable, whatever the moment it
stops: the file first gains the new key in front of the old ones, then rows are re-wrapped
(each row's ``wrapped`` and ``kek_id`` change in one UPDATE), and the old keys leave the
file only when no live row still uses them. Running it again after a crash finishes the job.
Several hosts sharing one database must each get the new file (or variable) before the old
key is dropped; nodes sharing the file re-read it when they meet an unknown ``kek_id``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.sql.expression import ClauseElement

from trustfleet.errors import KeyStoreError, MasterKeyError
from trustfleet.keystore.models import StoredKey, row_binding
from trustfleet.store import Database, UnitOfWork
from trustfleet.store.files import atomic_write

MASTER_KEY_ENV = "TRUSTFLEET_MASTER_KEY"
MASTER_KEY_SIZE = 32
NONCE_SIZE = 12
FILE_VERSION = 1


class KeyIntegrityError(KeyStoreError):
    code = "key-integrity-error"
    title = "A stored key failed its integrity check"


def kek_id_of(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class MasterKey:
    kek_id: str
    key: bytes

    def __repr__(self) -> str:  # never show the key
        return f"MasterKey(kek_id={self.kek_id!r})"

    @classmethod
    def new(cls) -> MasterKey:
        return cls.of(secrets.token_bytes(MASTER_KEY_SIZE))

    @classmethod
    def of(cls, key: bytes) -> MasterKey:
        if len(key) != MASTER_KEY_SIZE:
            raise MasterKeyError(f"a master key must be {MASTER_KEY_SIZE} bytes, got {len(key)}")
        return cls(kek_id_of(key), key)


class Keyring(Protocol):
    """What wraps the soft store's rows: the master keyring here, or a key inside a
    PKCS#11 token (:mod:`trustfleet.keystore.pkcs11_seal`)."""

    @property
    def kek_ids(self) -> list[str]: ...

    def has(self, kek_id: str) -> bool: ...

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        """``(kek_id, wrapped)``: ``plaintext`` wrapped and bound to ``aad``."""
        ...

    def open(self, kek_id: str, blob: bytes, aad: bytes) -> bytes:
        """What :meth:`seal` wrapped; KeyIntegrityError if ``blob`` or ``aad`` changed."""
        ...

    def reload(self) -> Keyring:
        """The keyring read again from its source (a key added by another node)."""
        ...


class MasterKeyring:
    """Master keys, active first. Wraps with the active key, unwraps with any of them."""

    def __init__(self, keys: list[MasterKey], *, source: Path | None = None) -> None:
        if not keys:
            raise MasterKeyError("the master keyring holds no key")
        ids = [k.kek_id for k in keys]
        if len(set(ids)) != len(ids):
            raise MasterKeyError("the master keyring lists the same key twice")
        self.keys = tuple(keys)
        #: the file it was read from (None: environment or memory); used by :meth:`reload`
        self.source = source
        self._by_id = {k.kek_id: k for k in keys}

    def __repr__(self) -> str:
        return f"MasterKeyring(kek_ids={self.kek_ids!r}, source={self.source!r})"

    @property
    def active(self) -> MasterKey:
        return self.keys[0]

    @property
    def kek_ids(self) -> list[str]:
        return [k.kek_id for k in self.keys]

    def has(self, kek_id: str) -> bool:
        return kek_id in self._by_id

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        """``(kek_id, nonce || AES-256-GCM ciphertext)`` under the active key."""
        nonce = os.urandom(NONCE_SIZE)
        return self.active.kek_id, nonce + AESGCM(self.active.key).encrypt(nonce, plaintext, aad)

    def open(self, kek_id: str, blob: bytes, aad: bytes) -> bytes:
        key = self._by_id.get(kek_id)
        if key is None:
            raise MasterKeyError(
                f"a stored key is wrapped under master key {kek_id}, which is not loaded"
                f" (loaded: {', '.join(self.kek_ids)}); use the master key of this database"
            )
        try:
            return AESGCM(key.key).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
        except (InvalidTag, ValueError):
            raise KeyIntegrityError(
                "a stored key does not authenticate under its master key: its row was"
                " modified (material, algorithm, usage or exportability)"
            ) from None

    def reload(self) -> MasterKeyring:
        """The keyring read again from its source (itself when it has no file)."""
        if self.source is None:
            return self
        return read_master_key_file(self.source)


# -- parsing and serialising -----------------------------------------------------------


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MasterKeyError("a master key is not valid base64") from None


def _checked(kek_id: str | None, key: bytes) -> MasterKey:
    master = MasterKey.of(key)
    if kek_id is not None and kek_id.lower() != master.kek_id:
        raise MasterKeyError(f"master key listed as {kek_id} does not match its id")
    return master


def _parse_json(text: str) -> list[MasterKey]:
    try:
        doc = json.loads(text)
        entries = doc["keys"]
        if doc.get("version") != FILE_VERSION or not isinstance(entries, list):
            raise MasterKeyError("unsupported master key file version")
        return [_checked(str(e["id"]), _b64(str(e["key"]))) for e in entries]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise MasterKeyError("the master keys are not in the expected JSON shape") from None


def _parse_plain(text: str) -> list[MasterKey]:
    keys = []
    for token in text.replace(",", " ").split():
        kek_id, _, encoded = token.rpartition(":")
        keys.append(_checked(kek_id or None, _b64(encoded)))
    return keys


def parse_master_keys(text: str, *, source: Path | None = None) -> MasterKeyring:
    stripped = text.strip()
    keys = _parse_json(stripped) if stripped.startswith("{") else _parse_plain(stripped)
    return MasterKeyring(keys, source=source)


def serialise_master_keys(keys: list[MasterKey]) -> str:
    entries = [{"id": k.kek_id, "key": base64.b64encode(k.key).decode()} for k in keys]
    return json.dumps({"version": FILE_VERSION, "keys": entries}, indent=2) + "\n"


# -- the file --------------------------------------------------------------------------


def read_master_key_file(path: Path) -> MasterKeyring:
    try:
        with path.open("r", encoding="utf-8") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise MasterKeyError(
                    f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):o});"
                    f" run: chmod 600 {path}"
                )
            text = handle.read()
    except FileNotFoundError:
        raise MasterKeyError(
            f"no master key: {path} does not exist and {MASTER_KEY_ENV} is not set;"
            " run `trustfleet init` to create one"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MasterKeyError(f"cannot read the master key file {path}: {exc}") from None
    return parse_master_keys(text, source=path)


def write_master_key_file(path: Path, keys: list[MasterKey], *, exclusive: bool = False) -> None:
    """Replace ``path`` atomically (owner-only; see :func:`trustfleet.store.files.atomic_write`).

    ``exclusive``: fail with MasterKeyError instead of replacing an existing file.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = serialise_master_keys(keys).encode()
    try:
        atomic_write(path, data, exclusive=exclusive)
    except FileExistsError:
        raise MasterKeyError(f"{path} already exists; not overwriting it") from None


def create_master_key_file(path: Path) -> MasterKeyring:
    """A new file with one fresh master key (mode 0600); never overwrites an existing one."""
    key = MasterKey.new()
    write_master_key_file(path, [key], exclusive=True)
    return MasterKeyring([key], source=path)


def load_master_keyring(path: Path, environ: Mapping[str, str] | None = None) -> MasterKeyring:
    """``TRUSTFLEET_MASTER_KEY`` if set, else the file at ``path``."""
    env = os.environ if environ is None else environ
    value = env.get(MASTER_KEY_ENV, "")
    if value.strip():
        return parse_master_keys(value)
    return read_master_key_file(path)


# -- rotation --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RotationReport:
    rewrapped: int
    kek_id: str


def rotate_master_key(
    db: Database,
    master_key_path: Path,
    *,
    batch_size: int = 100,
    after_row: Callable[[int], None] | None = None,
) -> RotationReport:
    """Re-wrap every live key of the soft store under a fresh master key.

    ``after_row(n)`` is called after the n-th re-wrapped row is written, before its batch
    commits (tests inject crashes there). Safe to interrupt anywhere and to run again.
    """
    if os.environ.get(MASTER_KEY_ENV, "").strip():
        raise MasterKeyError(
            f"the master key comes from {MASTER_KEY_ENV}; rotation rewrites the master key"
            " file, so unset the variable (or move its value into the file) first"
        )
    current = read_master_key_file(master_key_path)
    _check_rows_readable(db, current)
    new = MasterKey.new()
    keyring = MasterKeyring([new, *current.keys], source=master_key_path)
    write_master_key_file(master_key_path, list(keyring.keys))
    rewrapped = rewrap_all(db, keyring, keyring.active.kek_id, batch_size, after_row)
    if db.read(lambda reads: reads.scalar(_LIVE_NOT_UNDER, kek_id=new.kek_id)):
        raise MasterKeyError("keys were added under an old master key during rotation; run again")
    write_master_key_file(master_key_path, [new])
    return RotationReport(rewrapped=rewrapped, kek_id=new.kek_id)


_LIVE = StoredKey.destroyed_at.is_(None)
_LIVE_KEK_IDS = select(StoredKey.kek_id).where(_LIVE).distinct()
_LIVE_NOT_UNDER = (
    select(func.count())
    .select_from(StoredKey)
    .where(_LIVE, StoredKey.kek_id != bindparam("kek_id"))
)
_NOT_UNDER_ACTIVE = (
    select(
        StoredKey.handle,
        StoredKey.algorithm,
        StoredKey.usage,
        StoredKey.exportable,
        StoredKey.public_key_der,
        StoredKey.wrapped,
        StoredKey.kek_id,
    )
    .where(_LIVE, StoredKey.kek_id != bindparam("active"))
    .order_by(StoredKey.handle)
)
#: compare-and-set: a row destroyed or changed meanwhile by another node is left alone
_REWRAP = (
    update(StoredKey)
    .where(
        StoredKey.handle == bindparam("handle"),
        StoredKey.kek_id == bindparam("old_kek_id"),
        StoredKey.wrapped == bindparam("old_wrapped"),
        _LIVE,
    )
    .values(kek_id=bindparam("new_kek_id"), wrapped=bindparam("new_wrapped"))
)


def _check_rows_readable(db: Database, keyring: MasterKeyring) -> None:
    used = db.read(lambda reads: reads.all(_LIVE_KEK_IDS))
    missing = sorted(row.kek_id for row in used if not keyring.has(row.kek_id))
    if missing:
        raise MasterKeyError(
            f"stored keys use master keys {', '.join(missing)} that the file does not hold;"
            " nothing was changed"
        )


def rewrap_all(
    db: Database,
    keyring: Keyring,
    active: str,
    batch_size: int,
    after_row: Callable[[int], None] | None,
) -> int:
    """Re-wrap every live row not under ``active`` (the kek_id ``keyring.seal`` uses), in
    batches, each row by compare-and-set; the number re-wrapped."""
    done = 0
    skipped: set[str] = set()
    while True:
        with db.work() as work:
            batch = work.all(_batch_query(skipped, batch_size), active=active)
            for row in batch:
                if _rewrap_row(work, keyring, row):
                    done += 1
                    if after_row is not None:
                        after_row(done)
                else:
                    skipped.add(row.handle)
        if not batch:
            return done


def _batch_query(skipped: set[str], batch_size: int) -> ClauseElement:
    query = _NOT_UNDER_ACTIVE.limit(batch_size)
    return query.where(StoredKey.handle.not_in(skipped)) if skipped else query


def _rewrap_row(work: UnitOfWork, keyring: Keyring, row: Any) -> bool:
    """Re-wrap one row unless another node destroyed or changed it meanwhile."""
    aad = row_binding(row.handle, row.algorithm, row.usage, row.exportable, row.public_key_der)
    try:
        material = keyring.open(row.kek_id, row.wrapped, aad)
    except KeyIntegrityError:
        raise KeyIntegrityError(
            f"stored key {row.handle} fails its integrity check; rotation stopped (the keys"
            " re-wrapped so far stay readable)"
        ) from None
    kek_id, wrapped = keyring.seal(material, aad)
    changed = work.run(
        _REWRAP,
        handle=row.handle,
        old_kek_id=row.kek_id,
        old_wrapped=row.wrapped,
        new_kek_id=kek_id,
        new_wrapped=wrapped,
    )
    return changed > 0
