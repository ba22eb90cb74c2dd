"""Manufacturer import: terminal keys from CSV, JSON Lines or a signed manifest, streamed.

An import is a job with an ID (the CLI uses the file's SHA-256). Its rows are read as a
stream and committed in batches of :data:`BATCH_ROWS`: each batch is one unit of work that
inserts its new keys, records its rejected rows and moves the job's ``rows_done`` forward,
so a batch is all or nothing and an import cut short (a crash, ``kill -9``) resumes after
its last committed batch when the same content is sent again under the same ID. Every row
ends as ``accepted``, ``unchanged`` (its key ID is already stored with the same key,
terminal and application: importing a file twice changes nothing) or rejected with a
code (the codes are in docs/keysync.md). Nothing holds more than a batch in memory.

Keys are sealed under the import's DEK before they reach the database (:mod:`.vault`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import load_der_public_key
from sqlalchemy import String, any_, bindparam, select, update
from sqlalchemy.dialects.postgresql import ARRAY

from trustfleet.crypto.base import PublicKey
from trustfleet.errors import CryptoError
from trustfleet.keysync import protocol
from trustfleet.keysync.errors import (
    KeysyncImportConflict,
    KeysyncInvalidImport,
    KeysyncUnknownImport,
)
from trustfleet.keysync.models import ImportRejection, KeyImport, ManufacturerKey, TerminalKey
from trustfleet.keysync.vault import Vault, fingerprint, key_row_aad, seal_key
from trustfleet.store import Database, IntegrityViolation, UnitOfWork
from trustfleet.wire import utcnow

#: rows per unit of work: about 0.1 s of write lock per batch (bench/RESULTS.md, issue 12)
BATCH_ROWS = 2000
FORMATS = ("csv", "jsonl", "manifest")
LABEL_MAX = 100
REPORT_REJECTIONS = 100
MAX_MESSAGE = 200


@dataclass(frozen=True, slots=True)
class Record:
    """One key as read, before validation; ``key`` is hex text (CSV, JSON Lines) or the
    opened bytes (manifest)."""

    row: int
    terminal_id: str
    key_id: str
    key: str | bytes
    application_id: str | None = None
    label: str = ""
    algorithm: str | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    row: int
    terminal_id: str
    key_id: str
    code: str
    message: str


Item = Record | Rejection


@dataclass
class ImportReport:
    id: str
    format: str
    status: str
    rows_done: int
    accepted: int
    unchanged: int
    rejected: int
    rejections: list[Rejection] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "format": self.format,
            "status": self.status,
            "rows_done": self.rows_done,
            "accepted": self.accepted,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
            "rejections": [rejection_dict(r) for r in self.rejections],
        }


def rejection_dict(r: Rejection) -> dict[str, Any]:
    return {
        "row": r.row,
        "terminal_id": r.terminal_id,
        "key_id": r.key_id,
        "code": r.code,
        "message": r.message,
    }


# =====================================================================================
# Readers
# =====================================================================================

CSV_COLUMNS = ("terminal_id", "key_id", "key", "application_id", "label", "algorithm")


def read_csv(lines: Iterable[str]) -> Iterator[Item]:
    """CSV with a header naming ``terminal_id``, ``key_id``, ``key`` (hex) and optionally
    ``application_id``, ``label``, ``algorithm``."""
    reader = csv.reader(iter(lines))
    header = [name.strip() for name in next(reader, [])]
    if not {"terminal_id", "key_id", "key"} <= set(header):
        raise KeysyncInvalidImport("the CSV header must name terminal_id, key_id and key")
    unknown = set(header) - set(CSV_COLUMNS)
    if unknown:
        raise KeysyncInvalidImport(f"unknown CSV column(s): {', '.join(sorted(unknown))[:80]}")
    index = {name: header.index(name) for name in header}
    terminal, key_id, key = index["terminal_id"], index["key_id"], index["key"]
    app, label, algorithm = (index.get(n) for n in ("application_id", "label", "algorithm"))
    width = len(header)
    for number, cells in enumerate(reader, start=1):
        if len(cells) != width:
            if not cells:
                continue
            yield Rejection(number, "", "", "malformed-row", f"expected {width} cells")
            continue
        yield Record(
            number,
            cells[terminal].strip(),
            cells[key_id].strip(),
            cells[key].strip(),
            (cells[app].strip() or None) if app is not None else None,
            cells[label].strip() if label is not None else "",
            (cells[algorithm].strip() or None) if algorithm is not None else None,
        )


def _from_object(number: int, obj: object) -> Item:
    if not isinstance(obj, dict):
        return Rejection(number, "", "", "malformed-row", "each line must be a JSON object")
    unknown = set(obj) - set(CSV_COLUMNS)
    if unknown:
        return Rejection(number, "", "", "malformed-row", "unknown field(s)")
    values = {name: obj.get(name) for name in CSV_COLUMNS}
    if not all(v is None or isinstance(v, str) for v in values.values()):
        return Rejection(number, "", "", "malformed-row", "every field is a string")
    return Record(
        number,
        (values["terminal_id"] or "").strip(),
        (values["key_id"] or "").strip(),
        (values["key"] or "").strip(),
        values["application_id"] or None,
        values["label"] or "",
        values["algorithm"] or None,
    )


def read_jsonl(lines: Iterable[str]) -> Iterator[Item]:
    """One JSON object per line with the CSV's fields (blank lines are skipped)."""
    number = 0
    for line in lines:
        if not line.strip():
            continue
        number += 1
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            yield Rejection(number, "", "", "malformed-row", "not a JSON object")
            continue
        yield _from_object(number, obj)


