"""Manufacturer imports: CSV, JSON Lines and signed manifests; the per-row report; the same
file twice changes nothing; a crash mid-import loses and duplicates nothing and the import
resumes; keys are never stored in the clear."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.keysync import protocol
from trustfleet.keysync.errors import KeysyncImportConflict
from trustfleet.keysync.imports import KeyImports
from trustfleet.keysync.models import TerminalKey
from trustfleet.keysync.terminal import M2mTerminal
from trustfleet.keysync.vault import Vault
from trustfleet.server.context import AppContext

from .conftest import auth, count, ok, problem

CSV = "text/csv"
JSONL = "application/x-ndjson"
MANIFEST = "application/x-keysync-manifest"


def put(
    client: TestClient,
    tokens: dict[str, str],
    import_id: str,
    body: str | bytes,
    media: str = CSV,
) -> Any:
    return client.put(
        f"/v1/keysync/imports/{import_id}",
        headers={**auth(tokens["manufacturer"]), "Content-Type": media},
        content=body.encode() if isinstance(body, str) else body,
    )


def keys(n: int, prefix: str = "k") -> list[tuple[str, str, str]]:
    """(terminal_id, key_id, key hex) rows with random key IDs."""
    return [
        (f"T-{i // 2}", f"{prefix}{secrets.token_hex(6)}", secrets.token_hex(16)) for i in range(n)
    ]


def csv_of(rows: list[tuple[str, str, str]], extra: str = "") -> str:
    lines = ["terminal_id,key_id,key"] + [",".join(row) for row in rows]
    return "\n".join(lines) + "\n" + extra


def stored(sessions: sessionmaker[Session]) -> dict[str, tuple[str, bytes]]:
    with sessions() as session:
        rows = session.execute(
            select(TerminalKey.key_id, TerminalKey.terminal_id, TerminalKey.sealed_key)
        )
        return {r.key_id: (r.terminal_id, r.sealed_key) for r in rows}


def test_csv_and_jsonl_import_and_the_same_file_twice_changes_nothing(
    client: TestClient, sessions: sessionmaker[Session], tokens: dict[str, str]
) -> None:
    rows = keys(20)
    report = ok(put(client, tokens, "batch-1", csv_of(rows)))
    assert (report["accepted"], report["unchanged"], report["rejected"]) == (20, 0, 0)
    assert report["status"] == "completed" and report["rows_done"] == 20
    before = stored(sessions)
    again = ok(put(client, tokens, "batch-1", csv_of(rows)))
    assert again == report  # the finished import's own report
    other_id = ok(put(client, tokens, "batch-1-again", csv_of(rows)))
    assert (other_id["accepted"], other_id["unchanged"], other_id["rejected"]) == (0, 20, 0)
    assert stored(sessions) == before
    lines = "\n".join(
        json.dumps({"terminal_id": t, "key_id": k, "key": key, "application_id": "app",
                    "label": "meter key"})
        for t, k, key in keys(5)
    )  # fmt: skip
    jsonl = ok(put(client, tokens, "jsonl-1", lines, JSONL))
    assert jsonl["accepted"] == 5


def test_the_per_row_report(client: TestClient, tokens: dict[str, str]) -> None:
    ((terminal, key_id, key),) = keys(1)
    ok(put(client, tokens, "first", csv_of([(terminal, key_id, key)])))
    body = "\n".join(
        [
            "terminal_id,key_id,key,application_id,label,algorithm",
            f"{terminal},{key_id},{secrets.token_hex(16)},,,",  # 1 same key ID, other key
            f"T-9,dup-{key_id[:8]},{key},,,",  # 2 fine
            f"T-9,dup-{key_id[:8]},{secrets.token_hex(16)},,,",  # 3 duplicate within the file
            "T-9,bad-hex,zz11,,,",  # 4
            "T-9,short,0011,,,",  # 5
            "T-9,sm4,00112233445566778899aabbccddeeff,,,sm4",  # 6 fine
            "T-9,rsa,00112233445566778899aabbccddeeff,,,rsa-2048",  # 7
            "T 9,id,00112233445566778899aabbccddeeff,,,",  # 8
            "T-9,key id,00112233445566778899aabbccddeeff,,,",  # 9
            "T-9,,00112233445566778899aabbccddeeff,,,",  # 10
            "T-9,too,many,cells,,,,",  # 11
            f"{terminal},{key_id},{key},,,",  # 12 the same row as imported: unchanged
        ]
    )
    report = ok(put(client, tokens, "second", body))
    codes = {r["row"]: r["code"] for r in report["rejections"]}
    assert codes == {
        1: "duplicate-key-id",
        3: "duplicate-key-id",
        4: "malformed-key",
        5: "malformed-key",
        7: "unsupported-algorithm",
        8: "invalid-terminal-id",
        9: "invalid-key-id",
        10: "missing-field",
        11: "malformed-row",
    }
    assert (report["accepted"], report["unchanged"]) == (2, 1)
    assert all(key not in json.dumps(report) for key in (key,))


def test_unknown_format_and_conflicting_content(client: TestClient, tokens: dict[str, str]) -> None:
    problem(put(client, tokens, "x", "a,b", "application/pdf"), 415, "keysync-unknown-format")
    problem(put(client, tokens, "x", "a,b\n1,2\n"), 400, "keysync-invalid-import")
    ok(put(client, tokens, "same-id", csv_of(keys(2))))
    problem(put(client, tokens, "same-id", csv_of(keys(2))), 409, "keysync-import-conflict")
    problem(put(client, tokens, "y", b"\xff\xfe,\x00"), 400, "keysync-invalid-import")
    # a file that failed as a whole left no import behind: its ID is free
    ok(put(client, tokens, "x", csv_of(keys(1))))


# -- signed manifests ----------------------------------------------------------------------


@pytest.fixture
def import_key(client: TestClient, tokens: dict[str, str]) -> x25519.X25519PublicKey:
    pem = ok(client.get("/v1/keysync/import-key", headers=auth(tokens["manufacturer"])))
    key = load_pem_public_key(pem["public_key_pem"].encode())
    assert isinstance(key, x25519.X25519PublicKey)
    return key


def register_signer(client: TestClient, tokens: dict[str, str], kid: str, key: Any) -> None:
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    ok(
        client.post(
            "/v1/keysync/manufacturer-keys",
            headers=auth(tokens["admin"]),
            json={"kid": kid, "manufacturer": "Maker", "public_key_pem": pem.decode()},
        ),
        201,
    )


def test_signed_manifests(
    tmp_path: Path, client: TestClient, tokens: dict[str, str], import_key: x25519.X25519PublicKey
) -> None:
    eddsa, es256 = ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
    register_signer(client, tokens, "maker-ed", eddsa)
    register_signer(client, tokens, "maker-ec", es256)
    terminals = [
        M2mTerminal.factory(tmp_path / f"t{i}", f"T-{i}", "+861440000000001", ["a", "b"])
        for i in range(6)
    ]
    good_ed = terminals[0].manifest_line(eddsa, kid="maker-ed", import_key=import_key)
    good_ec = terminals[1].manifest_line(es256, kid="maker-ec", import_key=import_key)
    forged = terminals[2].manifest_line(ed25519.Ed25519PrivateKey.generate(), kid="maker-ed",
                                        import_key=import_key)  # fmt: skip
    stranger = terminals[3].manifest_line(eddsa, kid="maker-unknown", import_key=import_key)
    wrong_seal = terminals[4].manifest_line(
        eddsa, kid="maker-ed", import_key=x25519.X25519PrivateKey.generate().public_key()
    )
    header, payload, signature = (
        terminals[5].manifest_line(eddsa, kid="maker-ed", import_key=import_key).split(".")
    )
    tampered = ".".join([header, payload[:-4] + "AAAA", signature])
    lines = [good_ed, good_ec, forged, stranger, wrong_seal, tampered, "not a jws", "a.b.c"]
    report = ok(put(client, tokens, "manifest-1", "\n".join(lines) + "\n", MANIFEST))
    codes = sorted((r["row"], r["code"]) for r in report["rejections"])
    assert codes == [
        (3, "bad-signature"),
        (4, "unknown-signer"),
        (5, "sealed-key-invalid"),
        (5, "sealed-key-invalid"),
        (6, "bad-signature"),
        (7, "unknown-format"),
        (8, "unknown-format"),
    ]
    assert report["accepted"] == 4
    again = ok(put(client, tokens, "manifest-2", "\n".join(lines[:2]) + "\n", MANIFEST))
    assert (again["accepted"], again["unchanged"]) == (0, 4)


# -- crashes -------------------------------------------------------------------------------


class Crash(Exception):
    pass


def crashing(lines: list[str], after: int) -> Iterator[str]:
    for number, line in enumerate(lines):
        if number == after:
            raise Crash
        yield line


def test_a_crash_mid_import_resumes_after_the_last_committed_batch(
    context: AppContext, sessions: sessionmaker[Session]
) -> None:
    rows = keys(95)
    lines = csv_of(rows).splitlines(keepends=True)
    digest = "d" * 64
    imports = KeyImports(context.db, Vault(context.db, context.keystore), batch_rows=10)
    with pytest.raises(Crash):
        imports.run("crashy", "csv", crashing(lines, 58), content_sha256=digest, actor="m")
    partial = imports.report("crashy")
    assert (partial.status, partial.rows_done, partial.accepted) == ("running", 50, 50)
    assert count(sessions, TerminalKey) == 50  # whole batches only
    seen: list[int] = []
    report = imports.run("crashy", "csv", lines, content_sha256=digest, actor="m",
                         progress=seen.append)  # fmt: skip
    assert seen[0] == 60  # resumed after row 50
    assert (report.status, report.rows_done, report.accepted, report.unchanged) == (
        "completed", 95, 95, 0,
    )  # fmt: skip
    assert set(stored(sessions)) == {key_id for _, key_id, _ in rows}
    with pytest.raises(KeysyncImportConflict):
        imports.run("crashy", "csv", lines, content_sha256="e" * 64, actor="m")


# -- keys at rest ----------------------------------------------------------------------------


def dump(engine: Engine) -> bytes:
    """Every value of every table, as bytes."""
    from sqlalchemy import inspect

    out = bytearray()
    with engine.connect() as connection:
        for table in inspect(engine).get_table_names():
            for row in connection.execute(text(f'SELECT * FROM "{table}"')):  # noqa: S608
                for value in row:
                    out += value if isinstance(value, bytes | memoryview) else str(value).encode()
                    out += b"\x00"
    return bytes(out)


def forms_of(key: bytes) -> list[bytes]:
    return [
        key,
        key.hex().encode(),
        key.hex().upper().encode(),
        base64.b64encode(key),
        base64.urlsafe_b64encode(key).rstrip(b"="),
    ]


def test_no_key_in_clear_in_the_database(
    client: TestClient, context: AppContext, tokens: dict[str, str]
) -> None:
    rows = keys(10)
    ok(put(client, tokens, "rest", csv_of(rows)))
    everything = dump(context.engine)
    for _, _, key in rows:
        for form in forms_of(bytes.fromhex(key)):
            assert form not in everything
    assert protocol.ID_PATTERN.fullmatch(rows[0][1])
