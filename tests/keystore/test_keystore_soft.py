"""The soft store: what its database rows protect, and several nodes on one database."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.crypto import KeyAlgorithm, load_private_key, suite_for_algorithm
from trustfleet.errors import KeyNotFound, MasterKeyError
from trustfleet.keystore.base import KeyUsage
from trustfleet.keystore.master import KeyIntegrityError, MasterKey, MasterKeyring
from trustfleet.keystore.models import StoredKey
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.store import Database

A = KeyAlgorithm
U = KeyUsage


def _set(sessions: sessionmaker[Session], handle: str, **values: object) -> None:
    with sessions() as session, session.begin():
        session.execute(update(StoredKey).where(StoredKey.handle == handle).values(**values))


def _row(sessions: sessionmaker[Session], handle: str) -> StoredKey:
    with sessions() as session:
        row = session.get(StoredKey, handle)
        assert row is not None
        return row


def test_a_flipped_bit_in_the_wrapped_key_is_detected(
    soft_store: SoftKeyStore, sessions: sessionmaker[Session]
) -> None:
    key = soft_store.generate(A.EC_P256, U.SIGN)
    soft_store.sign(key.handle, b"cached now")
    wrapped = _row(sessions, key.handle).wrapped
    _set(sessions, key.handle, wrapped=wrapped[:-1] + bytes([wrapped[-1] ^ 1]))
    with pytest.raises(KeyIntegrityError):
        soft_store.sign(key.handle, b"x")


def test_widening_usage_in_the_database_makes_the_key_unusable(
    soft_store: SoftKeyStore, sessions: sessionmaker[Session]
) -> None:
    key = soft_store.generate(A.AES_256, U.ENCRYPT)
    soft_store.encrypt(key.handle, b"warm the cache")
    _set(sessions, key.handle, usage=(U.ENCRYPT | U.DECRYPT | U.MAC).value)
    with pytest.raises(KeyIntegrityError):
        soft_store.mac(key.handle, b"x")
    with pytest.raises(KeyIntegrityError):
        soft_store.encrypt(key.handle, b"x")  # even the originally allowed use stops


def test_making_a_key_exportable_in_the_database_does_not_export_it(
    soft_store: SoftKeyStore, sessions: sessionmaker[Session]
) -> None:
    key = soft_store.generate(A.HMAC_SHA256, U.MAC)
    soft_store.mac(key.handle, b"cached")
    _set(sessions, key.handle, exportable=True)
    with pytest.raises(KeyIntegrityError):
        soft_store.export(key.handle)


def test_swapping_wrapped_material_between_rows_is_detected(
    soft_store: SoftKeyStore, sessions: sessionmaker[Session]
) -> None:
    weak = soft_store.generate(A.AES_256, U.MAC, exportable=True)
    strong = soft_store.generate(A.AES_256, U.MAC)
    _set(sessions, weak.handle, wrapped=_row(sessions, strong.handle).wrapped)
    with pytest.raises(KeyIntegrityError):
        soft_store.export(weak.handle)


def test_the_database_never_holds_key_material_in_clear(
    soft_store: SoftKeyStore, sessions: sessionmaker[Session], engine: Engine
) -> None:
    secret = bytes(range(100, 132))
    soft_store.import_key(A.HMAC_SHA256, secret, U.MAC)
    key = soft_store.generate(A.EC_P256, U.SIGN, exportable=True)
    private = load_private_key(soft_store.export(key.handle))
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    scalar = private.private_numbers().private_value.to_bytes(32, "big")
    with engine.connect() as connection:
        rows = connection.execute(select(StoredKey.__table__)).all()
    dump = b"".join(bytes(v) if isinstance(v, bytes) else str(v).encode() for r in rows for v in r)
    assert secret not in dump
    assert scalar not in dump
    if engine.dialect.name == "sqlite":
        database_file = Path(str(engine.url.database))
        engine.dispose()
        on_disk = database_file.read_bytes() + _wal(database_file)
        assert secret not in on_disk
        assert scalar not in on_disk


def _wal(database_file: Path) -> bytes:
    wal = database_file.with_name(database_file.name + "-wal")
    return wal.read_bytes() if wal.exists() else b""


def test_destroy_wipes_the_wrapped_material(
    soft_store: SoftKeyStore, sessions: sessionmaker[Session]
) -> None:
    key = soft_store.generate(A.AES_128, U.ENCRYPT)
    soft_store.destroy(key.handle)
    row = _row(sessions, key.handle)
    assert row.wrapped == b""
    assert row.destroyed_at is not None


def test_a_second_node_on_the_same_database_serves_the_same_keys(
    soft_store: SoftKeyStore, db: Database, master: MasterKeyring
) -> None:
    other_node = SoftKeyStore(db, MasterKeyring(list(master.keys)))
    key = soft_store.generate(A.ED25519, U.SIGN)
    signature = other_node.sign(key.handle, b"hello")
    suite_for_algorithm(A.ED25519).verify(soft_store.public_key(key.handle), b"hello", signature)
    assert key.handle in {k.handle for k in other_node.list()}


def test_a_destroy_on_one_node_takes_effect_on_another_at_once(
    soft_store: SoftKeyStore, db: Database, master: MasterKeyring
) -> None:
    other_node = SoftKeyStore(db, master)
    key = soft_store.generate(A.EC_P256, U.SIGN)
    other_node.sign(key.handle, b"cache it on the other node")
    soft_store.destroy(key.handle)
    with pytest.raises(KeyNotFound):
        other_node.sign(key.handle, b"x")


def test_a_store_with_another_master_key_refuses_the_keys(
    soft_store: SoftKeyStore, db: Database
) -> None:
    key = soft_store.generate(A.EC_P256, U.SIGN)
    stranger = SoftKeyStore(db, MasterKeyring([MasterKey.new()]))
    with pytest.raises(MasterKeyError, match="not loaded"):
        stranger.sign(key.handle, b"x")
    with pytest.raises(MasterKeyError):
        stranger.check_master_key()
    soft_store.check_master_key()


def test_a_master_key_with_a_forged_id_cannot_open_the_keys(
    soft_store: SoftKeyStore, db: Database, master: MasterKeyring
) -> None:
    key = soft_store.generate(A.EC_P256, U.SIGN)
    impostor = MasterKey(master.active.kek_id, bytes(32))  # right id, wrong key
    with pytest.raises(KeyIntegrityError):
        SoftKeyStore(db, MasterKeyring([impostor])).sign(key.handle, b"x")


def test_the_cache_is_bounded(db: Database, master: MasterKeyring) -> None:
    store = SoftKeyStore(db, master, cache_size=2)
    keys = [store.generate(A.HMAC_SHA256, U.MAC) for _ in range(3)]
    tags = [store.mac(k.handle, b"x") for k in keys]
    assert len(store._cache._items) == 2
    assert [store.mac(k.handle, b"x") for k in keys] == tags


def test_errors_never_carry_key_material(soft_store: SoftKeyStore) -> None:
    secret = bytes(range(7, 7 + 31))  # one byte short of AES-256
    with pytest.raises(Exception) as caught:
        soft_store.import_key(A.AES_256, secret, U.MAC)
    message = str(caught.value)
    assert secret.hex() not in message
    assert repr(secret) not in message


def test_postgres_key_reads_survive_a_dropped_connection(
    soft_store: SoftKeyStore, engine: Engine
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("the companion read engine exists only on PostgreSQL")
    from sqlalchemy import text

    from trustfleet.store.driver import read_engine

    key = soft_store.generate(A.EC_P256, U.SIGN)
    soft_store.sign(key.handle, b"opens the pooled read connection")
    reads = read_engine(engine)
    assert reads is not engine and read_engine(engine) is reads
    with reads.connect() as connection:
        pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    soft_store.sign(key.handle, b"after the server dropped it")
    engine.dispose()
    assert reads.pool.checkedin() == 0  # disposed with the main engine


def test_a_key_made_in_a_unit_of_work_exists_only_if_it_commits(
    soft_store: SoftKeyStore, db: Database
) -> None:
    with db.work():
        kept = soft_store.generate(A.AES_128, U.MAC)
        soft_store.mac(kept.handle, b"usable inside the transaction")
    soft_store.mac(kept.handle, b"and after it")
    with pytest.raises(RuntimeError), db.work():
        lost = soft_store.generate(A.AES_128, U.MAC)
        soft_store.mac(lost.handle, b"usable inside the transaction")
        raise RuntimeError("the use case failed after making the key")
    with pytest.raises(KeyNotFound):
        soft_store.mac(lost.handle, b"rolled back with the transaction")
    assert lost.handle not in {k.handle for k in soft_store.list()}


def test_a_key_destroyed_in_a_unit_of_work_that_rolls_back_stays_usable(
    soft_store: SoftKeyStore, db: Database
) -> None:
    key = soft_store.generate(A.AES_128, U.MAC)
    tag = soft_store.mac(key.handle, b"before")
    with pytest.raises(RuntimeError), db.work():
        soft_store.destroy(key.handle)
        with pytest.raises(KeyNotFound):
            soft_store.mac(key.handle, b"destroyed inside the work")
        raise RuntimeError("the use case failed after destroying the key")
    assert soft_store.mac(key.handle, b"before") == tag


def test_inside_a_unit_of_work_only_the_keys_it_made_skip_the_read(
    soft_store: SoftKeyStore, db: Database
) -> None:
    destroyed = soft_store.generate(A.AES_128, U.MAC)
    soft_store.mac(destroyed.handle, b"cached now")
    soft_store.destroy(destroyed.handle)
    with db.work():
        made = soft_store.generate(A.AES_128, U.MAC)
        soft_store.mac(made.handle, b"made here: known without reading it back")
        with pytest.raises(KeyNotFound):
            soft_store.mac(destroyed.handle, b"made before: read, and found destroyed")
    soft_store.destroy(made.handle)
    with db.work(), pytest.raises(KeyNotFound):
        soft_store.mac(made.handle, b"another transaction reads it again")
