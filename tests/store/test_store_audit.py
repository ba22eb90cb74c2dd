"""The hash-chained audit log: tampering of any kind is detected, concurrent writers from
several engines (as several nodes would be) still produce one valid chain."""

from __future__ import annotations

import itertools
import json
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, text
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.store import Database, audit
from trustfleet.store.engine import make_engine, make_session_factory


def _append_records(sessions: sessionmaker[Session], count: int) -> None:
    db = Database(sessions.kw["bind"])
    for i in range(count):
        with db.work() as work:
            work.audit(
                "test.action",
                actor=f"actor-{i}",
                subject=f"subject-{i}",
                outcome="success" if i % 2 else "failure",
                details={"i": i, "note": "détail ✓"},
            )


def _verify(sessions: sessionmaker[Session]) -> audit.ChainReport:
    with sessions() as session:
        return audit.verify_chain(audit.iter_records(session))


def _sql(engine: Engine, statement: str) -> None:
    # straight to the database, as an attacker with DB access would
    with engine.begin() as connection:
        connection.execute(text(statement))


def test_untouched_chain_verifies(sessions: sessionmaker[Session]) -> None:
    _append_records(sessions, 6)
    report = _verify(sessions)
    assert report.ok, report.problems
    assert report.records == 6


def test_empty_log_verifies(sessions: sessionmaker[Session]) -> None:
    report = _verify(sessions)
    assert report.ok and report.records == 0


def test_seq_runs_without_gaps_and_links(sessions: sessionmaker[Session]) -> None:
    _append_records(sessions, 4)
    with sessions() as session:
        records = list(audit.iter_records(session, batch=3))  # crosses a batch boundary
    assert [r.seq for r in records] == [1, 2, 3, 4]
    assert records[0].prev_hash == audit.GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))


def test_records_read_through_a_database_come_in_seq_order_across_batches(
    sessions: sessionmaker[Session], db: Database
) -> None:
    _append_records(sessions, 4)
    with db.reading() as reads:
        records = list(audit.all_records(reads, batch=3))  # crosses a batch boundary
        page = audit.records_after(reads, after_seq=1, limit=2)
    assert [r.seq for r in records] == [1, 2, 3, 4]
    assert [r.seq for r in page] == [2, 3]
    assert audit.verify_chain(records).ok
    with sessions() as session:
        assert [r.hash for r in audit.iter_records(session)] == [r.hash for r in records]


@pytest.mark.parametrize(
    "column, value",
    [
        ("outcome", "success"),
        ("actor", "someone else"),
        ("details", '{"i":2,"note":"changed"}'),
        ("subject", "subject-x"),
    ],
)
def test_edited_field_is_detected(
    engine: Engine, sessions: sessionmaker[Session], column: str, value: str
) -> None:
    _append_records(sessions, 5)
    # record 3 has outcome "failure"; every edit below changes its content
    with engine.begin() as connection:
        statement = text(f"UPDATE audit_log SET {column} = :v WHERE seq = 3")  # noqa: S608
        connection.execute(statement, {"v": value})
    report = _verify(sessions)
    assert not report.ok
    assert [p.seq for p in report.problems] == [3]
    assert "edited" in report.problems[0].problem


def test_edited_timestamp_is_detected(engine: Engine, sessions: sessionmaker[Session]) -> None:
    _append_records(sessions, 3)
    with sessions() as session:
        rec = session.get(audit.AuditRecord, 2)
        assert rec is not None
        earlier = rec.at - timedelta(days=1)
    with engine.begin() as connection:
        connection.execute(text("UPDATE audit_log SET at = :at WHERE seq = 2"), {"at": earlier})
    assert [p.seq for p in _verify(sessions).problems] == [2]


def test_edit_with_recomputed_hash_breaks_the_next_link(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    _append_records(sessions, 4)
    with sessions() as session:
        rec = session.get(audit.AuditRecord, 2)
        assert rec is not None
        forged = audit.record_hash(
            seq=2,
            at=rec.at,
            actor="forger",
            action=rec.action,
            subject=rec.subject,
            outcome=rec.outcome,
            details=rec.details,
            prev_hash=rec.prev_hash,
        )
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE audit_log SET actor = 'forger', hash = :h WHERE seq = 2"), {"h": forged}
        )
    report = _verify(sessions)
    assert not report.ok
    assert [p.seq for p in report.problems] == [3]
    assert "link" in report.problems[0].problem


