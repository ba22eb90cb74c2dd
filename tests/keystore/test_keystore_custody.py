"""Custody with the PKCS#11 backend (SoftHSM2): the token is the root of trust, every key
says where it lives, operations run in the token where it can, the disk alone gives nothing
away, the in-token policy refuses what the token cannot do, and a soft store moves under
the token."""

from __future__ import annotations

import base64
import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import keywrap
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, ObjectClass
from sqlalchemy import select, update

from harness import SoftHsmToken
from trustfleet.crypto import KeyAlgorithm, generate_private_key, private_key_to_der
from trustfleet.crypto import suite_for_algorithm as suite
from trustfleet.crypto.payment import kcv as kcvs
from trustfleet.errors import KeyNotExportable, KeyNotFound, UnsupportedAlgorithm
from trustfleet.keystore.base import KeyUsage
from trustfleet.keystore.hsm import HsmKeyStore, seal_soft_store
from trustfleet.keystore.master import (
    KeyIntegrityError,
    MasterKeyError,
    create_master_key_file,
    load_master_keyring,
    parse_master_keys,
)
from trustfleet.keystore.models import StoredKey
from trustfleet.keystore.pkcs11_seal import TokenKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.store import Database
from trustfleet.store.engine import make_engine, migrate

pytestmark = pytest.mark.pkcs11

A = KeyAlgorithm
U = KeyUsage
TMK_USAGE = U.WRAP | U.MAC | U.WRAPPABLE


def _hsm(db: Database, token: SoftHsmToken, **options: Any) -> HsmKeyStore:
    return HsmKeyStore(db, token.module, token.label, token.user_pin, **options)


@pytest.fixture
def in_token_only(db: Database, softhsm_token: SoftHsmToken) -> Iterator[HsmKeyStore]:
    store = _hsm(db, softhsm_token, policy="in-token")
    yield store
    store.close()


