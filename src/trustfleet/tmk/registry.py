"""Terminal registry: manufacturers register terminals (SN + TKP public key), singly or in
streamed bulk. (Operators change a terminal's status in :mod:`trustfleet.tmk.terminals`.)

A bulk import commits in batches of :data:`CHUNK_ROWS` rows, each batch one short unit of
work with its audit record (its rows are validated before it begins), so that a large
import never holds the database's write lock for long: downloads and other writes take
their turn between batches. Every row is either registered, recognised as already
registered with the same key (``unchanged``: re-importing a file changes nothing), or
rejected with a per-row code. Rejected rows never stop the others. An import cut short (a
crash, ``kill -9``, a body that turns out malformed half-way) keeps the batches it
committed; sending the same file again reports those rows ``unchanged`` and registers the
rest.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm as UnsupportedAlgorithmError
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key
from sqlalchemy import bindparam, select

from trustfleet.crypto import algorithm_of, load_public_key, public_key_to_der
from trustfleet.crypto.base import KeyAlgorithm, PublicKey
from trustfleet.errors import CryptoError, UnsupportedAlgorithm
from trustfleet.store import Database, IntegrityViolation, UnitOfWork
from trustfleet.tmk.errors import TmkInvalidTerminalRecord, TmkTerminalAlreadyRegistered
from trustfleet.tmk.models import Terminal

SN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODEL_MAX = 100
TKP_ALGORITHMS = frozenset(
    {KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072, KeyAlgorithm.EC_P256, KeyAlgorithm.SM2}
)
#: rows per batch: one unit of work (a few milliseconds of write lock) per batch
CHUNK_ROWS = 1000


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One row as read from the input, before validation."""

    row: int
    sn: str
    model: str
    public_key: str


@dataclass(frozen=True, slots=True)
class RowRejection:
    row: int
    sn: str
    code: str
    message: str


@dataclass
class ImportReport:
    accepted: int = 0
    unchanged: int = 0
    rejected: list[RowRejection] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.accepted + self.unchanged + len(self.rejected)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "accepted": self.accepted,
            "unchanged": self.unchanged,
            "rejected": [_row(r) for r in self.rejected],
        }


def _row(r: RowRejection) -> dict[str, Any]:
    return {"row": r.row, "sn": r.sn, "code": r.code, "message": r.message}


@dataclass(frozen=True, slots=True)
class _ValidRecord:
    row: int
    sn: str
    model: str
    algorithm: KeyAlgorithm
    der: bytes
    fingerprint: str


# -- parsing ---------------------------------------------------------------------------


def _key_bytes(text: str) -> bytes:
    raw = text.strip()
    if raw.startswith("-----BEGIN"):
        return raw.replace("\\n", "\n").encode()
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TmkInvalidTerminalRecord("public_key is neither PEM nor base64 DER") from exc


def _is_other_wellformed_key(data: bytes) -> bool:
    """True for a valid public key of a kind trustfleet does not accept (P-384, RSA-1024...)."""
    loader = load_pem_public_key if data.startswith(b"-----BEGIN") else load_der_public_key
    try:
        loader(data)
    except (ValueError, TypeError, UnsupportedAlgorithmError):
        return False
    return True


def _decode_key(text: str) -> PublicKey:
    data = _key_bytes(text)
    try:
        return load_public_key(data)
    except CryptoError as exc:
        if _is_other_wellformed_key(data):
            raise UnsupportedAlgorithm(exc.message) from exc
        raise


def validate_record(raw: RawRecord) -> _ValidRecord | RowRejection:
    """Check one row; the rejection codes are documented in docs/tmk.md."""
    if not raw.sn:
        return RowRejection(raw.row, raw.sn, "missing-field", "sn is required")
    if not SN_PATTERN.fullmatch(raw.sn):
        return RowRejection(
            raw.row, raw.sn[:64], "invalid-sn", "sn must be 1-64 of A-Z a-z 0-9 . _ -"
        )
    if not raw.public_key:
        return RowRejection(raw.row, raw.sn, "missing-field", "public_key is required")
    if len(raw.model) > MODEL_MAX:
        return RowRejection(
            raw.row, raw.sn, "invalid-model", f"model is over {MODEL_MAX} characters"
        )
    try:
        key = _decode_key(raw.public_key)
    except (CryptoError, TmkInvalidTerminalRecord) as exc:
        code = "unsupported-algorithm" if exc.code == "unsupported-algorithm" else "malformed-key"
        return RowRejection(raw.row, raw.sn, code, exc.message)
    try:
        algorithm = algorithm_of(key)
    except CryptoError as exc:
        return RowRejection(raw.row, raw.sn, "unsupported-algorithm", exc.message)
    if algorithm not in TKP_ALGORITHMS:
        allowed = ", ".join(sorted(a.value for a in TKP_ALGORITHMS))
        return RowRejection(
            raw.row, raw.sn, "unsupported-algorithm", f"{algorithm.value} is not one of {allowed}"
        )
    der = public_key_to_der(key)
    return _ValidRecord(raw.row, raw.sn, raw.model, algorithm, der, hashlib.sha256(der).hexdigest())