def test_deleted_middle_record_is_detected(engine: Engine, sessions: sessionmaker[Session]) -> None:
    _append_records(sessions, 5)
    _sql(engine, "DELETE FROM audit_log WHERE seq = 3")
    report = _verify(sessions)
    assert not report.ok
    assert report.records == 4
    assert {p.seq for p in report.problems} == {4}
    assert any("missing" in p.problem for p in report.problems)


def test_swapped_records_are_detected(engine: Engine, sessions: sessionmaker[Session]) -> None:
    _append_records(sessions, 5)
    _sql(engine, "UPDATE audit_log SET seq = -1 WHERE seq = 2")
    _sql(engine, "UPDATE audit_log SET seq = 2 WHERE seq = 3")
    _sql(engine, "UPDATE audit_log SET seq = 3 WHERE seq = -1")
    report = _verify(sessions)
    assert not report.ok
    assert {2, 3} <= {p.seq for p in report.problems}


def test_record_appended_in_rolled_back_transaction_is_gone(
    db: Database, sessions: sessionmaker[Session]
) -> None:
    _append_records(sessions, 2)
    with pytest.raises(RuntimeError), db.work() as work:
        work.audit("test.rollback", actor="t")
        raise RuntimeError("the use case failed")
    _append_records(sessions, 1)
    report = _verify(sessions)
    assert report.ok and report.records == 3


def test_non_utc_timestamps_verify(db: Database, sessions: sessionmaker[Session]) -> None:
    shanghai = timezone(timedelta(hours=8))
    with db.work() as work:
        work.audit("test.tz", actor="t", at=datetime.now(shanghai))
        work.audit("test.tz", actor="t", at=datetime.now(UTC))
    assert _verify(sessions).ok


def test_chain_verifies_in_any_session_time_zone(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("only PostgreSQL hands back timestamps in the session's time zone")
    _append_records(sessions, 3)
    with sessions() as session:
        session.execute(text("SET TIME ZONE 'Asia/Shanghai'"))
        report = audit.verify_chain(audit.iter_records(session))
    assert report.ok, report.problems


def test_oversized_and_nul_values_are_clipped_not_refused(
    db: Database, sessions: sessionmaker[Session]
) -> None:
    with db.work() as work:
        work.audit("test.long", actor="a\x00b" * 100, subject="s" * 5000, details={})
    with db.reading() as reads:
        (rec,) = audit.records_after(reads)
    assert len(rec.subject) == 500 and "\x00" not in rec.actor
    assert _verify(sessions).ok


def test_concurrent_appends_from_two_engines_make_one_chain(database_url: str) -> None:
    per_thread = 15
    engines = [make_engine(database_url) for _ in range(2)]
    try:
        from trustfleet.store.engine import migrate

        migrate(engines[0])
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def writer(engine: Engine, name: str) -> None:
            db = Database(engine)
            try:
                barrier.wait()
                for i in range(per_thread):
                    with db.work() as work:
                        work.audit("test.concurrent", actor=name, details={"i": i})
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=writer, args=(engine, f"node-{n}"))
            for n, engine in enumerate(engines)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        sessions = make_session_factory(engines[1])
        report = _verify(sessions)
        assert report.ok, report.problems
        assert report.records == 2 * per_thread
        with sessions() as session:
            actors = {r.actor for r in audit.iter_records(session)}
        assert actors == {"node-0", "node-1"}
    finally:
        for engine in engines:
            engine.dispose()


CHAIN_BEFORE_THE_WIRE_CODEC = Path(__file__).parent / "data" / "audit_chain_16f2c31.json"


def _load_saved_chain(engine: Engine) -> list[dict[str, object]]:
    """Insert, as they were stored, the records a release before the shared codec wrote
    (non-ASCII details, quotes, backslashes and emoji included)."""
    saved = json.loads(CHAIN_BEFORE_THE_WIRE_CODEC.read_text(encoding="utf-8"))["records"]
    rows = [{**row, "at": datetime.fromisoformat(row["at"])} for row in saved]
    with engine.begin() as connection:
        connection.execute(insert(audit.AuditRecord), rows)
    return saved


def test_a_chain_written_before_the_shared_codec_still_verifies(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    saved = _load_saved_chain(engine)
    report = _verify(sessions)
    assert report.ok, report.problems
    assert report.records == len(saved) == 5
    _append_records(sessions, 1)  # today's code continues the old chain
    assert _verify(sessions).ok


def test_a_saved_chain_edited_after_the_fact_is_detected(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    _load_saved_chain(engine)
    _sql(engine, "UPDATE audit_log SET details = replace(details, '密钥', 'keys') WHERE seq = 4")
    problems = _verify(sessions).problems
    assert [(p.seq, p.problem) for p in problems] == [
        (4, "content does not match its hash (edited)")
    ]