class Opens:
    """Counts the keys the token unwraps into process memory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = TokenKeyring.open

        def counted(ring: TokenKeyring, kek_id: str, blob: bytes, aad: bytes) -> bytes:
            self.count += 1
            return original(ring, kek_id, blob, aad)

        monkeypatch.setattr(TokenKeyring, "open", counted)


# -- where keys live ----------------------------------------------------------------------


def test_signing_keys_live_in_the_token_and_the_others_are_sealed(hsm_store: HsmKeyStore) -> None:
    ca = hsm_store.generate(A.EC_P256, U.SIGN, label="pki-ca:x")
    tmk = hsm_store.generate(A.AES_128, TMK_USAGE)
    sm2 = hsm_store.generate(A.SM2, U.SIGN)  # SoftHSM2 has no SM2: sealed, signs in process
    listed = {k.handle: k for k in hsm_store.list()}
    assert (listed[ca.handle].custody, listed[ca.handle].extractable) == ("token", False)
    assert listed[ca.handle].token_operations == ("sign",)
    assert listed[tmk.handle].custody == "sealed"
    assert listed[tmk.handle].extractable  # WRAPPABLE: it leaves wrapped to the terminal
    assert set(listed[tmk.handle].token_operations) == {"kcv", "mac"}
    assert "wrap" in listed[tmk.handle].process_operations  # HPKE runs in process
    assert (listed[sm2.handle].custody, listed[sm2.handle].process_operations) == (
        "sealed",
        ("sign",),
    )


def test_a_key_in_the_token_is_refused_for_export_and_unreadable_there(
    hsm_store: HsmKeyStore, softhsm_token: SoftHsmToken
) -> None:
    ca = hsm_store.generate(A.EC_P256, U.SIGN)
    assert ca.custody == "token"
    with pytest.raises(KeyNotExportable):
        hsm_store.export(ca.handle)
    key_id = bytes.fromhex(ca.handle.removeprefix("pkcs11:"))
    token = pkcs11.lib(softhsm_token.module).get_token(token_label=softhsm_token.label)
    with token.open(user_pin=None) as session:
        objects = list(session.get_objects({Attribute.ID: key_id}))
        private = [o for o in objects if o[Attribute.CLASS] == ObjectClass.PRIVATE_KEY]
        assert len(private) == 1
        assert private[0][Attribute.SENSITIVE] is True
        assert private[0][Attribute.EXTRACTABLE] is False
        with pytest.raises(pkcs11.AttributeSensitive):
            private[0][Attribute.VALUE]


def test_the_key_encryption_key_never_leaves_and_no_handle_reaches_it(
    hsm_store: HsmKeyStore, softhsm_token: SoftHsmToken
) -> None:
    hsm_store.generate(A.AES_128, TMK_USAGE)
    token = pkcs11.lib(softhsm_token.module).get_token(token_label=softhsm_token.label)
    with token.open(user_pin=None) as session:
        keks = list(session.get_objects({Attribute.LABEL: "trustfleet-kek"}))
        assert keks
        for kek in keks:
            assert kek[Attribute.SENSITIVE] is True
            assert kek[Attribute.EXTRACTABLE] is False
            assert kek[Attribute.DECRYPT] is False  # it unwraps keys; it decrypts no data
            with pytest.raises(pkcs11.AttributeSensitive):
                kek[Attribute.VALUE]
        kek_handle = "pkcs11:" + bytes(keks[0][Attribute.ID]).hex()
    with pytest.raises(KeyNotFound):
        hsm_store.info(kek_handle)
    with pytest.raises(KeyNotFound):
        hsm_store.export(kek_handle)
    with pytest.raises(KeyNotFound):
        hsm_store.unwrap(kek_handle, bytes(40), A.AES_128, U.MAC)
    assert kek_handle not in {k.handle for k in hsm_store.list()}


# -- where operations run -----------------------------------------------------------------


def test_what_the_token_can_run_never_brings_the_key_into_process_memory(
    hsm_store: HsmKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmk = hsm_store.generate(A.AES_128, TMK_USAGE)
    ticket = hsm_store.generate(A.HMAC_SHA256, U.MAC)
    pin_key = hsm_store.generate(A.TDES, U.DECRYPT | U.WRAPPABLE)
    opens = Opens(monkeypatch)
    hsm_store.kcv(tmk.handle)
    hsm_store.mac_verify(tmk.handle, b"confirmation", hsm_store.mac(tmk.handle, b"confirmation"))
    hsm_store.mac(ticket.handle, b"ticket")
    hsm_store.kcv(pin_key.handle)
    hsm_store.block_cipher(pin_key.handle, bytes(8), decrypt=True)
    assert opens.count == 0

    # HPKE has no mechanism in the token: unwrapped for that call, and not kept
    terminal = generate_private_key(A.EC_P256)
    first = hsm_store.wrap(tmk.handle, under=terminal.public_key(), info=b"s1")
    second = hsm_store.wrap(tmk.handle, under=terminal.public_key(), info=b"s2")
    assert opens.count == 2
    delivered = suite(A.EC_P256).kem_unwrap(terminal, first, b"s1")
    assert suite(A.EC_P256).kem_unwrap(terminal, second, b"s2") == delivered
    # ... and the token's KCV is the KCV of what the terminal received
    assert hsm_store.kcv(tmk.handle) == kcvs.kcv(A.AES_128, delivered)


def test_rsa_oaep_transport_falls_back_to_process_when_the_token_refuses_its_parameters(
    hsm_store: HsmKeyStore,
) -> None:
    """SoftHSM2 lists CKM_RSA_PKCS_OAEP for wrapping but takes only SHA-1 without a label:
    the sealed policy runs the transport in process, and remembers the refusal."""
    tmk = hsm_store.generate(A.AES_128, TMK_USAGE)
    terminal = generate_private_key(A.RSA_2048)
    wrapped = hsm_store.wrap(tmk.handle, under=terminal.public_key(), info=b"label")
    tmk_value = suite(A.RSA_2048).kem_unwrap(terminal, wrapped, b"label")
    assert kcvs.kcv(A.AES_128, tmk_value) == hsm_store.kcv(tmk.handle)
    oaep = "CKM_RSA_PKCS_OAEP with CKM_SHA256, CKG_MGF1_SHA256 and a label"
    assert hsm_store.mechanisms.refused(oaep)


def test_the_in_token_policy_refuses_hpke_naming_the_missing_mechanism(
    in_token_only: HsmKeyStore,
) -> None:
    tmk = in_token_only.generate(A.AES_128, TMK_USAGE)
    assert in_token_only.kcv(tmk.handle)  # what the token can run still runs
    terminal = generate_private_key(A.EC_P256)
    with pytest.raises(UnsupportedAlgorithm, match="CKM_HKDF_DERIVE") as refused:
        in_token_only.wrap(tmk.handle, under=terminal.public_key(), info=b"s")
    assert refused.value.code == "unsupported-algorithm"
    assert "in-token" in refused.value.message
    rsa_terminal = generate_private_key(A.RSA_2048)
    with pytest.raises(UnsupportedAlgorithm, match="CKM_RSA_PKCS_OAEP"):
        in_token_only.wrap(tmk.handle, under=rsa_terminal.public_key(), info=b"s")
    with pytest.raises(UnsupportedAlgorithm, match="SM2"):
        in_token_only.generate(A.SM2, U.SIGN)
    with pytest.raises(UnsupportedAlgorithm, match="SM4"):
        in_token_only.generate(A.SM4, U.ENCRYPT)


def test_a_sealed_row_whose_flags_are_edited_does_not_open(
    hsm_store: HsmKeyStore, db: Database
) -> None:
    key = hsm_store.generate(A.AES_128, U.MAC)  # neither exportable nor wrappable
    with db.work() as work:
        work.run(update(StoredKey).where(StoredKey.handle == key.handle).values(exportable=True))
    with pytest.raises(KeyIntegrityError):
        hsm_store.export(key.handle)
    with pytest.raises(KeyIntegrityError):
        hsm_store.mac(key.handle, b"x")


# -- the disk alone ------------------------------------------------------------------------


def _make_keys(store: Any) -> dict[str, bytes]:
    """Keys of every kind a POS key server holds; the material of those the test knows."""
    known = {
        "imported-aes": bytes(range(100, 116)),
        "imported-hmac": bytes(range(7, 39)),
        "imported-tdes": bytes(range(1, 17)),
    }
    store.import_key(A.AES_128, known["imported-aes"], TMK_USAGE)
    store.import_key(A.HMAC_SHA256, known["imported-hmac"], U.MAC)
    store.import_key(A.TDES, known["imported-tdes"], U.DECRYPT | U.WRAPPABLE)
    sm2 = generate_private_key(A.SM2)
    known["imported-sm2"] = private_key_to_der(sm2)
    store.import_key(A.SM2, known["imported-sm2"], U.SIGN | U.DECRYPT)
    store.generate(A.AES_128, TMK_USAGE)
    store.generate(A.EC_P256, U.SIGN)
    return known


def _candidate_keys(directory: Path) -> set[bytes]:
    """Everything on the copied disk that could be a key: each file whole, every 16-, 24-
    and 32-byte window of every file, and every base64 word in the text files."""
    found: set[bytes] = set()
    for path in directory.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        found.add(data)
        for size in (16, 24, 32):
            found.update(data[i : i + size] for i in range(len(data) - size + 1))
        for word in data.replace(b",", b" ").replace(b'"', b" ").split():
            for part in (word, word.rpartition(b":")[2]):
                with contextlib.suppress(ValueError):
                    found.add(base64.b64decode(part, validate=True))
    return {c for c in found if len(c) in (16, 24, 32)}


def _recover(directory: Path, database: Path) -> set[bytes]:
    """What an attacker with the copied files recovers from the key rows: each row opened
    with the soft store's master key files found there, and each row's material tried with
    every candidate key as AES-GCM (the soft format), RFC 5649 and RFC 3394 key wrap and
    AES-CBC (the sealed formats)."""
    engine = make_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        rows = connection.execute(select(StoredKey).where(StoredKey.destroyed_at.is_(None)))
        stored = [(r.wrapped, StoredKey.binding(r)) for r in rows]  # type: ignore[arg-type]
    engine.dispose()
    recovered: set[bytes] = set()
    for path in directory.rglob("*"):  # master key files, in any of their formats
        try:
            keyring = parse_master_keys(path.read_text())
        except (MasterKeyError, UnicodeDecodeError, ValueError):
            continue
        for kek_id in keyring.kek_ids:
            for blob, aad in stored:
                try:
                    recovered.add(keyring.open(kek_id, blob, aad))
                except (KeyIntegrityError, MasterKeyError):
                    continue
    candidates = _candidate_keys(directory)
    for blob, aad in stored:
        for key in candidates:
            recovered.update(_tries(key, blob, aad))
    return recovered


def _tries(key: bytes, blob: bytes, aad: bytes) -> Iterator[bytes]:
    for offset in range(0, 60):  # wherever the wrapped part starts after a header
        body = blob[offset:]
        if len(body) >= 24 and len(body) % 8 == 0:
            for unwrap in (keywrap.aes_key_unwrap_with_padding, keywrap.aes_key_unwrap):
                with contextlib.suppress(keywrap.InvalidUnwrap, ValueError):
                    yield unwrap(key, body)
        if offset in (0, 2, 34) and len(body) > 28:
            with contextlib.suppress(InvalidTag, ValueError):
                yield AESGCM(key).decrypt(body[:12], body[12:], aad)
    if len(blob) > 34 + 32 and (len(blob) - 34) % 16 == 0:  # IV then CBC
        iv, body = blob[34:50], blob[50:]
        decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        yield decryptor.update(body) + decryptor.finalize()


def _leaks(recovered: set[bytes], known: dict[str, bytes]) -> list[str]:
    return [name for name, value in known.items() if any(value in r for r in recovered)]


def _copy_disk(data_dir: Path, target: Path) -> tuple[Path, Path]:
    shutil.copytree(data_dir, target)
    return target, target / "trustfleet.db"


def _database(data_dir: Path) -> Database:
    engine = make_engine(f"sqlite:///{data_dir / 'trustfleet.db'}")
    migrate(engine)
    return Database(engine)


@pytest.mark.slow
def test_the_database_and_data_directory_without_the_token_give_no_key_away(
    tmp_path: Path, softhsm_token: SoftHsmToken
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = _database(data_dir)
    store = _hsm(db, softhsm_token)
    known = _make_keys(store)
    store.close()
    db.engine.dispose()
    assert not (data_dir / "master.key").exists()

    copy, database = _copy_disk(data_dir, tmp_path / "stolen")
    everything = b"".join(p.read_bytes() for p in copy.rglob("*") if p.is_file())
    for name, value in known.items():
        for form in (value, value.hex().encode(), value.hex().upper().encode()):
            assert form not in everything, name
        assert base64.b64encode(value) not in everything, name
    with pytest.raises(MasterKeyError):
        load_master_keyring(copy / "master.key", environ={})
    assert _leaks(_recover(copy, database), known) == []


@pytest.mark.slow
def test_the_same_attack_recovers_the_keys_of_a_soft_store(tmp_path: Path) -> None:
    """The control: the attack of the test above finds every key when the master key sits
    in the data directory, so its failure there says something."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = _database(data_dir)
    store = SoftKeyStore(db, create_master_key_file(data_dir / "master.key"))
    known = _make_keys(store)
    db.engine.dispose()
    copy, database = _copy_disk(data_dir, tmp_path / "stolen")
    assert sorted(_leaks(_recover(copy, database), known)) == sorted(known)