def read_csv(lines: Iterable[str]) -> Iterator[RawRecord | RowRejection]:
    """CSV with a header naming ``sn``, ``public_key`` and optionally ``model``."""
    reader = csv.DictReader(iter(lines))
    try:
        fields = set(reader.fieldnames or [])
    except csv.Error:  # e.g. a carriage return inside an unquoted cell
        raise TmkInvalidTerminalRecord("the CSV header is not valid CSV") from None
    if not {"sn", "public_key"} <= fields:
        raise TmkInvalidTerminalRecord("the CSV header must name the columns sn and public_key")
    number = 0
    while True:
        number += 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield RowRejection(number, "", "malformed-row", "not valid CSV")
            continue
        if None in row:  # more cells than header columns
            yield RowRejection(
                number, (row.get("sn") or "")[:64], "malformed-row", "too many cells"
            )
            continue
        yield RawRecord(
            number,
            (row.get("sn") or "").strip(),
            (row.get("model") or "").strip(),
            row.get("public_key") or "",
        )


def _record_from_object(number: int, obj: object) -> RawRecord | RowRejection:
    if not isinstance(obj, dict):
        return RowRejection(number, "", "malformed-row", "each record must be a JSON object")
    values = {k: obj.get(k, "") for k in ("sn", "model", "public_key")}
    if not all(isinstance(v, str) for v in values.values()):
        return RowRejection(number, "", "malformed-row", "sn, model and public_key must be strings")
    return RawRecord(number, values["sn"].strip(), values["model"].strip(), values["public_key"])


def read_ndjson(lines: Iterable[str]) -> Iterator[RawRecord | RowRejection]:
    """One JSON object per line (blank lines ignored)."""
    number = 0
    for line in lines:
        if not line.strip():
            continue
        number += 1
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # bad JSON, or nested too deep to parse
            yield RowRejection(number, "", "malformed-row", "not a JSON object")
            continue
        yield _record_from_object(number, obj)


def read_json_array(text: str) -> Iterator[RawRecord | RowRejection]:
    """A JSON array of objects (read whole: use NDJSON or CSV for very large imports)."""
    try:
        items = json.loads(text)
    except (ValueError, RecursionError):  # bad JSON, or nested too deep to parse
        raise TmkInvalidTerminalRecord("the body is not valid JSON") from None
    if not isinstance(items, list):
        raise TmkInvalidTerminalRecord("a JSON import must be an array of objects")
    for number, obj in enumerate(items, start=1):
        yield _record_from_object(number, obj)


# -- importing -------------------------------------------------------------------------


def _chunks(
    rows: Iterable[RawRecord | RowRejection], size: int
) -> Iterator[list[RawRecord | RowRejection]]:
    chunk: list[RawRecord | RowRejection] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _validate_chunk(
    chunk: list[RawRecord | RowRejection],
    seen: dict[str, str],
    report: ImportReport,
) -> list[_ValidRecord]:
    """The chunk's valid rows not seen earlier in this import (no database work: the key
    parsing is the import's costliest part, and runs before the batch's transaction)."""
    valid: list[_ValidRecord] = []
    for item in chunk:
        checked = item if isinstance(item, RowRejection) else validate_record(item)
        if isinstance(checked, RowRejection):
            report.rejected.append(checked)
        elif checked.sn in seen:
            report.rejected.append(
                RowRejection(
                    checked.row, checked.sn, "duplicate-sn", "sn appears earlier in this import"
                )
            )
        else:
            seen[checked.sn] = checked.fingerprint
            valid.append(checked)
    return valid


@dataclass
class _Batch:
    """What one batch's unit of work decided."""

    new_rows: list[dict[str, Any]]
    unchanged: int
    rejected: list[RowRejection]


