"""Terminal registry: bulk import with per-row reports, idempotent re-import, status changes."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.crypto import generate_private_key, public_key_to_der
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.keystore.base import KeyStore
from trustfleet.store import Database
from trustfleet.store.audit import AuditRecord, iter_records, verify_chain
from trustfleet.tmk import registry
from trustfleet.tmk.errors import (
    TmkInvalidTerminalRecord,
    TmkTerminalAlreadyRegistered,
    TmkTerminalStateConflict,
    TmkUnknownTerminal,
)
from trustfleet.tmk.models import Terminal
from trustfleet.tmk.terminals import Terminals


def _b64(der: bytes) -> str:
    return base64.b64encode(der).decode()


def _spki(key: object) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    """Base64 SPKI of one key per supported and unsupported algorithm."""
    sm2 = generate_private_key(KeyAlgorithm.SM2)
    return {
        "p256": _b64(_spki(ec.generate_private_key(ec.SECP256R1()).public_key())),
        "rsa2048": _b64(_spki(rsa.generate_private_key(65537, 2048).public_key())),
        "sm2": _b64(public_key_to_der(sm2.public_key())),
        "p384": _b64(_spki(ec.generate_private_key(ec.SECP384R1()).public_key())),
        "ed25519": _b64(_spki(ed25519.Ed25519PrivateKey.generate().public_key())),
        "rsa1024": _b64(_spki(rsa.generate_private_key(65537, 1024).public_key())),  # noqa: S505
    }


def _csv(rows: list[tuple[str, str, str]]) -> list[str]:
    out = io.StringIO()
    out.write("sn,model,public_key\n")
    for sn, model, key in rows:
        out.write(f"{sn},{model},{key}\n")
    return out.getvalue().splitlines(keepends=True)


def _count(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Terminal)) or 0)


def test_import_registers_supported_keys_and_reimport_changes_nothing(
    db: Database, sessions: sessionmaker[Session], keys: dict[str, str]
) -> None:
    rows = [
        ("SN-P256", "A920", keys["p256"]),
        ("SN-RSA", "A920", keys["rsa2048"]),
        ("SN-SM2", "N910", keys["sm2"]),
    ]
    first = registry.import_terminals(db, registry.read_csv(_csv(rows)), actor="maker")
    assert (first.accepted, first.unchanged, first.rejected) == (3, 0, [])
    with sessions() as s:
        algs = {sn: alg for sn, alg in s.execute(select(Terminal.sn, Terminal.key_algorithm))}
    assert algs == {"SN-P256": "ec-p256", "SN-RSA": "rsa-2048", "SN-SM2": "sm2"}

    again = registry.import_terminals(db, registry.read_csv(_csv(rows)), actor="maker")
    assert (again.accepted, again.unchanged, again.rejected) == (0, 3, [])
    assert _count(sessions) == 3


def test_every_rejection_is_reported_per_row(
    db: Database, sessions: sessionmaker[Session], keys: dict[str, str]
) -> None:
    registry.import_terminals(
        db, registry.read_csv(_csv([("SN-TAKEN", "m", keys["p256"])])), actor="maker"
    )
    rows = [
        ("SN-OK", "m", keys["p256"]),  # row 1 accepted
        ("SN-OK", "m", keys["rsa2048"]),  # row 2 duplicate in this file
        ("SN-TAKEN", "m", keys["rsa2048"]),  # row 3 registered with another key
        ("SN-BAD", "m", "bm90IGEga2V5"),  # row 4 base64 of junk
        ("SN-NOTB64", "m", "%%%"),  # row 5 neither PEM nor base64
        ("SN-P384", "m", keys["p384"]),  # row 6 unsupported curve
        ("SN-ED", "m", keys["ed25519"]),  # row 7 unsupported algorithm
        ("SN-R1024", "m", keys["rsa1024"]),  # row 8 too short RSA
        ("bad sn!", "m", keys["p256"]),  # row 9 invalid SN
        ("", "m", keys["p256"]),  # row 10 missing SN
    ]
    report = registry.import_terminals(db, registry.read_csv(_csv(rows)), actor="maker")
    codes = {(r.row, r.code) for r in report.rejected}
    assert codes == {
        (2, "duplicate-sn"),
        (3, "duplicate-sn"),
        (4, "malformed-key"),
        (5, "malformed-key"),
        (6, "unsupported-algorithm"),
        (7, "unsupported-algorithm"),
        (8, "unsupported-algorithm"),
        (9, "invalid-sn"),
        (10, "missing-field"),
    }
    assert report.accepted == 1
    assert report.to_dict()["rows"] == 10
    with sessions() as s:
        taken = s.get(Terminal, "SN-TAKEN")
        assert taken is not None and taken.key_algorithm == "ec-p256"  # not overwritten


def test_ndjson_and_json_array_inputs(
    db: Database, sessions: sessionmaker[Session], keys: dict[str, str]
) -> None:
    lines = [
        json.dumps({"sn": "N1", "model": "x", "public_key": keys["p256"]}),
        "not json",
        json.dumps(["not", "an", "object"]),
        json.dumps({"sn": 5, "public_key": keys["p256"]}),
    ]
    report = registry.import_terminals(db, registry.read_ndjson(lines), actor="maker")
    assert report.accepted == 1
    assert [r.code for r in report.rejected] == ["malformed-row"] * 3
    body = json.dumps([{"sn": "J1", "public_key": keys["sm2"]}])
    assert registry.import_terminals(db, registry.read_json_array(body), actor="m").accepted == 1
    with pytest.raises(TmkInvalidTerminalRecord):
        list(registry.read_json_array('{"sn": "x"}'))


def test_csv_without_required_columns_is_refused() -> None:
    with pytest.raises(TmkInvalidTerminalRecord):
        list(registry.read_csv(["serial,key\n", "a,b\n"]))


def test_a_csv_that_is_not_csv_is_refused_not_a_crash() -> None:
    # found by schemathesis: a carriage return inside an unquoted cell made csv raise, a 500
    with pytest.raises(TmkInvalidTerminalRecord, match="not valid CSV"):
        list(registry.read_csv(["\xad\r\x8a"]))
    rows = list(registry.read_csv(["sn,public_key\n", "T1,a\rb\n", "T2,zz\n"]))
    assert isinstance(rows[0], registry.RowRejection)
    assert (rows[0].row, rows[0].code) == (1, "malformed-row")
    assert isinstance(rows[1], registry.RawRecord) and (rows[1].row, rows[1].sn) == (2, "T2")


def test_pem_keys_are_accepted(db: Database, keystore: KeyStore) -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    sn = registry.register_terminal(
        db, sn="PEM1", model="m", public_key=pem.decode(), actor="maker"
    )
    assert Terminals(db, keystore).overview(sn).key_algorithm == "ec-p256"
    other = rsa.generate_private_key(65537, 2048).public_key()
    with pytest.raises(TmkTerminalAlreadyRegistered):
        registry.register_terminal(
            db, sn="PEM1", model="m", public_key=_b64(_spki(other)), actor="m"
        )


def test_status_changes_are_enforced_and_audited(
    db: Database, sessions: sessionmaker[Session], keystore: KeyStore, keys: dict[str, str]
) -> None:
    registry.register_terminal(db, sn="T1", model="m", public_key=keys["p256"], actor="maker")
    terminals = Terminals(db, keystore)
    assert terminals.change_status("T1", "suspend", actor="ops").status == "suspended"
    with pytest.raises(TmkTerminalStateConflict):
        terminals.change_status("T1", "suspend", actor="ops")
    assert terminals.change_status("T1", "reactivate", actor="ops").status == "active"
    assert terminals.change_status("T1", "revoke", actor="ops").status == "revoked"
    with pytest.raises(TmkTerminalStateConflict):
        terminals.change_status("T1", "reactivate", actor="ops")
    with pytest.raises(TmkUnknownTerminal):
        terminals.change_status("NOPE", "suspend", actor="ops")
    with sessions() as s:
        actions = list(s.scalars(select(AuditRecord.action).order_by(AuditRecord.seq)))
        assert actions == [
            "tmk.terminal_registered",
            "tmk.terminal_suspended",
            "tmk.terminal_active",
            "tmk.terminal_revoked",
        ]
        assert verify_chain(iter_records(s)).ok


def test_an_import_cut_short_keeps_its_batches_and_resumes_when_sent_again(
    db: Database, sessions: sessionmaker[Session], keys: dict[str, str]
) -> None:
    """Each batch of CHUNK_ROWS rows is its own transaction (no long write lock): an import
    that fails half-way keeps the batches it committed, each audited, and sending the same
    rows again registers the rest and reports the others unchanged."""
    total = 2 * registry.CHUNK_ROWS + registry.CHUNK_ROWS // 2
    rows = [(f"SN-{i:05d}", "m", keys["p256"]) for i in range(total)]

    class Crash(Exception):
        pass

    def cut_short() -> Iterator[registry.RawRecord | registry.RowRejection]:
        for number, row in enumerate(registry.read_csv(_csv(rows)), start=1):
            if number > 2 * registry.CHUNK_ROWS + 10:
                raise Crash()
            yield row

    with pytest.raises(Crash):
        registry.import_terminals(db, cut_short(), actor="maker")
    assert _count(sessions) == 2 * registry.CHUNK_ROWS
    again = registry.import_terminals(db, registry.read_csv(_csv(rows)), actor="maker")
    assert (again.accepted, again.unchanged, again.rejected) == (
        total - 2 * registry.CHUNK_ROWS,
        2 * registry.CHUNK_ROWS,
        [],
    )
    assert _count(sessions) == total
    with sessions() as s:
        records = [r for r in s.scalars(select(AuditRecord)) if r.action.endswith("imported")]
        assert verify_chain(iter_records(s)).ok
    accepted = [json.loads(r.details)["accepted"] for r in records]
    assert accepted == [registry.CHUNK_ROWS, registry.CHUNK_ROWS, 0, 0, total % registry.CHUNK_ROWS]
    assert sum(accepted) == total