# -- moving a soft store under the token ---------------------------------------------------


def test_keystore_seal_moves_a_soft_store_under_the_token_and_can_be_run_again(
    tmp_path: Path, db: Database, softhsm_token: SoftHsmToken
) -> None:
    master_file = tmp_path / "master.key"
    soft = SoftKeyStore(db, create_master_key_file(master_file))
    tmk = soft.generate(A.AES_128, TMK_USAGE)
    ca = soft.generate(A.EC_P256, U.SIGN)
    ticket = soft.generate(A.HMAC_SHA256, U.MAC)
    before = {
        "kcv": soft.kcv(tmk.handle),
        "mac": soft.mac(ticket.handle, b"t"),
        "public": soft.public_key(ca.handle),
    }
    hsm = _hsm(db, softhsm_token, master=load_master_keyring(master_file, environ={}))
    try:
        crash_after: Callable[[int], None]

        def crash_after(n: int) -> None:
            if n == 2:
                raise RuntimeError("power cut")

        with pytest.raises(RuntimeError):
            seal_soft_store(db, hsm, master_file, batch_size=1, after_row=crash_after)
        assert master_file.exists()  # some rows still need it
        # the store keeps serving every key meanwhile
        assert hsm.kcv(tmk.handle) == before["kcv"]
        report = seal_soft_store(db, hsm, master_file)
        assert report.sealed >= 1
        assert report.master_key_removed and not master_file.exists()
        handles = (tmk.handle, ca.handle, ticket.handle)  # unchanged
        assert {hsm.info(h).custody for h in handles} == {"sealed"}
        assert hsm.kcv(tmk.handle) == before["kcv"]
        assert hsm.mac(ticket.handle, b"t") == before["mac"]
        assert hsm.public_key(ca.handle) == before["public"]
        suite(A.EC_P256).verify(before["public"], b"m", hsm.sign(ca.handle, b"m"))
        assert seal_soft_store(db, hsm, master_file).sealed == 0  # again: nothing to do
    finally:
        hsm.close()
    fresh = _hsm(db, softhsm_token)  # no master key at all now
    try:
        assert fresh.mac(ticket.handle, b"t") == before["mac"]
    finally:
        fresh.close()