class ManifestReader:
    """Signed manifest lines (one compact JWS per terminal, protocol.py): each line's
    signature is checked against the registered key of its ``kid`` and each key value
    opened with trustfleet's import key; a line that fails is rejected whole."""

    def __init__(
        self,
        import_key: x25519.X25519PrivateKey,
        signer: Callable[[str], PublicKey | None],
    ) -> None:
        self._import_key = import_key
        self._signer = signer

    def read(self, lines: Iterable[str]) -> Iterator[Item]:
        number = 0
        for line in lines:
            if not line.strip():
                continue
            number += 1
            yield from self._line(number, line)

    def _line(self, number: int, line: str) -> Iterator[Item]:
        try:
            parsed = protocol.split_manifest_line(line)
        except protocol.ManifestFormatError as exc:
            yield Rejection(number, "", "", "unknown-format", str(exc))
            return
        public = self._signer(parsed.kid)
        if public is None:
            yield Rejection(number, "", "", "unknown-signer", "no signing key has that kid")
            return
        try:
            protocol.verify_manifest_line(parsed, public)
        except CryptoError:
            yield Rejection(number, "", "", "bad-signature", "the signature does not verify")
            return
        try:
            record = protocol.parse_manifest_payload(parsed.payload)
        except protocol.ManifestFormatError as exc:
            yield Rejection(number, "", "", "unknown-format", str(exc))
            return
        for key in record.keys:
            try:
                material = protocol.open_manifest_key(
                    key.sealed_key,
                    import_key=self._import_key,
                    kid=parsed.kid,
                    terminal_id=record.terminal_id,
                    key_id=key.key_id,
                )
            except CryptoError:
                yield Rejection(
                    number, record.terminal_id[:64], key.key_id[:64], "sealed-key-invalid",
                    "the key is not sealed to this server's import key for this record",
                )  # fmt: skip
                continue
            yield Record(
                number,
                record.terminal_id,
                key.key_id,
                material,
                key.application_id,
                key.label or "",
                key.algorithm,
            )


# =====================================================================================
# Validation
# =====================================================================================


@dataclass(frozen=True, slots=True)
class _Valid:
    row: int
    terminal_id: str
    key_id: str
    key: bytes
    application_id: str | None
    label: str
    algorithm: str


def _reject(record: Record, code: str, message: str) -> Rejection:
    return Rejection(record.row, record.terminal_id[:64], record.key_id[:64], code, message)


