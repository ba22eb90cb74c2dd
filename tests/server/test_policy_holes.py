"""Policy holes of issue 12, each closed and each with a test that failed before:

1. the key server's CA (KSRCRT) issues nothing through the generic issuing route: only the
   work certificate, by the TMK flow, for a key the key store holds;
2. the last live admin token cannot be revoked (nobody would be left to administer);
3. the data directory and its files are owner-only, and ``serve`` refuses a directory
   other users can read;
4. a destroyed key's wrapped copy is gone from the SQLite files (secure delete, then a WAL
   checkpoint), not left in the WAL until some later checkpoint.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import KeyNotFound, TrustfleetError
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.keystore.models import StoredKey
from trustfleet.pki.service import PkiService
from trustfleet.server.auth import create_token, revoke_token
from trustfleet.server.models import ApiToken
from trustfleet.settings import Settings
from trustfleet.store import Database
from trustfleet.tmk.identity import KSRCRT_CA, WORK_CERT_NAME, IdentityService

from .conftest import assert_problem, bearer

# --- 1. the key server's CA issues only the work certificate ------------------------------


def _outside_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _identity(db: Database, keystore: KeyStore) -> IdentityService:
    return IdentityService(db, keystore, PkiService(db, keystore))


def test_the_key_server_ca_refuses_a_certificate_for_an_outside_key(
    client: TestClient, db: Database, keystore: KeyStore, tokens: dict[str, str]
) -> None:
    _identity(db, keystore).ensure(actor="test")
    key = _outside_key_pem()
    request = {"kind": "server", "public_key_pem": key, "dns_names": [WORK_CERT_NAME]}
    refused = client.post(
        f"/v1/ca/{KSRCRT_CA}/issue", json=request, headers=bearer(tokens["admin"])
    )
    body = assert_problem(refused, 403, "ca-restricted")
    assert KSRCRT_CA in body["detail"]
    device = {"kind": "device", "public_key_pem": _outside_key_pem(), "device_id": "pos-1"}
    refused = client.post(f"/v1/ca/{KSRCRT_CA}/issue", json=device, headers=bearer(tokens["admin"]))
    assert_problem(refused, 403, "ca-restricted")
    listed = client.get("/v1/ca", headers=bearer(tokens["admin"])).json()
    assert {ca["name"]: ca["restricted"] for ca in listed} == {KSRCRT_CA: True}


def test_the_key_server_ca_refuses_generic_issuance_in_the_service_too(
    db: Database, keystore: KeyStore
) -> None:
    _identity(db, keystore).ensure(actor="test")
    pki = PkiService(db, keystore)
    refusals = [
        lambda: pki.issue_server_certificate(
            KSRCRT_CA, public_key=_outside_key_pem(), dns_names=[WORK_CERT_NAME]
        ),
        lambda: pki.issue_device_certificate(KSRCRT_CA, "pos-1", public_key=_outside_key_pem()),
        lambda: pki.create_intermediate_ca("below-ksrcrt", KSRCRT_CA),
    ]
    for refusal in refusals:
        with pytest.raises(TrustfleetError) as refused:
            refusal()
        assert refused.value.code == "ca-restricted"
    # the held-key path takes a key store handle, never a key from outside
    with pytest.raises(KeyNotFound):
        pki.issue_server_certificate_for_held_key(
            KSRCRT_CA, "soft:no-such-key", dns_names=[WORK_CERT_NAME], actor="test"
        )


def test_the_tmk_flow_still_issues_and_rotates_the_work_certificate(
    db: Database, keystore: KeyStore
) -> None:
    identity = _identity(db, keystore)
    first = identity.ensure(actor="test")
    second = identity.rotate(actor="test")
    assert first.serial_hex != second.serial_hex
    held = keystore.public_key(second.work_key_handle)
    assert second.certificate.public_key() == held


def test_other_cas_still_issue_for_outside_keys(
    client: TestClient, db: Database, keystore: KeyStore, tokens: dict[str, str]
) -> None:
    PkiService(db, keystore).create_root_ca("open-root")
    request = {"kind": "server", "public_key_pem": _outside_key_pem(), "dns_names": ["a.example"]}
    issued = client.post("/v1/ca/open-root/issue", json=request, headers=bearer(tokens["admin"]))
    assert issued.status_code == 201, issued.text


# --- 2. the last admin token stays ----------------------------------------------------------


def test_an_admin_cannot_revoke_the_last_admin_token(
    client: TestClient, db: Database, tokens: dict[str, str]
) -> None:
    admin_id = client.get("/v1/whoami", headers=bearer(tokens["admin"])).json()["token_id"]
    refused = client.delete(f"/v1/tokens/{admin_id}", headers=bearer(tokens["admin"]))
    body = assert_problem(refused, 409, "last-admin-token")
    assert "admin" in body["detail"]
    assert client.get("/v1/whoami", headers=bearer(tokens["admin"])).status_code == 200


def test_an_admin_token_goes_when_another_live_one_stays(
    client: TestClient, db: Database, tokens: dict[str, str]
) -> None:
    second, info = create_token(db, "second admin", "admin")
    first_id = client.get("/v1/whoami", headers=bearer(tokens["admin"])).json()["token_id"]
    assert client.delete(f"/v1/tokens/{first_id}", headers=bearer(second)).status_code == 200
    refused = client.delete(f"/v1/tokens/{info.id}", headers=bearer(second))
    assert_problem(refused, 409, "last-admin-token")


def test_revoked_and_expired_admin_tokens_do_not_count(db: Database) -> None:
    _, live = create_token(db, "live admin", "admin")
    _, expired = create_token(db, "expired admin", "admin")
    _, revoked = create_token(db, "revoked admin", "admin")
    revoke_token(db, revoked.id)
    past = datetime.now(UTC) - timedelta(days=1)
    with db.engine.begin() as connection:
        connection.execute(
            update(ApiToken).where(ApiToken.id == expired.id).values(expires_at=past)
        )
    with pytest.raises(TrustfleetError) as refused:
        revoke_token(db, live.id)
    assert (refused.value.code, refused.value.status) == ("last-admin-token", 409)
    # an expired admin token can be revoked: it changes nothing about who can administer
    assert revoke_token(db, expired.id).revoked_at is not None


def test_two_revocations_of_the_last_two_admins_cannot_both_succeed(db: Database) -> None:
    ids = [create_token(db, f"admin {n}", "admin")[1].id for n in range(2)]
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def revoke(token_id: int) -> None:
        barrier.wait()
        try:
            revoke_token(db, token_id)
            outcomes.append("revoked")
        except Exception as refused:  # the test shows what it was
            outcomes.append(getattr(refused, "code", repr(refused)))

    threads = [threading.Thread(target=revoke, args=(token_id,)) for token_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["last-admin-token", "revoked"]
    with db.engine.connect() as connection:
        live = connection.execute(
            select(ApiToken.id).where(ApiToken.role == "admin", ApiToken.revoked_at.is_(None))
        ).all()
    assert len(live) == 1


# --- 3. the data directory is owner-only ------------------------------------------------------


@pytest.fixture
def loose_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_the_data_directory_and_every_file_owner_only(
    tmp_path: Path, loose_umask: None
) -> None:
    from trustfleet.bootstrap import initialise

    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)  # noqa: S103 (an existing directory other users can read)
    initialise(Settings(data_dir=data_dir))
    assert _mode(data_dir) == 0o700
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"trustfleet.db", "master.key", "root.pem", "intermediate.pem"} <= names
    assert "trustfleet.db-wal" in names
    loose = {str(p.relative_to(data_dir)): oct(_mode(p)) for p in files if _mode(p) & 0o077}
    assert loose == {}
    directories = [p for p in data_dir.rglob("*") if p.is_dir()]
    assert {str(p): oct(_mode(p)) for p in directories if _mode(p) & 0o077} == {}


def _initialised(tmp_path: Path) -> Settings:
    from trustfleet.bootstrap import initialise

    settings = Settings(data_dir=tmp_path / "data")
    initialise(settings)
    return settings


def test_serve_refuses_a_data_directory_other_users_can_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trustfleet.server import runner

    settings = _initialised(tmp_path)
    os.chmod(settings.data_dir, 0o755)  # noqa: S103 (the hole under test)

    def bind(host: str, port: int) -> None:
        raise AssertionError("serve went on to listen")

    monkeypatch.setattr(runner, "bind", bind)
    with pytest.raises(TrustfleetError) as refused:
        runner.serve(settings)
    assert refused.value.code == "data-dir-permissions"
    assert f"chmod 700 {settings.data_dir}" in str(refused.value.extra.get("hint"))


def test_the_app_factory_refuses_it_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trustfleet.server import runner

    settings = _initialised(tmp_path)
    os.chmod(settings.data_dir, 0o750)  # noqa: S103 (the hole under test)
    monkeypatch.setenv("TRUSTFLEET_DATA_DIR", str(settings.data_dir))
    with pytest.raises(TrustfleetError) as refused:
        runner.app_from_env()
    assert refused.value.code == "data-dir-permissions"


# --- 4. destroyed keys leave no wrapped copy in the SQLite files ------------------------------


def _sqlite_files(db: Database) -> list[Path]:
    database = Path(str(db.engine.url.database))
    return [p for p in (database, Path(f"{database}-wal"), Path(f"{database}-shm")) if p.exists()]


def _wrapped(db: Database, handle: str) -> bytes:
    with db.engine.connect() as connection:
        wrapped = connection.execute(
            select(StoredKey.wrapped).where(StoredKey.handle == handle)
        ).scalar_one()
    assert isinstance(wrapped, bytes)
    return wrapped


@pytest.mark.parametrize("checkpointed_before", [False, True])
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_destroyed_keys_wrapped_copy_is_gone_from_the_database_files(
    db: Database, keystore: KeyStore, checkpointed_before: bool
) -> None:
    with db.engine.connect() as connection:  # (Debian's SQLite has it on by default)
        assert connection.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
    material = bytes(range(32))  # recognisable, and its wrapped form is what we look for
    info = keystore.import_key(KeyAlgorithm.AES_256, material, KeyUsage.ENCRYPT)
    wrapped = _wrapped(db, info.handle)
    assert len(wrapped) > len(material)
    assert any(wrapped in p.read_bytes() for p in _sqlite_files(db))  # the scan can see it
    if checkpointed_before:  # as SQLite's automatic checkpoint may have done already
        assert db.checkpoint()
        assert wrapped in Path(str(db.engine.url.database)).read_bytes()
    keystore.destroy(info.handle)
    assert _wrapped(db, info.handle) == b""
    assert db.wait_for_checkpoint(timeout=30)  # asked by the destruction, run on a thread
    found = [p.name for p in _sqlite_files(db) if wrapped in p.read_bytes()]
    assert found == []
    assert not any(material in p.read_bytes() for p in _sqlite_files(db))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_keys_destroyed_after_a_commit_leave_no_wrapped_copy_either(
    db: Database, keystore: KeyStore
) -> None:
    handles = [
        keystore.import_key(KeyAlgorithm.AES_256, bytes([n]) * 32, KeyUsage.ENCRYPT).handle
        for n in (1, 2)
    ]
    blobs = [_wrapped(db, handle) for handle in handles]
    with db.work() as uow:
        for handle in handles:
            uow.destroy_after_commit(keystore, handle)
    assert db.wait_for_checkpoint(timeout=30)
    for blob in blobs:
        assert [p.name for p in _sqlite_files(db) if blob in p.read_bytes()] == []
