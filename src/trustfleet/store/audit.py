"""Append-only, hash-chained audit log.

Each record's ``hash`` is SHA-256 over the canonical JSON of its fields and the previous
record's hash, and ``seq`` runs 1, 2, 3... without gaps. :func:`verify_chain` therefore
detects an edited record (its hash no longer matches), a deleted one (a gap in ``seq`` and a
broken link) and a reordering (links broken). Records are appended inside the caller's
transaction, so a use case and its audit record commit or roll back together.

Callers must never put key material in ``details``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import DateTime, Integer, String, Text, bindparam, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.sql.expression import ClauseElement

from trustfleet.errors import Conflict
from trustfleet.store.driver import (
    IntegrityViolation,
    RawConnection,
    insert_columns,
)
from trustfleet.store.engine import Base
from trustfleet.wire import as_utc, canonical_json

GENESIS_HASH = "0" * 64
#: ``session.info`` key listing (action, outcome) of the records appended in the open
#: transaction, for whoever counts them at commit (metrics)
PENDING_INFO_KEY = "trustfleet.audit.pending"
_POSTGRES_AUDIT_LOCK = 0x7472757374  # advisory lock id serialising appends across nodes


class AuditConflict(Conflict):
    code = "audit-conflict"
    title = "Another node appended to the audit log at the same time; retry"


class AuditRecord(Base):
    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100), index=True)
    subject: Mapped[str] = mapped_column(String(500), index=True)
    outcome: Mapped[str] = mapped_column(String(20))
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditCheckpoint(Base):
    """A signed statement that the chain's head was ``head_hash`` at ``seq``: made every
    ``audit_checkpoint_every`` records in the appending transaction and written to the
    audit devices too (:mod:`trustfleet.store.audit_devices`). The signature is by a
    key-store key (label ``audit-checkpoint``), so someone who can only write the database
    cannot rewrite the chain below a checkpoint, nor make a checkpoint of their own."""

    __tablename__ = "audit_checkpoints"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    head_hash: Mapped[str] = mapped_column(String(64))
    #: ``audit_checkpoint_every`` when it was made (what ``audit verify`` expects of the
    #: stretch of records it closes)
    every: Mapped[int] = mapped_column(Integer)
    key_handle: Mapped[str] = mapped_column(String(80))
    #: base64 of the signature over :func:`checkpoint_payload`
    signature: Mapped[str] = mapped_column(Text)


def checkpoint_payload(
    *, seq: int, head_hash: str, every: int, at: datetime, key_handle: str
) -> bytes:
    """What a checkpoint's signature covers."""
    fields = {
        "type": "trustfleet-audit-checkpoint",
        "seq": seq,
        "head_hash": head_hash,
        "every": every,
        "at": _timestamp(at),
        "key_handle": key_handle,
    }
    return canonical_json(fields)


def timestamp(at: datetime) -> str:
    """A record's time as its hash covers it (UTC, no zone, microseconds)."""
    return _timestamp(at)


def _timestamp(at: datetime) -> str:
    return as_utc(at).replace(tzinfo=None).isoformat(timespec="microseconds")


def _clip(value: str, length: int) -> str:
    # PostgreSQL refuses over-long values (and NUL); a failed audit write must not turn a
    # refused request into a 500, so clip to the column and drop NULs before hashing.
    return value.replace("\x00", "")[:length]


def record_hash(
    *,
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    subject: str,
    outcome: str,
    details: str,
    prev_hash: str,
) -> str:
    fields = {
        "seq": seq,
        "at": _timestamp(at),
        "actor": actor,
        "action": action,
        "subject": subject,
        "outcome": outcome,
        "details": details,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(fields)).hexdigest()