_TERMINAL_OK = protocol.TERMINAL_ID_PATTERN.fullmatch
_ID_OK = protocol.ID_PATTERN.fullmatch


def validate(record: Record) -> _Valid | Rejection:
    """One record's checks; the codes are listed in docs/keysync.md."""
    terminal_id, key_id, application_id, text = (
        record.terminal_id, record.key_id, record.application_id, record.key,
    )  # fmt: skip
    if not terminal_id or not key_id or not text:
        return _reject(record, "missing-field", "terminal_id, key_id and key are required")
    if not _TERMINAL_OK(terminal_id):
        return _reject(
            record, "invalid-terminal-id", f"terminal_id must be {protocol.TERMINAL_ID_RULE}"
        )
    if not _ID_OK(key_id):
        return _reject(record, "invalid-key-id", f"key_id must be {protocol.ID_RULE}")
    if application_id is not None and not _ID_OK(application_id):
        return _reject(
            record, "invalid-application-id", f"application_id must be {protocol.ID_RULE}"
        )
    if len(record.label) > LABEL_MAX:
        return _reject(record, "invalid-label", f"label is at most {LABEL_MAX} characters")
    if isinstance(text, bytes):
        key = text
    else:
        try:
            key = bytes.fromhex(text)
        except ValueError:
            return _reject(record, "malformed-key", "key must be hex (32, 48 or 64 digits)")
    try:
        algorithm = protocol.key_algorithm(record.algorithm, key)
    except ValueError as exc:
        code = "unsupported-algorithm" if "one of" in str(exc) else "malformed-key"
        return _reject(record, code, str(exc))
    return _Valid(
        record.row, terminal_id, key_id, key, application_id, record.label, algorithm.value
    )


# =====================================================================================
# The import job
# =====================================================================================