# -- a second implementation ---------------------------------------------------------------


def test_opencryptoki_gets_keys_placed_by_its_own_mechanisms(
    ock_store: HsmKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """openCryptoki's software token (3.8) has RSA but no EC, RSA-OAEP with SHA-256 and a
    label, AES-CBC-PAD but no AES key wrap: each key goes where this token can use it."""
    assert ock_store.keyring.wrap_mechanism == "CKM_AES_CBC_PAD"
    ec_ca = ock_store.generate(A.EC_P256, U.SIGN)
    rsa_ca = ock_store.generate(A.RSA_2048, U.SIGN)
    assert (ec_ca.custody, rsa_ca.custody) == ("sealed", "token")
    tmk = ock_store.generate(A.AES_128, TMK_USAGE)
    terminal = generate_private_key(A.RSA_2048)
    opens = Opens(monkeypatch)
    wrapped = ock_store.wrap(tmk.handle, under=terminal.public_key(), info=b"label")
    assert opens.count == 0  # RSA-OAEP ran inside the token
    delivered = suite(A.RSA_2048).kem_unwrap(terminal, wrapped, b"label")
    assert kcvs.kcv(A.AES_128, delivered) == ock_store.kcv(tmk.handle)  # KCV: no AES-CMAC
    assert opens.count == 1
    assert "wrap" in ock_store.info(tmk.handle).token_operations
    assert "kcv" in ock_store.info(tmk.handle).process_operations
