"""Audit a database-level attacker cannot rewrite: every record also goes to the audit
devices (a JSON Lines file, syslog) before its transaction commits, and every few records
the chain's head is signed with a key-store key. ``audit verify`` names each record that
was deleted from the newest end, rewritten and rehashed, or edited in the file; a device
that cannot be written fails the request with nothing done."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text

from trustfleet.server.app import create_app
from trustfleet.server.audit_trail import (
    CHECKPOINT_KEY_LABEL,
    AuditReport,
    KeyStoreSigner,
    verify_audit,
)
from trustfleet.server.auth import create_token
from trustfleet.server.context import AppContext
from trustfleet.settings import Settings
from trustfleet.store import Database, audit
from trustfleet.store.audit_devices import (
    AuditDevice,
    AuditTrail,
    FileDevice,
    SyslogDevice,
    compare,
    read_device,
    read_device_file,
    record_line,
)
from trustfleet.store.engine import make_engine, migrate

from .conftest import MAX_BODY_BYTES, assert_problem, bearer

EVERY = 4  # a signed checkpoint every 4 records


@pytest.fixture
def audit_file(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "trustfleet-audit.jsonl"


@pytest.fixture
def settings(tmp_path: Path, audit_file: Path) -> Settings:
    audit_file.parent.mkdir()
    return Settings(
        data_dir=tmp_path,
        max_body_bytes=MAX_BODY_BYTES,
        audit_file=str(audit_file),
        audit_checkpoint_every=EVERY,
    )


@pytest.fixture
def admin(client: TestClient, db: Database) -> dict[str, str]:
    """An admin token, made once the app (and so its audit trail) exists."""
    return bearer(create_token(db, "auditing admin", "admin")[0])


def _make_records(client: TestClient, admin: dict[str, str], count: int, tag: str = "t") -> None:
    for i in range(count):
        response = client.post(
            "/v1/tokens", json={"name": f"{tag}-{i}", "role": "operator"}, headers=admin
        )
        assert response.status_code == 201, response.text


def _verify(context: AppContext) -> AuditReport:
    return verify_audit(context)


def _without_devices(context: AppContext) -> AppContext:
    """The node as verified without its file device (the checkpoints alone)."""
    return dataclasses.replace(
        context, settings=dataclasses.replace(context.settings, audit_file="")
    )


def _named(report: AuditReport) -> dict[int, list[str]]:
    named: dict[int, list[str]] = {}
    for problem in report.problems:
        named.setdefault(problem.seq, []).append(problem.problem)
    return named


def _sql(engine: Engine, statement: str, **params: Any) -> None:
    with engine.begin() as connection:  # straight to the database, as an attacker would
        connection.execute(text(statement), params)


def _rows(engine: Engine) -> list[Any]:
    statement = select(*audit.AuditRecord.__table__.columns).order_by(audit.AuditRecord.seq)
    with engine.connect() as connection:
        return list(connection.execute(statement))


def test_every_record_is_on_the_file_device_and_checkpoints_are_signed(
    client: TestClient, admin: dict[str, str], context: AppContext, audit_file: Path, engine: Engine
) -> None:
    _make_records(client, admin, 9)
    log = read_device_file(audit_file)
    rows = _rows(engine)
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert {seq: [e.hash for e in entries] for seq, entries in log.records.items()} == {
        r.seq: [r.hash] for r in rows
    }
    assert all(r.seq in log.records for r in rows)
    assert sorted(log.checkpoints) == [s for s in range(1, len(rows) + 1) if s % EVERY == 0]
    keys = [k for k in context.keystore.list() if k.label == CHECKPOINT_KEY_LABEL]
    assert len(keys) == 1  # made by the first checkpoint, reused by the next
    report = _verify(context)
    assert report.ok, report.problems
    assert report.checkpoints == len(log.checkpoints) and report.devices == [str(audit_file)]
    answer = client.get("/v1/audit/verify", headers=admin).json()
    assert answer["ok"] is True and answer["checkpoints"] == report.checkpoints
    listed = client.get("/v1/audit/checkpoints", headers=admin).json()
    assert [c["seq"] for c in listed] == sorted(log.checkpoints)


def test_deleting_the_newest_records_is_detected_and_named(
    client: TestClient, admin: dict[str, str], context: AppContext, engine: Engine
) -> None:
    _make_records(client, admin, 10)
    last = _rows(engine)[-1].seq
    assert last % EVERY != 0  # the newest records are after the last checkpoint
    _sql(engine, "DELETE FROM audit_log WHERE seq > :s", s=last - 2)
    assert audit.verify_chain(_rows(engine)).ok  # the chain alone cannot see it
    named = _named(_verify(context))
    assert set(named) == {last - 1, last}
    assert "not in the database (deleted)" in named[last][0]


def test_deleting_records_past_a_checkpoint_is_named_by_the_checkpoint(
    client: TestClient,
    admin: dict[str, str],
    context: AppContext,
    engine: Engine,
    settings: Settings,
) -> None:
    _make_records(client, admin, 10)
    checkpoint = max(r.seq for r in _rows(engine) if r.seq % EVERY == 0)
    _sql(engine, "DELETE FROM audit_log WHERE seq > :s", s=checkpoint - 2)
    # without the device, the signed checkpoint still names what is missing
    alone = _without_devices(context)
    named = _named(verify_audit(alone))
    assert f"records {checkpoint - 1}..{checkpoint} are missing" in named[checkpoint][0]
    assert checkpoint - 1 in _named(_verify(context))  # and the device names each one


def _rehash_everything(engine: Engine) -> None:
    """Rewrite every record's actor and recompute the whole chain, as someone with write
    access to the database (but not to the key store or the devices) could."""
    prev = audit.GENESIS_HASH
    for row in _rows(engine):
        fields = {
            "seq": row.seq,
            "at": row.at,
            "actor": "mallory",
            "action": row.action,
            "subject": row.subject,
            "outcome": row.outcome,
            "details": row.details,
            "prev_hash": prev,
        }
        new = audit.record_hash(**fields)
        _sql(
            engine,
            "UPDATE audit_log SET actor = 'mallory', prev_hash = :p, hash = :h WHERE seq = :s",
            p=prev,
            h=new,
            s=row.seq,
        )
        prev = new


def test_rewriting_and_rehashing_the_whole_chain_is_detected(
    client: TestClient,
    admin: dict[str, str],
    context: AppContext,
    engine: Engine,
    settings: Settings,
) -> None:
    _make_records(client, admin, 9)
    _rehash_everything(engine)
    assert audit.verify_chain(_rows(engine)).ok  # the chain is consistent again
    report = _verify(context)
    named = _named(report)
    for seq in range(1, _rows(engine)[-1].seq + 1):  # the device names every record
        if seq in read_device_file(Path(settings.audit_file)).records:
            assert any("altered" in p for p in named[seq]), (seq, named)
    checkpoints = [s for s in named if s % EVERY == 0]
    assert checkpoints and all(
        any("signed checkpoint's head: the chain was rewritten" in p for p in named[s])
        for s in checkpoints
    )
    # forging the checkpoints' heads too breaks their signatures
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE audit_checkpoints SET head_hash = "
                "(SELECT hash FROM audit_log WHERE audit_log.seq = audit_checkpoints.seq)"
            )
        )
    forged = _named(_verify(context))
    assert all(any("signature does not verify" in p for p in forged[s]) for s in checkpoints)


def test_deleted_checkpoints_are_named_by_the_device_and_by_the_gap(
    client: TestClient,
    admin: dict[str, str],
    context: AppContext,
    engine: Engine,
    settings: Settings,
) -> None:
    _make_records(client, admin, 14)
    checkpoints = sorted(read_device_file(Path(settings.audit_file)).checkpoints)
    assert len(checkpoints) >= 3
    _sql(engine, "DELETE FROM audit_checkpoints WHERE seq > :s", s=checkpoints[0])
    named = _named(_verify(context))
    for seq in checkpoints[1:]:
        assert any("checkpoint in" in p and "not in the database" in p for p in named[seq])
    alone = _without_devices(context)
    assert any("no signed checkpoint covers it" in p for p in _named(verify_audit(alone))[8])


def test_an_edited_line_of_the_file_device_is_named(
    client: TestClient, admin: dict[str, str], context: AppContext, audit_file: Path
) -> None:
    _make_records(client, admin, 5)
    lines = audit_file.read_text(encoding="utf-8").splitlines()
    number, line = next((n, ln) for n, ln in enumerate(lines, 1) if '"type":"record"' in ln)
    edited = json.loads(line)
    edited["actor"] = "someone else"
    lines[number - 1] = json.dumps(edited)
    audit_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = _verify(context)
    named = _named(report)
    assert list(named) == [edited["seq"]]
    assert named[edited["seq"]] == [
        f"{audit_file} line {number} does not match its hash (the device was edited)"
    ]
    # an edit that recomputes the line's hash still disagrees with the database
    edited["hash"] = audit.record_hash(
        **{k: edited[k] for k in ("seq", "actor", "action", "subject", "outcome", "details")},
        at=datetime.fromisoformat(edited["at"]).replace(tzinfo=UTC),
        prev_hash=edited["prev_hash"],
    )
    lines[number - 1] = json.dumps(edited)
    audit_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    named = _named(_verify(context))
    assert list(named) == [edited["seq"]]
    assert f"differs from {audit_file} line {number}" in named[edited["seq"]][0]


def test_a_device_that_cannot_be_written_fails_the_request_with_nothing_done(
    client: TestClient,
    admin: dict[str, str],
    context: AppContext,
    audit_file: Path,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _make_records(client, admin, 2)
    before = _rows(engine)
    audit_file.unlink()
    audit_file.mkdir()  # the device's path can no longer be written
    response = client.post(
        "/v1/tokens", json={"name": "never-made", "role": "operator"}, headers=admin
    )
    body = assert_problem(response, 503, "audit-device-failed")
    assert str(audit_file) not in body["detail"]  # the server's log names it, not the answer
    assert any(str(audit_file) in r.getMessage() for r in caplog.records)
    with engine.connect() as connection:
        assert (
            connection.execute(
                text("SELECT count(*) FROM api_tokens WHERE name = 'never-made'")
            ).scalar_one()
            == 0
        )
    assert _rows(engine) == before  # no audit record either
    audit_file.rmdir()
    _make_records(client, admin, 1, tag="after")  # a writable device: requests work again
    assert client.get("/v1/tokens", params={"name": "after-0"}, headers=admin).status_code == 200


class _Broken(AuditDevice):
    name = "broken"

    def write(self, lines: Any) -> None:
        raise PermissionError(13, "Permission denied")


class _Kept(AuditDevice):
    def __init__(self) -> None:
        self.name = "kept"
        self.lines: list[str] = []

    def write(self, lines: Any) -> None:
        self.lines += [line.decode() for line in lines]


def test_a_failing_second_device_voids_the_first_and_rolls_back(db: Database) -> None:
    kept = _Kept()
    db.trail = AuditTrail(devices=[kept, _Broken()])
    with (
        pytest.raises(Exception, match="audit device 2 of 2 cannot be written") as caught,
        db.work() as work,
    ):
        work.audit("test.action", actor="t")
    assert getattr(caught.value, "code", None) == "audit-device-failed"
    with db.reading() as reads:
        assert audit.records_after(reads) == []
    log = read_device("kept", kept.lines)
    assert log.voided == {(1, log.records[1][0].hash)}
    assert compare([], [], [log]) == []  # a voided record is not "deleted"
    db.trail = AuditTrail(devices=[kept])
    with db.work() as work:  # seq 1 again, with another hash
        work.audit("test.action", actor="t2")
    with db.reading() as reads:
        records = audit.records_after(reads)
    assert compare(records, [], [read_device("kept", kept.lines)]) == []


def test_several_node_files_are_combined() -> None:
    lines = []
    db_records = []
    prev = audit.GENESIS_HASH
    for seq in range(1, 7):
        columns: dict[str, Any] = {
            "seq": seq,
            "at": datetime(2026, 12, 6, tzinfo=UTC),
            "actor": f"node-{seq % 2}",
            "action": "a",
            "subject": "",
            "outcome": "success",
            "details": "{}",
            "prev_hash": prev,
        }
        columns["hash"] = prev = audit.record_hash(**columns)
        lines.append(record_line(columns).decode())
        db_records.append(audit.AuditRecord(**columns))
    node0 = read_device("node-0", lines[1::2])
    node1 = read_device("node-1", lines[0::2])
    assert compare(db_records, [], [node0, node1]) == []
    alone = compare(db_records, [], [node1])
    assert [p.seq for p in alone] == [2, 4, 6]
    assert all("in no audit device" in p.problem for p in alone)
    assert compare(db_records, [], [node1], complete=False) == []


def test_syslog_device_sends_rfc5424_messages_with_the_record_hash(db: Database) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        port = server.getsockname()[1]
        db.trail = AuditTrail(devices=[SyslogDevice(f"udp://127.0.0.1:{port}")])
        with db.work() as work:
            work.audit("test.syslog", actor="t", details={"note": "détail"})
        message = server.recv(65536).decode()
    with db.reading() as reads:
        (record,) = audit.records_after(reads)
    header, _, body = message.partition(" - \ufeff{")
    assert header.startswith("<110>1 ") and header.endswith(
        " trustfleet " + header.split()[4] + " audit"
    )
    assert json.loads("{" + body)["hash"] == record.hash
    # a collector's file of such messages is a device file audit verify can read
    log = read_device("syslog.log", [message])
    assert compare([record], [], [log]) == []


def test_syslog_device_that_cannot_send_fails_the_work(db: Database, tmp_path: Path) -> None:
    db.trail = AuditTrail(devices=[SyslogDevice(f"unix://{tmp_path / 'no-such-socket'}")])
    with pytest.raises(Exception, match="cannot be written"), db.work() as work:
        work.audit("test.syslog", actor="t")
    with db.reading() as reads:
        assert audit.records_after(reads) == []


@pytest.mark.pkcs11
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_checkpoints_are_signed_inside_a_pkcs11_token(
    db: Database, hsm_store: Any, settings: Settings, engine: Engine
) -> None:
    context = AppContext(settings=settings, db=db, keystore=hsm_store)
    with TestClient(create_app(context), raise_server_exceptions=False) as client:
        admin = bearer(create_token(db, "hsm admin", "admin")[0])
        _make_records(client, admin, 6)
    (key,) = [k for k in hsm_store.list() if k.label == CHECKPOINT_KEY_LABEL]
    assert key.custody == "token"  # the signature is made where a database writer cannot reach
    assert verify_audit(context).ok
    _rehash_everything(engine)
    named = _named(verify_audit(context))
    assert any("the chain was rewritten" in p for p in named[EVERY])


def test_each_node_file_holds_what_it_wrote_and_together_they_hold_everything(
    database_url: str, tmp_path: Path
) -> None:
    per_node = 12
    engines = [make_engine(database_url) for _ in range(2)]
    files = [tmp_path / f"node-{n}.jsonl" for n in range(2)]
    try:
        migrate(engines[0])
        nodes = [
            Database(engine, AuditTrail(devices=[FileDevice(path)]))
            for engine, path in zip(engines, files, strict=True)
        ]
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def writer(node: Database, name: str) -> None:
            try:
                barrier.wait()
                for i in range(per_node):
                    with node.work() as work:
                        work.audit("test.node", actor=name, details={"i": i})
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [
            threading.Thread(target=writer, args=(node, f"node-{n}"))
            for n, node in enumerate(nodes)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        logs = [read_device_file(path) for path in files]
        for n, log in enumerate(logs):
            assert list(log.records) == sorted(log.records)  # each file in chain order
            assert {e.fields["actor"] for es in log.records.values() for e in es} == {f"node-{n}"}
        with nodes[1].reading() as reads:
            records = list(audit.all_records(reads))
        assert len(records) == 2 * per_node
        assert compare(records, [], logs) == []
        # the file that starts first, alone, lacks the other node's later records
        earliest = min(logs, key=lambda log: min(log.records))
        alone = compare(records, [], [earliest])
        assert alone and all("in no audit device" in p.problem for p in alone)
        assert compare(records, [], [earliest], complete=False) == []
    finally:
        for engine in engines:
            engine.dispose()


def test_a_checkpoint_is_also_made_when_none_was_for_a_while(
    db: Database, context: AppContext
) -> None:
    trail = AuditTrail(checkpoint_seconds=60, signer=KeyStoreSigner(context.keystore, db))
    db.trail = trail
    with db.work() as work:  # the process has just started: not due yet
        work.audit("test.quiet", actor="t")
    trail._last_checkpoint -= 61  # a quiet hour later
    for _ in range(2):
        with db.work() as work:
            work.audit("test.quiet", actor="t")
    with db.reading() as reads:
        assert [c.seq for c in audit.checkpoints(reads)] == [2]
    assert verify_audit(_without_devices(context)).ok


def test_changing_the_checkpoint_interval_is_not_taken_for_deleted_checkpoints(
    db: Database, context: AppContext
) -> None:
    signer = KeyStoreSigner(context.keystore, db)
    for every, count in ((4, 9), (2, 5)):
        db.trail = AuditTrail(checkpoint_every=every, signer=signer)
        for _ in range(count):
            with db.work() as work:
                work.audit("test.interval", actor="t")
    with db.reading() as reads:
        made = [(c.seq, c.every) for c in audit.checkpoints(reads)]
    assert made == [(4, 4), (8, 4), (10, 2), (12, 2), (14, 2)]
    now = dataclasses.replace(
        context,
        settings=dataclasses.replace(context.settings, audit_file="", audit_checkpoint_every=2),
    )
    assert verify_audit(now).ok, verify_audit(now).problems
    with db.work() as work:
        work.run(audit.AuditCheckpoint.__table__.delete().where(audit.AuditCheckpoint.seq == 12))
    assert [p.seq for p in verify_audit(now).problems] == [12]