def _decide(uow: UnitOfWork, valid: list[_ValidRecord], actor: str, now: datetime) -> _Batch:
    """Each valid row against what is registered (read under the batch's lock)."""
    wanted = [v.sn for v in valid]
    query = select(Terminal.sn, Terminal.key_fingerprint).where(Terminal.sn.in_(wanted))
    existing = {row.sn: row.key_fingerprint for row in uow.all(query)} if wanted else {}
    batch = _Batch([], 0, [])
    for record in valid:
        registered = existing.get(record.sn)
        if registered == record.fingerprint:
            batch.unchanged += 1
        elif registered is not None:
            batch.rejected.append(
                RowRejection(
                    record.row, record.sn, "duplicate-sn", "sn is registered with another key"
                )
            )
        else:
            batch.new_rows.append(_terminal_row(record, actor, now))
    return batch


def _commit_batch(
    db: Database,
    chunk: list[RawRecord | RowRejection],
    valid: list[_ValidRecord],
    rejected_before: int,
    actor: str,
    now: datetime,
) -> _Batch:
    """One batch's unit of work: register its new rows and audit them. Should another
    import register one of its SNs between the check and the insert (the insert is then
    refused), the batch is decided again."""
    for attempt in (1, 2):
        try:
            with db.work() as uow:
                batch = _decide(uow, valid, actor, now)
                uow.insert_many(Terminal, batch.new_rows)
                registered = hashlib.sha256()
                for row in batch.new_rows:
                    registered.update(row["sn"].encode() + b"\n")
                uow.audit(
                    "tmk.terminals_imported",
                    actor=actor,
                    subject="terminals",
                    details={
                        "rows": [chunk[0].row, chunk[-1].row],
                        "accepted": len(batch.new_rows),
                        "unchanged": batch.unchanged,
                        "rejected": rejected_before + len(batch.rejected),
                        "accepted_sn_sha256": registered.hexdigest(),
                    },
                )
            return batch
        except IntegrityViolation:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _terminal_row(record: _ValidRecord, actor: str, now: datetime) -> dict[str, Any]:
    return {
        "sn": record.sn,
        "model": record.model,
        "key_algorithm": record.algorithm.value,
        "public_key_der": record.der,
        "key_fingerprint": record.fingerprint,
        "status": "active",
        "registered_by": actor,
        "created_at": now,
        "updated_at": now,
    }


def import_terminals(
    db: Database,
    rows: Iterable[RawRecord | RowRejection],
    *,
    actor: str,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Register every valid row, a batch of :data:`CHUNK_ROWS` rows per unit of work (each
    with its ``tmk.terminals_imported`` audit record); report the rest row by row."""
    report = ImportReport()
    seen: dict[str, str] = {}
    now = datetime.now(UTC)
    for chunk in _chunks(rows, CHUNK_ROWS):
        rejected_before = len(report.rejected)
        valid = _validate_chunk(chunk, seen, report)
        batch = _commit_batch(db, chunk, valid, len(report.rejected) - rejected_before, actor, now)
        report.accepted += len(batch.new_rows)
        report.unchanged += batch.unchanged
        report.rejected += batch.rejected
        if progress:
            progress(len(chunk))
    report.rejected.sort(key=lambda r: r.row)
    return report


_TERMINAL_FINGERPRINT = select(Terminal.key_fingerprint).where(Terminal.sn == bindparam("b_sn"))


def register_terminal(db: Database, *, sn: str, model: str, public_key: str, actor: str) -> str:
    """Register one terminal; registering it again with the same key changes nothing. Its
    SN (as validated)."""
    checked = validate_record(RawRecord(1, sn.strip(), model.strip(), public_key))
    if isinstance(checked, RowRejection):
        raise TmkInvalidTerminalRecord(checked.message, reason=checked.code)
    with db.work() as uow:
        registered = uow.scalar(_TERMINAL_FINGERPRINT, b_sn=checked.sn)
        if registered is not None:
            if registered != checked.fingerprint:
                raise TmkTerminalAlreadyRegistered(
                    f"terminal {checked.sn} is registered with another key"
                )
            return checked.sn
        uow.insert(Terminal, **_terminal_row(checked, actor, datetime.now(UTC)))
        uow.audit(
            "tmk.terminal_registered",
            actor=actor,
            subject=checked.sn,
            details={"algorithm": checked.algorithm.value, "key_sha256": checked.fingerprint},
        )
    return checked.sn
