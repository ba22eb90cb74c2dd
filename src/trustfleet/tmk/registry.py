"""Terminal registry: manufacturers register terminals (SN + TKP public key), singly or in
streamed bulk; operators suspend, revoke and re-activate them.

A bulk import is one transaction: every row is either registered, recognised as already
registered with the same key (``unchanged``: re-importing a file changes nothing), or
rejected with a per-row code. Rejected rows never stop the others.
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
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.crypto import algorithm_of, load_public_key, public_key_to_der
from trustfleet.crypto.base import KeyAlgorithm, PublicKey
from trustfleet.errors import Conflict, CryptoError, InvalidInput, NotFound, UnsupportedAlgorithm
from trustfleet.store.audit import append as audit
from trustfleet.store.engine import transaction
from trustfleet.tmk.models import Terminal

SN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODEL_MAX = 100
TKP_ALGORITHMS = frozenset(
    {KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072, KeyAlgorithm.EC_P256, KeyAlgorithm.SM2}
)
CHUNK_ROWS = 1000
STATUSES = ("active", "suspended", "revoked")


class TerminalNotFound(NotFound):
    code = "terminal-not-found"
    title = "No terminal is registered with that SN"


class TerminalStateConflict(Conflict):
    code = "terminal-state-conflict"
    title = "The terminal's status does not allow this change"


class TerminalAlreadyRegistered(Conflict):
    code = "terminal-already-registered"
    title = "A terminal with that SN is registered with another key"


class InvalidTerminalRecord(InvalidInput):
    code = "invalid-terminal-record"
    title = "The terminal record is not valid"


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
        raise InvalidTerminalRecord("public_key is neither PEM nor base64 DER") from exc


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
    except (CryptoError, InvalidTerminalRecord) as exc:
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
    fields = set(reader.fieldnames or [])
    if not {"sn", "public_key"} <= fields:
        raise InvalidTerminalRecord("the CSV header must name the columns sn and public_key")
    for number, row in enumerate(reader, start=1):
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
        raise InvalidTerminalRecord("the body is not valid JSON") from None
    if not isinstance(items, list):
        raise InvalidTerminalRecord("a JSON import must be an array of objects")
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


def _import_chunk(
    session: Session,
    chunk: list[RawRecord | RowRejection],
    seen: dict[str, str],
    report: ImportReport,
    actor: str,
    now: datetime,
) -> list[str]:
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
    wanted = [v.sn for v in valid]
    query = select(Terminal.sn, Terminal.key_fingerprint).where(Terminal.sn.in_(wanted))
    existing = {sn: fingerprint for sn, fingerprint in session.execute(query)}
    new_rows: list[dict[str, Any]] = []
    for record in valid:
        registered = existing.get(record.sn)
        if registered == record.fingerprint:
            report.unchanged += 1
        elif registered is not None:
            report.rejected.append(
                RowRejection(
                    record.row, record.sn, "duplicate-sn", "sn is registered with another key"
                )
            )
        else:
            new_rows.append(_terminal_row(record, actor, now))
    if new_rows:
        session.execute(insert(Terminal), new_rows)
        report.accepted += len(new_rows)
    return [r["sn"] for r in new_rows]


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
    sessions: sessionmaker[Session],
    rows: Iterable[RawRecord | RowRejection],
    *,
    actor: str,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Register every valid row in one transaction; report the rest row by row."""
    report = ImportReport()
    seen: dict[str, str] = {}
    registered = hashlib.sha256()
    now = datetime.now(UTC)
    with transaction(sessions) as session:
        for chunk in _chunks(rows, CHUNK_ROWS):
            for sn in _import_chunk(session, chunk, seen, report, actor, now):
                registered.update(sn.encode() + b"\n")
            if progress:
                progress(len(chunk))
        audit(
            session,
            action="tmk.terminals_imported",
            actor=actor,
            subject="terminals",
            details={
                "accepted": report.accepted,
                "unchanged": report.unchanged,
                "rejected": len(report.rejected),
                "accepted_sn_sha256": registered.hexdigest(),
            },
        )
    return report


def register_terminal(
    sessions: sessionmaker[Session], *, sn: str, model: str, public_key: str, actor: str
) -> Terminal:
    """Register one terminal; an identical re-registration returns the existing record."""
    checked = validate_record(RawRecord(1, sn.strip(), model.strip(), public_key))
    if isinstance(checked, RowRejection):
        raise InvalidTerminalRecord(checked.message, reason=checked.code)
    with transaction(sessions) as session:
        existing = session.get(Terminal, checked.sn)
        if existing is not None:
            if existing.key_fingerprint != checked.fingerprint:
                raise TerminalAlreadyRegistered(
                    f"terminal {checked.sn} is registered with another key"
                )
            return existing
        now = datetime.now(UTC)
        terminal = Terminal(**_terminal_row(checked, actor, now))
        session.add(terminal)
        audit(
            session,
            action="tmk.terminal_registered",
            actor=actor,
            subject=checked.sn,
            details={"algorithm": checked.algorithm.value, "key_sha256": checked.fingerprint},
        )
    return terminal


_TRANSITIONS = {
    "suspend": ({"active"}, "suspended"),
    "revoke": ({"active", "suspended"}, "revoked"),
    "reactivate": ({"suspended"}, "active"),
}


def change_status(
    sessions: sessionmaker[Session], sn: str, action: str, *, actor: str, reason: str = ""
) -> Terminal:
    """``suspend`` (active→suspended), ``revoke`` (final) or ``reactivate`` (suspended→active)."""
    if action not in _TRANSITIONS:
        raise InvalidInput(f"unknown status change {action!r}")
    allowed_from, target = _TRANSITIONS[action]
    with transaction(sessions) as session:
        terminal = session.get(Terminal, sn, with_for_update=True)
        if terminal is None:
            raise TerminalNotFound(f"no terminal {sn!r}")
        if terminal.status not in allowed_from:
            raise TerminalStateConflict(f"cannot {action} a terminal that is {terminal.status}")
        previous, terminal.status = terminal.status, target
        terminal.updated_at = datetime.now(UTC)
        audit(
            session,
            action=f"tmk.terminal_{target}",
            actor=actor,
            subject=sn,
            details={"from": previous, "reason": reason[:200]},
        )
    return terminal


def get_terminal(sessions: sessionmaker[Session], sn: str) -> Terminal:
    with sessions() as session:
        terminal = session.get(Terminal, sn)
    if terminal is None:
        raise TerminalNotFound(f"no terminal {sn!r}")
    return terminal