class ChainedRecord(Protocol):
    """What the chain's check reads of a record: an :class:`AuditRecord`, or a row of its
    columns (:func:`records_after`)."""

    @property
    def seq(self) -> int: ...
    @property
    def at(self) -> datetime: ...
    @property
    def actor(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def subject(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def details(self) -> str: ...
    @property
    def prev_hash(self) -> str: ...
    @property
    def hash(self) -> str: ...


def _hash_of(rec: ChainedRecord) -> str:
    return record_hash(
        seq=rec.seq,
        at=rec.at,
        actor=rec.actor,
        action=rec.action,
        subject=rec.subject,
        outcome=rec.outcome,
        details=rec.details,
        prev_hash=rec.prev_hash,
    )


def _length(column: Any) -> int:
    return int(column.type.length)


_ACTOR_CHARS = _length(AuditRecord.actor)
_ACTION_CHARS = _length(AuditRecord.action)
_SUBJECT_CHARS = _length(AuditRecord.subject)
_OUTCOME_CHARS = _length(AuditRecord.outcome)
_ADVISORY_LOCK = select(func.pg_advisory_xact_lock(bindparam("k")))
_HEAD = select(AuditRecord.seq, AuditRecord.hash).order_by(AuditRecord.seq.desc()).limit(1)
_INSERT = insert_columns(*AuditRecord.__table__.columns)
_INSERT_CHECKPOINT = insert_columns(*AuditCheckpoint.__table__.columns)
_CHECKPOINTS = select(*AuditCheckpoint.__table__.columns).order_by(AuditCheckpoint.seq)
_LAST_CHECKPOINT_KEY = (
    select(AuditCheckpoint.key_handle).order_by(AuditCheckpoint.seq.desc()).limit(1)
)


def append(
    connection: RawConnection,
    *,
    action: str,
    actor: str,
    subject: str = "",
    outcome: str = "success",
    details: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """Append one record in the connection's transaction (the unit of work calls this at
    its end: :meth:`trustfleet.store.work.UnitOfWork.audit`); the record's columns."""
    columns = _append(connection, action, actor, subject, outcome, details, at)
    connection.info.setdefault(PENDING_INFO_KEY, []).append((columns["action"], columns["outcome"]))
    return columns


def _append(
    connection: RawConnection,
    action: str,
    actor: str,
    subject: str,
    outcome: str,
    details: dict[str, Any] | None,
    at: datetime | None,
) -> dict[str, Any]:
    """Insert the next record in the connection's transaction; its columns."""
    if connection.dialect_name == "postgresql":
        connection.one(_ADVISORY_LOCK, {"k": _POSTGRES_AUDIT_LOCK})
    columns = _record(connection.one(_HEAD), action, actor, subject, outcome, details, at)
    try:  # a plain insert: the record is never updated, so it needs no ORM bookkeeping
        connection.run(_INSERT, columns)
    except IntegrityViolation as exc:  # another node appended the same seq first
        raise AuditConflict() from exc
    return columns


def _record(
    head: Any,
    action: str,
    actor: str,
    subject: str,
    outcome: str,
    details: dict[str, Any] | None,
    at: datetime | None,
) -> dict[str, Any]:
    """The columns of the next record after ``head`` (the newest record's (seq, hash), or
    None), its hash included."""
    seq, prev_hash = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
    columns: dict[str, Any] = {
        "seq": seq,
        "at": as_utc(at or datetime.now(UTC)),
        "actor": _clip(actor, _ACTOR_CHARS),
        "action": _clip(action, _ACTION_CHARS),
        "subject": _clip(subject, _SUBJECT_CHARS),
        "outcome": _clip(outcome, _OUTCOME_CHARS),
        "details": canonical_json(details or {}).decode(),
        "prev_hash": prev_hash,
    }
    columns["hash"] = record_hash(**columns)
    return columns


def insert_checkpoint(connection: RawConnection, columns: dict[str, Any]) -> None:
    """Store a signed checkpoint in the connection's transaction (the appending one)."""
    connection.run(_INSERT_CHECKPOINT, columns)


def last_checkpoint_key(reads: Reads) -> str | None:
    """The key handle of the newest checkpoint, or None."""
    handle: str | None = reads.scalar(_LAST_CHECKPOINT_KEY)
    return handle


def checkpoints(reads: Reads) -> list[Any]:
    """Every checkpoint, oldest first: rows of :class:`AuditCheckpoint`'s columns."""
    return reads.all(_CHECKPOINTS)


@dataclass(frozen=True)
class ChainProblem:
    seq: int
    problem: str


@dataclass(frozen=True)
class ChainReport:
    records: int
    problems: list[ChainProblem]

    @property
    def ok(self) -> bool:
        return not self.problems


def iter_records(session: Session, batch: int = 1000) -> Iterator[AuditRecord]:
    last = 0
    while True:
        rows = list(
            session.scalars(
                select(AuditRecord)
                .where(AuditRecord.seq > last)
                .order_by(AuditRecord.seq)
                .limit(batch)
            )
        )
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


class Reads(Protocol):
    """The reads :func:`records_after` needs (:class:`trustfleet.store.work.Reads`, which
    cannot be imported here: the unit of work appends through this module)."""

    def all(self, statement: ClauseElement, /, **params: Any) -> list[Any]: ...

    def scalar(self, statement: ClauseElement, /, **params: Any) -> Any: ...


_RECORDS_AFTER = (
    select(*AuditRecord.__table__.columns)
    .where(AuditRecord.seq > bindparam("after_seq"))
    .order_by(AuditRecord.seq)
    .limit(bindparam("limit"))
)


def records_after(reads: Reads, after_seq: int = 0, limit: int = 1000) -> list[ChainedRecord]:
    """The records with ``seq > after_seq``, oldest first, at most ``limit``: rows of the
    record's columns."""
    rows: list[ChainedRecord] = reads.all(_RECORDS_AFTER, after_seq=after_seq, limit=limit)
    return rows


def find_records(
    reads: Reads,
    *,
    after_seq: int = 0,
    limit: int = 100,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[ChainedRecord]:
    """Records with ``seq > after_seq`` that match every filter given, oldest first, at most
    ``limit``. ``action`` is exact, or a prefix when it ends with ``*`` (``tmk.*``);
    ``actor`` is exact; ``since`` <= ``at`` < ``until``."""
    statement = select(*AuditRecord.__table__.columns).where(AuditRecord.seq > after_seq)
    if action is not None:
        if action.endswith("*"):
            statement = statement.where(AuditRecord.action.startswith(action[:-1], autoescape=True))
        else:
            statement = statement.where(AuditRecord.action == action)
    if actor is not None:
        statement = statement.where(AuditRecord.actor == actor)
    if since is not None:
        statement = statement.where(AuditRecord.at >= as_utc(since))
    if until is not None:
        statement = statement.where(AuditRecord.at < as_utc(until))
    rows: list[ChainedRecord] = reads.all(statement.order_by(AuditRecord.seq).limit(limit))
    return rows


def all_records(reads: Reads, batch: int = 1000) -> Iterator[ChainedRecord]:
    """Every record, oldest first, read ``batch`` at a time."""
    last = 0
    while rows := records_after(reads, last, batch):
        yield from rows
        last = rows[-1].seq


def verify_chain(records: Iterable[ChainedRecord]) -> ChainReport:
    """Walk the records in ``seq`` order and report every break in the chain."""
    problems: list[ChainProblem] = []
    expected_seq, prev_hash, count = 1, GENESIS_HASH, 0
    for rec in records:
        count += 1
        if rec.seq != expected_seq:
            problems.append(ChainProblem(rec.seq, f"expected seq {expected_seq}: records missing"))
        if rec.prev_hash != prev_hash:
            problems.append(ChainProblem(rec.seq, "does not link to the previous record"))
        if _hash_of(rec) != rec.hash:
            problems.append(ChainProblem(rec.seq, "content does not match its hash (edited)"))
        expected_seq, prev_hash = rec.seq + 1, rec.hash
    return ChainReport(records=count, problems=problems)