_JOB = select(
    KeyImport.id,
    KeyImport.format,
    KeyImport.content_sha256,
    KeyImport.status,
    KeyImport.rows_done,
    KeyImport.accepted,
    KeyImport.unchanged,
    KeyImport.rejected,
    KeyImport.kek_handle,
    KeyImport.sealed_dek,
).where(KeyImport.id == bindparam("b_id"))
_JOB_LOCKED = (
    select(KeyImport.rows_done, KeyImport.status)
    .where(KeyImport.id == bindparam("b_id"))
    .with_for_update()
)
_ADVANCE = (
    update(KeyImport)
    .where(KeyImport.id == bindparam("b_id"))
    .values(
        rows_done=bindparam("b_rows_done"),
        accepted=KeyImport.accepted + bindparam("b_accepted"),
        unchanged=KeyImport.unchanged + bindparam("b_unchanged"),
        rejected=KeyImport.rejected + bindparam("b_rejected"),
        updated_at=bindparam("b_now"),
    )
)
LOOKUP_SIZE = 500
#: the stored keys among LOOKUP_SIZE key IDs (one statement, compiled once)
_EXISTING = select(
    TerminalKey.key_id, TerminalKey.terminal_id, TerminalKey.application_id,
    TerminalKey.fingerprint,
).where(TerminalKey.key_id.in_([bindparam(f"k{i}") for i in range(LOOKUP_SIZE)]))  # fmt: skip
_EXISTING_ANY = select(
    TerminalKey.key_id, TerminalKey.terminal_id, TerminalKey.application_id,
    TerminalKey.fingerprint,
).where(TerminalKey.key_id == any_(bindparam("b_keys", type_=ARRAY(String(32)))))  # fmt: skip
_SIGNER = select(ManufacturerKey.public_key_der).where(ManufacturerKey.kid == bindparam("b_kid"))


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Batches of about ``size`` items that never split one row (a manifest line's keys)."""
    source = iter(items)
    while batch := list(itertools.islice(source, size)):
        for following in source:
            if following.row != batch[-1].row:
                source = itertools.chain([following], source)
                break
            batch.append(following)
        yield batch


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A batch checked and sealed, ready for its unit of work."""

    first_row: int
    last_row: int
    #: every valid occurrence of each key ID in the batch, with its fingerprint, in order
    valid: dict[str, list[tuple[_Valid, str]]]
    #: the first occurrence of each key ID, sealed under the import's DEK
    sealed: dict[str, bytes]
    rejections: list[Rejection]


def _prepare(batch: list[Item], dek: AESGCM, fingerprint_key: bytes) -> _Prepared:
    rejections: list[Rejection] = []
    valid: dict[str, list[tuple[_Valid, str]]] = {}
    for item in batch:
        checked = item if isinstance(item, Rejection) else validate(item)
        if isinstance(checked, Rejection):
            rejections.append(checked)
            continue
        mark = fingerprint(fingerprint_key, checked.key)
        valid.setdefault(checked.key_id, []).append((checked, mark))
    sealed = {key_id: _sealed(dek, found[0][0]) for key_id, found in valid.items()}
    return _Prepared(batch[0].row, batch[-1].row, valid, sealed, rejections)


_END = object()
PIPELINE_DEPTH = 2


def _pipeline(
    batches: Iterator[list[Item]], prepare: Callable[[list[Item]], _Prepared], *, after: int
) -> Iterator[_Prepared]:
    """The batches after row ``after``, read, checked and sealed on a thread of their own
    while the caller commits the previous ones (the database releases the GIL while it
    works): at most PIPELINE_DEPTH batches wait, so memory stays bounded."""
    handoff: queue.Queue[object] = queue.Queue(maxsize=PIPELINE_DEPTH)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if batch[-1].row <= after:
                    continue
                fresh = [item for item in batch if item.row > after]
                if not offer(prepare(fresh)):
                    return
            offer(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            offer(exc)

    producer = threading.Thread(target=produce, name="keysync-import-reader", daemon=True)
    producer.start()
    try:
        while True:
            item = handoff.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, _Prepared)
            yield item
    finally:
        stop.set()
        producer.join()


class KeyImports:
    """The import use case over one database and key store."""

    def __init__(
        self,
        db: Database,
        vault: Vault,
        *,
        clock: Callable[[], datetime] = utcnow,
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        self._db = db
        self._vault = vault
        self._clock = clock
        self._batch_rows = batch_rows

    # -- reading ----------------------------------------------------------------------

    def report(self, import_id: str, *, rejections: int = REPORT_REJECTIONS) -> ImportReport:
        job = self._db.read(lambda reads: reads.one(_JOB, b_id=import_id))
        if job is None:
            raise KeysyncUnknownImport(f"no import {import_id[:64]!r}")
        return ImportReport(
            job.id, job.format, job.status, job.rows_done, job.accepted, job.unchanged,
            job.rejected, self.rejections(import_id, limit=rejections),
        )  # fmt: skip

    def rejections(
        self, import_id: str, *, after_row: int = 0, limit: int = 1000
    ) -> list[Rejection]:
        query = (
            select(
                ImportRejection.row,
                ImportRejection.terminal_id,
                ImportRejection.key_id,
                ImportRejection.code,
                ImportRejection.message,
            )
            .where(ImportRejection.import_id == import_id, ImportRejection.row > after_row)
            .order_by(ImportRejection.row, ImportRejection.id)
            .limit(limit)
        )
        with self._db.reading() as reads:
            return [Rejection(*row) for row in reads.all(query)]

    # -- running ----------------------------------------------------------------------

    def run(
        self,
        import_id: str,
        kind: str,
        lines: Iterable[str],
        *,
        content_sha256: str,
        actor: str,
        progress: Callable[[int], None] | None = None,
    ) -> ImportReport:
        """Import (or resume, or answer the report of a finished import with this ID and
        content). ``lines`` is the content; ``content_sha256`` its digest."""
        if kind not in FORMATS:
            raise KeysyncInvalidImport(f"the format is one of {', '.join(FORMATS)}")
        job = self._db.read(lambda reads: reads.one(_JOB, b_id=import_id))
        if job is not None and (job.content_sha256 != content_sha256 or job.format != kind):
            raise KeysyncImportConflict(f"import {import_id[:64]!r} exists with other content")
        if job is not None and job.status == "completed":
            return self.report(import_id)
        items = self._items(kind, lines)
        first = next(items, None)  # a file unreadable as a whole fails before its job exists
        if first is not None:
            items = itertools.chain([first], items)
        if job is None:
            dek = self._create(import_id, kind, content_sha256, actor)
            done = 0
        else:
            dek = self._vault.open_dek(job.kek_handle, job.sealed_dek, import_id)
            done = job.rows_done
        fingerprint_key = self._vault.fingerprint_key()
        prepared = _pipeline(
            _batches(items, self._batch_rows),
            lambda batch: _prepare(batch, dek, fingerprint_key),
            after=done,
        )
        for batch in prepared:
            done = self._commit_batch(import_id, done, batch, actor)
            if progress:
                progress(done)
            self._db.yield_to_writers()  # the next batch is ready: let a waiting write in
        self._complete(import_id, actor)
        return self.report(import_id)

    def _items(self, kind: str, lines: Iterable[str]) -> Iterator[Item]:
        if kind == "csv":
            return read_csv(lines)
        if kind == "jsonl":
            return read_jsonl(lines)
        reader = ManifestReader(self._vault.import_private_key(), self._signer())
        return reader.read(lines)

    def _signer(self) -> Callable[[str], PublicKey | None]:
        known: dict[str, PublicKey | None] = {}

        def signer(kid: str) -> PublicKey | None:
            if kid not in known:
                der = self._db.read(lambda reads: reads.scalar(_SIGNER, b_kid=kid))
                known[kid] = load_der_public_key(der) if der is not None else None  # type: ignore[assignment]
            return known[kid]

        return signer

    def _create(self, import_id: str, kind: str, digest: str, actor: str) -> AESGCM:
        kek, sealed, dek = self._vault.new_dek(import_id)  # key store: outside the work
        now = self._clock()
        try:
            with self._db.work() as uow:
                uow.insert(
                    KeyImport,
                    id=import_id, format=kind, content_sha256=digest, status="running",
                    rows_done=0, accepted=0, unchanged=0, rejected=0, kek_handle=kek,
                    sealed_dek=sealed, created_by=actor, created_at=now, updated_at=now,
                    completed_at=None,
                )  # fmt: skip
                uow.audit(
                    "keysync.import_started",
                    actor=actor,
                    subject=import_id,
                    details={"format": kind, "content_sha256": digest},
                )
        except IntegrityViolation:
            raise KeysyncImportConflict(f"import {import_id[:64]!r} started elsewhere") from None
        return dek

    def _commit_batch(self, import_id: str, done: int, batch: _Prepared, actor: str) -> int:
        """One batch's unit of work: decide each key against what is stored, insert the new
        ones, record the rejected rows, move ``rows_done``, audit."""
        rejections = list(batch.rejections)
        now = self._clock()
        with self._db.work() as uow:
            job = uow.one(_JOB_LOCKED, b_id=import_id)
            if job is None or job.status != "running" or job.rows_done != done:
                raise KeysyncImportConflict(f"import {import_id[:64]!r} is running elsewhere")
            new_rows, unchanged = self._new_rows(
                uow, batch.valid, batch.sealed, rejections, import_id, now
            )
            uow.insert_rows(TerminalKey, KEY_COLUMNS, new_rows)
            rejections.sort(key=lambda r: r.row)
            uow.insert_many(
                ImportRejection,
                [{"import_id": import_id, **_short(rejection_dict(r))} for r in rejections],
            )
            uow.run(
                _ADVANCE, b_id=import_id, b_rows_done=batch.last_row, b_accepted=len(new_rows),
                b_unchanged=unchanged, b_rejected=len(rejections), b_now=now,
            )  # fmt: skip
            uow.audit(
                "keysync.keys_imported",
                actor=actor,
                subject=import_id,
                details={
                    "rows": [batch.first_row, batch.last_row],
                    "accepted": len(new_rows),
                    "unchanged": unchanged,
                    "rejected": len(rejections),
                },
            )
        return batch.last_row

    def _new_rows(
        self,
        uow: UnitOfWork,
        valid: dict[str, list[tuple[_Valid, str]]],
        sealed: dict[str, bytes],
        rejections: list[Rejection],
        import_id: str,
        now: datetime,
    ) -> tuple[list[tuple[Any, ...]], int]:
        """The rows to insert, and how many records were already there. A key ID already
        stored decides each of its records; else its first record here is new and the
        later ones must match it."""
        existing: dict[str, Any] = {}
        wanted = list(valid)
        if uow.dialect_name == "postgresql":  # one array parameter, one round trip
            existing.update((row.key_id, row) for row in uow.all(_EXISTING_ANY, b_keys=wanted))
            wanted = []
        for start in range(0, len(wanted), LOOKUP_SIZE):
            part = wanted[start : start + LOOKUP_SIZE]
            part += [part[0]] * (LOOKUP_SIZE - len(part))  # the statement's fixed size
            found = uow.all(_EXISTING, **{f"k{i}": key_id for i, key_id in enumerate(part)})
            existing.update((row.key_id, row) for row in found)
        rows: list[tuple[Any, ...]] = []
        unchanged = 0
        for key_id in sorted(valid):  # sorted: inserts walk the key ID index in order
            records = valid[key_id]
            stored = existing.get(key_id)
            if stored is None:
                first, first_mark = records[0]
                rows.append(_row(first, first_mark, sealed[key_id], import_id, now))
                reference = (first.terminal_id, first.application_id, first_mark)
                how = "appears earlier in this file with other"
                records = records[1:]
            else:
                reference = (stored.terminal_id, stored.application_id, stored.fingerprint)
                how = "is already imported with other"
            for record, mark in records:
                if (record.terminal_id, record.application_id, mark) == reference:
                    unchanged += 1
                else:
                    rejections.append(_duplicate(record, how))
        return rows, unchanged

    def _complete(self, import_id: str, actor: str) -> None:
        now = self._clock()
        with self._db.work() as uow:
            job = uow.one(_JOB_LOCKED, b_id=import_id)
            if job is None or job.status != "running":
                return
            uow.run(
                update(KeyImport)
                .where(KeyImport.id == import_id)
                .values(status="completed", completed_at=now, updated_at=now)
            )
            uow.audit("keysync.import_completed", actor=actor, subject=import_id)


def _sealed(dek: AESGCM, record: _Valid) -> bytes:
    aad = key_row_aad(record.key_id, record.terminal_id, record.application_id, record.algorithm)
    return seal_key(dek, record.key, aad)


KEY_COLUMNS = (
    "key_id", "terminal_id", "application_id", "label", "algorithm", "sealed_key",
    "import_id", "fingerprint", "last_counter", "created_at",
)  # fmt: skip


def _row(
    record: _Valid, mark: str, sealed: bytes, import_id: str, now: datetime
) -> tuple[Any, ...]:
    """A new row in :data:`KEY_COLUMNS`' order."""
    return (
        record.key_id, record.terminal_id, record.application_id, record.label,
        record.algorithm, sealed, import_id, mark, 0, now,
    )  # fmt: skip


def _duplicate(record: _Valid, how: str) -> Rejection:
    return Rejection(
        record.row,
        record.terminal_id,
        record.key_id,
        "duplicate-key-id",
        f"the key ID {how} key material, terminal or application",
    )


def _short(values: dict[str, Any]) -> dict[str, Any]:
    return {**values, "message": str(values["message"])[:MAX_MESSAGE]}


def text_lines(body: IO[bytes]) -> Iterator[str]:
    """The lines of a UTF-8 body (a BOM is dropped), read as a stream."""
    text = io.TextIOWrapper(body, encoding="utf-8-sig", newline="")
    try:
        yield from text
    except UnicodeDecodeError:
        raise KeysyncInvalidImport("the content is not UTF-8 text") from None
    finally:
        with contextlib.suppress(ValueError):  # the body may be closed already
            text.detach()  # the body is the caller's to close


__all__ = ["FORMATS", "ImportReport", "KeyImports", "Record", "Rejection"]
