"""The master key file and variable, open_keystore, and master key rotation."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.crypto import KeyAlgorithm, suite_for_algorithm
from trustfleet.errors import ConfigurationError, KeyNotFound, MasterKeyError
from trustfleet.keystore import master as master_module
from trustfleet.keystore import open_keystore
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.keystore.master import (
    MASTER_KEY_ENV,
    MasterKey,
    create_master_key_file,
    kek_id_of,
    load_master_keyring,
    read_master_key_file,
    rotate_master_key,
)
from trustfleet.keystore.models import StoredKey
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.settings import Settings
from trustfleet.store import Database

A = KeyAlgorithm
U = KeyUsage


@pytest.fixture(autouse=True)
def _no_master_key_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)


# -- the file --------------------------------------------------------------------------


def test_a_new_master_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "data" / "master.key"
    ring = create_master_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_master_key_file(path).kek_ids == ring.kek_ids
    assert ring.active.kek_id == kek_id_of(ring.active.key)
    with pytest.raises(MasterKeyError, match="already exists"):
        create_master_key_file(path)
    assert read_master_key_file(path).kek_ids == ring.kek_ids
    assert [p.name for p in path.parent.iterdir()] == ["master.key"]  # no temp files left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_master_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    create_master_key_file(path)
    path.chmod(mode)
    with pytest.raises(MasterKeyError, match="chmod 600"):
        read_master_key_file(path)


def test_a_missing_master_key_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError, match="trustfleet init"):
        load_master_keyring(tmp_path / "master.key", environ={})


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not base64 !!",
        base64.b64encode(b"short").decode(),
        json.dumps(
            {"version": 1, "keys": [{"id": "0" * 16, "key": base64.b64encode(bytes(32)).decode()}]}
        ),
        json.dumps({"version": 2, "keys": []}),
        "{not json",
    ],
    ids=["empty", "junk", "short-key", "id-mismatch", "bad-version", "bad-json"],
)
def test_malformed_master_keys_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "master.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(MasterKeyError):
        read_master_key_file(path)
    with pytest.raises(MasterKeyError):
        load_master_keyring(tmp_path / "absent", environ={MASTER_KEY_ENV: content or " x"})


def test_the_variable_takes_precedence_and_accepts_several_keys(tmp_path: Path) -> None:
    file_ring = create_master_key_file(tmp_path / "master.key")
    first, second = MasterKey.new(), MasterKey.new()
    b64 = [base64.b64encode(k.key).decode() for k in (first, second)]
    for value in (
        f"{b64[0]},{b64[1]}",
        f"{first.kek_id}:{b64[0]}\n{b64[1]}",
        master_module.serialise_master_keys([first, second]),
    ):
        ring = load_master_keyring(tmp_path / "master.key", environ={MASTER_KEY_ENV: value})
        assert ring.kek_ids == [first.kek_id, second.kek_id]
        assert ring.active == first
    assert load_master_keyring(tmp_path / "master.key", environ={}).kek_ids == file_ring.kek_ids


def test_the_keyring_never_shows_its_keys() -> None:
    key = MasterKey.new()
    ring = master_module.MasterKeyring([key])
    for text in (repr(key), repr(ring), str(ring)):
        assert base64.b64encode(key.key).decode() not in text
        assert key.key.hex() not in text


# -- open_keystore ---------------------------------------------------------------------


def test_open_keystore_soft_from_the_variable(
    tmp_path: Path, sessions: sessionmaker[Session], db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = MasterKey.new()
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(key.key).decode())
    store = open_keystore(Settings(data_dir=tmp_path), db)
    assert isinstance(store, SoftKeyStore)
    handle = store.generate(A.EC_P256, U.SIGN).handle
    assert _kek_ids(sessions) == {key.kek_id}
    assert not (tmp_path / "master.key").exists()
    store.sign(handle, b"x")


def test_open_keystore_soft_from_the_file(
    tmp_path: Path, sessions: sessionmaker[Session], db: Database
) -> None:
    with pytest.raises(MasterKeyError, match="trustfleet init"):
        open_keystore(Settings(data_dir=tmp_path), db)
    ring = create_master_key_file(tmp_path / "master.key")
    store = open_keystore(Settings(data_dir=tmp_path), db)
    store.generate(A.AES_128, U.ENCRYPT)
    assert _kek_ids(sessions) == {ring.active.kek_id}


def test_open_keystore_refuses_unknown_backends(tmp_path: Path, db: Database) -> None:
    with pytest.raises(ConfigurationError, match="keystore_backend"):
        open_keystore(Settings(data_dir=tmp_path, keystore_backend="vault"), db)
    with pytest.raises(ConfigurationError, match="pkcs11_module"):
        open_keystore(Settings(data_dir=tmp_path, keystore_backend="pkcs11"), db)


# -- rotation --------------------------------------------------------------------------


def _kek_ids(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session:
        return set(
            session.scalars(select(StoredKey.kek_id).where(StoredKey.destroyed_at.is_(None)))
        )


def _populate(store: SoftKeyStore) -> list[Callable[[KeyStore], None]]:
    """Keys of several kinds, and for each a check that exercises it on a given store."""
    checks: list[Callable[[KeyStore], None]] = []
    for algorithm in (A.EC_P256, A.ED25519, A.SM2):
        handle = store.generate(algorithm, U.SIGN).handle
        public = store.public_key(handle)

        def check_sign(
            s: KeyStore, h: str = handle, alg: A = algorithm, p: object = public
        ) -> None:
            suite_for_algorithm(alg).verify(p, b"rotated", s.sign(h, b"rotated"))  # type: ignore[arg-type]

        checks.append(check_sign)
    aead = store.generate(A.AES_256, U.ENCRYPT | U.DECRYPT).handle
    sealed = store.encrypt(aead, b"before rotation", info=b"r")
    checks.append(lambda s: _equal(s.decrypt(aead, sealed, info=b"r"), b"before rotation"))
    mac_key = store.generate(A.HMAC_SHA256, U.MAC).handle
    tag = store.mac(mac_key, b"m")
    checks.append(lambda s: s.mac_verify(mac_key, b"m", tag))
    gone = store.generate(A.AES_128, U.ENCRYPT).handle
    store.destroy(gone)
    return checks


def _equal(a: bytes, b: bytes) -> None:
    assert a == b


def _fresh_store(db: Database, path: Path) -> SoftKeyStore:
    return SoftKeyStore(db, read_master_key_file(path))


def test_rotation_rewraps_every_key_under_a_new_master_key(
    tmp_path: Path, sessions: sessionmaker[Session], db: Database
) -> None:
    path = tmp_path / "master.key"
    old = create_master_key_file(path)
    checks = _populate(SoftKeyStore(db, old))

    report = rotate_master_key(db, path, batch_size=2)

    assert report.rewrapped == len(checks)
    assert report.kek_id != old.active.kek_id
    assert read_master_key_file(path).kek_ids == [report.kek_id]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _kek_ids(sessions) == {report.kek_id}
    fresh = _fresh_store(db, path)
    for check in checks:
        check(fresh)
    old_only = master_module.MasterKeyring(list(old.keys))  # not re-read from the file
    with pytest.raises(MasterKeyError):  # the old key alone opens nothing any more
        checks[0](SoftKeyStore(db, old_only))


def test_a_running_node_follows_a_rotation_of_its_key_file(tmp_path: Path, db: Database) -> None:
    path = tmp_path / "master.key"
    create_master_key_file(path)
    node = SoftKeyStore(db, read_master_key_file(path))
    checks = _populate(node)
    rotate_master_key(db, path)
    for check in checks:
        check(node)  # re-reads the file when it meets the new kek_id


@pytest.mark.parametrize("crash_after", [1, 2, 3, 5])
def test_a_crash_in_the_middle_of_rotation_loses_no_key(
    tmp_path: Path, sessions: sessionmaker[Session], db: Database, crash_after: int
) -> None:
    path = tmp_path / "master.key"
    old = create_master_key_file(path)
    checks = _populate(SoftKeyStore(db, old))

    def crash(rows_done: int) -> None:
        if rows_done == crash_after:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        rotate_master_key(db, path, batch_size=2, after_row=crash)

    on_disk = read_master_key_file(path)
    assert len(on_disk.kek_ids) == 2 and on_disk.kek_ids[1] == old.active.kek_id
    assert _kek_ids(sessions) <= set(on_disk.kek_ids)
    for check in checks:
        check(_fresh_store(db, path))

    report = rotate_master_key(db, path, batch_size=2)
    assert report.rewrapped == len(checks)
    assert read_master_key_file(path).kek_ids == [report.kek_id]
    assert _kek_ids(sessions) == {report.kek_id}
    for check in checks:
        check(_fresh_store(db, path))


def test_a_crash_before_the_old_key_is_dropped_loses_no_key(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "master.key"
    checks = _populate(SoftKeyStore(db, create_master_key_file(path)))
    real_write = master_module.write_master_key_file
    calls = []

    def write_then_crash(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(master_module, "write_master_key_file", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        rotate_master_key(db, path)
    monkeypatch.setattr(master_module, "write_master_key_file", real_write)

    assert len(read_master_key_file(path).kek_ids) == 2
    for check in checks:
        check(_fresh_store(db, path))
    rotate_master_key(db, path)
    for check in checks:
        check(_fresh_store(db, path))


def test_a_failed_file_replace_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys" / "master.key"
    old = create_master_key_file(path)
    checks = _populate(SoftKeyStore(db, old))

    def no_replace(src: object, dst: object) -> None:
        raise OSError("crash during rename")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError, match="rename"):
        rotate_master_key(db, path)
    monkeypatch.undo()
    assert read_master_key_file(path).kek_ids == old.kek_ids
    assert sorted(p.name for p in path.parent.iterdir()) == ["master.key"]
    for check in checks:
        check(_fresh_store(db, path))


def test_rotation_refuses_when_rows_use_a_key_the_file_lacks(tmp_path: Path, db: Database) -> None:
    path = tmp_path / "master.key"
    create_master_key_file(path)
    stranger = master_module.MasterKeyring([MasterKey.new()])
    handle = SoftKeyStore(db, stranger).generate(A.AES_128, U.ENCRYPT).handle
    before = path.read_bytes()
    with pytest.raises(MasterKeyError, match="nothing was changed"):
        rotate_master_key(db, path)
    assert path.read_bytes() == before
    SoftKeyStore(db, stranger).encrypt(handle, b"still works")


def test_rotation_refuses_a_master_key_from_the_environment(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(bytes(range(32))).decode())
    with pytest.raises(MasterKeyError, match=MASTER_KEY_ENV):
        rotate_master_key(db, tmp_path / "master.key")


def test_destroyed_keys_stay_destroyed_through_rotation(tmp_path: Path, db: Database) -> None:
    path = tmp_path / "master.key"
    store = SoftKeyStore(db, create_master_key_file(path))
    handle = store.generate(A.EC_P256, U.SIGN).handle
    store.destroy(handle)
    assert rotate_master_key(db, path).rewrapped == 0
    with pytest.raises(KeyNotFound):
        _fresh_store(db, path).sign(handle, b"x")


def test_open_keystore_refuses_a_master_key_that_opens_no_stored_key(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    SoftKeyStore(db, master_module.MasterKeyring([MasterKey.new()])).generate(A.AES_128, U.ENCRYPT)
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(MasterKey.new().key).decode())
    with pytest.raises(MasterKeyError, match="not loaded"):
        open_keystore(Settings(data_dir=tmp_path), db)


def test_open_keystore_on_a_database_not_yet_migrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trustfleet.store.engine import make_engine

    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(MasterKey.new().key).decode())
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        assert isinstance(
            open_keystore(Settings(data_dir=tmp_path), Database(engine)), SoftKeyStore
        )
    finally:
        engine.dispose()
