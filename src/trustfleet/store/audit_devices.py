"""Audit devices: copies of the audit chain outside the database, and signed checkpoints.

The hash chain (:mod:`trustfleet.store.audit`) detects an edited, deleted or reordered
record, but not someone with write access to the database who deletes the newest records
or rewrites and rehashes the whole chain. Two things catch them:

- **devices** (as Vault has them): every record, as one JSON line carrying its chain hash,
  is written to each configured device, an append-only JSON Lines file (fsynced) and/or
  syslog (RFC 5424 over UDP or a unix socket), before the transaction commits. A device
  that cannot be written fails the unit of work (:class:`AuditDeviceFailed`): the use case
  is rolled back, and nothing is done that the devices do not hold;
- **checkpoints**: every ``checkpoint_every`` records the appending transaction signs the
  chain's head (sequence number, hash, time, key handle) with a key-store key
  (:class:`CheckpointSigner`, given by the server: the store cannot use the key store),
  stores it in ``audit_checkpoints`` and writes it to the devices.

Ordering. The records are inserted, the checkpoint made and the lines written to every
device, then the transaction commits. So a device never lacks a committed record. If a
device fails, the devices already written get a ``void`` line for those records and the
transaction rolls back. If the commit itself fails after the devices were written, every
device gets the ``void`` line (best effort: should the process die in between, the device
keeps a record the database never had, which ``audit verify`` reports as "in the device,
not in the database"; the next record reuses that sequence number with another hash, and a
device entry that a later entry of the same number superseded is not reported).

:func:`compare` checks the database's records and checkpoints against what the devices
hold; it needs no keys (the checkpoints' signatures are checked by the server, which has
the key store).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from trustfleet.errors import ConfigurationError, TrustfleetError
from trustfleet.store import audit
from trustfleet.store.audit import ChainProblem
from trustfleet.store.driver import RawConnection
from trustfleet.wire import canonical_json

#: RFC 5424 priority: facility 13 (log audit), severity 6 (informational)
SYSLOG_PRIORITY = 13 * 8 + 6
SYSLOG_APP_NAME = "trustfleet"
SYSLOG_MSGID = "audit"
UTF8_BOM = b"\xef\xbb\xbf"
log = logging.getLogger("trustfleet.audit")


class AuditDeviceFailed(TrustfleetError):
    code = "audit-device-failed"
    status = 503
    title = "An audit device could not be written, so nothing was done; retry later"


# --- lines ---------------------------------------------------------------------------


def record_line(columns: dict[str, Any]) -> bytes:
    """A record as its device line: every field the hash covers, and the hash."""
    return canonical_json(
        {
            "type": "record",
            "seq": columns["seq"],
            "at": audit.timestamp(columns["at"]),
            "actor": columns["actor"],
            "action": columns["action"],
            "subject": columns["subject"],
            "outcome": columns["outcome"],
            "details": columns["details"],
            "prev_hash": columns["prev_hash"],
            "hash": columns["hash"],
        }
    )


def checkpoint_line(columns: dict[str, Any]) -> bytes:
    return canonical_json(
        {
            "type": "checkpoint",
            "seq": columns["seq"],
            "at": audit.timestamp(columns["at"]),
            "head_hash": columns["head_hash"],
            "every": columns["every"],
            "key_handle": columns["key_handle"],
            "signature": columns["signature"],
        }
    )


def void_line(seq: int, hash_: str) -> bytes:
    """The record (``seq``, ``hash_``) written before was rolled back."""
    return canonical_json({"type": "void", "seq": seq, "hash": hash_})


# --- devices -------------------------------------------------------------------------


class AuditDevice(ABC):
    """Somewhere outside the database the audit lines go."""

    name: str

    @abstractmethod
    def write(self, lines: Sequence[bytes]) -> None:
        """Write ``lines`` durably (or hand them to the transport) before returning; raise
        OSError when that cannot be done."""


class FileDevice(AuditDevice):
    """An append-only JSON Lines file, fsynced after each write. Several processes may
    append to one file (``O_APPEND``, one ``write`` per unit of work)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        self.name = str(self.path)

    def write(self, lines: Sequence[bytes]) -> None:
        data = memoryview(b"".join(line + b"\n" for line in lines))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)


class SyslogDevice(AuditDevice):
    """RFC 5424 messages, one per line, over UDP (``udp://host:port``) or a unix datagram
    socket (``unix:///dev/log``). The message is the JSON line."""

    def __init__(self, address: str) -> None:
        self.name = address
        parts = urlsplit(address)
        if parts.scheme == "udp" and parts.hostname and parts.port:
            self._family: int | None = None
            self._target: Any = (parts.hostname, parts.port)
        elif parts.scheme == "unix" and parts.path:
            self._family = socket.AF_UNIX
            self._target = parts.path
        else:
            raise ConfigurationError(
                f"audit_syslog {address!r} must be udp://host:port or unix:///path/to/socket"
            )
        self._hostname = socket.gethostname() or "-"

    def _resolved(self) -> tuple[int, Any]:
        if self._family is None:  # resolved once, on the first write
            host, port = self._target
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            self._family, self._target = family, address
        return self._family, self._target

    def message(self, line: bytes, now: datetime | None = None) -> bytes:
        stamp = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds")
        header = (
            f"<{SYSLOG_PRIORITY}>1 {stamp.replace('+00:00', 'Z')} {self._hostname} "
            f"{SYSLOG_APP_NAME} {os.getpid()} {SYSLOG_MSGID} - "
        )
        return header.encode() + UTF8_BOM + line  # RFC 5424 6.4: UTF-8 MSG starts with a BOM

    def write(self, lines: Sequence[bytes]) -> None:
        family, address = self._resolved()
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            for line in lines:
                sock.sendto(self.message(line), address)


class CheckpointSigner(Protocol):
    """Signs checkpoints with a key-store key (the server gives one)."""

    def key_handle(self) -> str:
        """The handle of the signing key (made on first use)."""

    def sign(self, handle: str, data: bytes) -> bytes: ...


@dataclass
class AuditTrail:
    """The devices and checkpoints of one database's audit chain (see the module
    docstring); :class:`trustfleet.store.Database` runs it at the end of each unit of work
    that appended records."""

    devices: Sequence[AuditDevice] = ()
    #: a checkpoint when a unit of work appends a record whose ``seq`` is a multiple of this
    checkpoint_every: int = 0
    signer: CheckpointSigner | None = None
    #: also a checkpoint when this process made none for this many seconds (0: never); an
    #: extra checkpoint, so nodes need not agree on it
    checkpoint_seconds: float = 0
    _last_checkpoint: float = field(default_factory=time.monotonic, repr=False)

    @property
    def active(self) -> bool:
        due = self.checkpoint_every > 0 or self.checkpoint_seconds > 0
        return bool(self.devices) or (due and self.signer is not None)

    def _checkpoint_due(self, records: Sequence[dict[str, Any]]) -> bool:
        every, seconds = self.checkpoint_every, self.checkpoint_seconds
        if self.signer is None:
            return False
        if every > 0 and any(r["seq"] % every == 0 for r in records):
            return True
        return seconds > 0 and time.monotonic() - self._last_checkpoint >= seconds

    def seal(self, connection: RawConnection, records: Sequence[dict[str, Any]]) -> list[bytes]:
        """In the appending transaction, after ``records`` were inserted: the checkpoint if
        one is due (stored), and the lines for the devices (none without devices: the busy
        path pays only for what is configured)."""
        lines = [record_line(r) for r in records] if self.devices else []
        if self.signer is not None and self._checkpoint_due(records):
            self._last_checkpoint = time.monotonic()
            head = records[-1]
            handle = self.signer.key_handle()
            at = datetime.now(UTC)
            payload = audit.checkpoint_payload(
                seq=head["seq"],
                head_hash=head["hash"],
                every=self.checkpoint_every,
                at=at,
                key_handle=handle,
            )
            columns = {
                "seq": head["seq"],
                "at": at,
                "head_hash": head["hash"],
                "every": self.checkpoint_every,
                "key_handle": handle,
                "signature": _b64(self.signer.sign(handle, payload)),
            }
            audit.insert_checkpoint(connection, columns)
            if self.devices:
                lines.append(checkpoint_line(columns))
        return lines

    def write(self, lines: Sequence[bytes], records: Sequence[dict[str, Any]]) -> None:
        """Write ``lines`` to every device; if one fails, void ``records`` on the devices
        already written and raise :class:`AuditDeviceFailed`."""
        for index, device in enumerate(self.devices):
            try:
                device.write(lines)
            except OSError as exc:
                self._void(self.devices[:index], records)
                reason = exc.strerror or type(exc).__name__
                # the device's path stays in the server's log: a caller (maybe not even
                # authenticated, whose refusal was being audited) learns only the code
                log.error("the audit device %s cannot be written: %s", device.name, reason)
                raise AuditDeviceFailed(
                    f"audit device {index + 1} of {len(self.devices)} cannot be written; "
                    "nothing was done (the server's log names it)"
                ) from None

    def void(self, records: Sequence[dict[str, Any]]) -> None:
        """The transaction that wrote ``records`` to the devices did not commit."""
        self._void(self.devices, records)

    @staticmethod
    def _void(devices: Sequence[AuditDevice], records: Sequence[dict[str, Any]]) -> None:
        lines = [void_line(r["seq"], r["hash"]) for r in records]
        for device in devices:
            try:
                device.write(lines)
            except OSError:  # best effort: verify reports the record as not in the database
                continue


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- reading devices and comparing -------------------------------------------------


@dataclass(frozen=True)
class DeviceEntry:
    device: str
    line: int
    seq: int
    hash: str
    fields: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.device} line {self.line}"


@dataclass
class DeviceLog:
    """What one device file holds: records by sequence number (a number may appear twice
    when a rolled-back record's number was reused), checkpoints, voided records, and the
    lines that are unreadable or do not match their own hash."""

    name: str
    records: dict[int, list[DeviceEntry]] = field(default_factory=dict)
    checkpoints: dict[int, DeviceEntry] = field(default_factory=dict)
    voided: set[tuple[int, str]] = field(default_factory=set)
    problems: list[ChainProblem] = field(default_factory=list)


def _json_of(line: str) -> dict[str, Any] | None:
    # a syslog collector's file holds "<header> {json}": the JSON starts at the first brace
    start = line.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(line[start:])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _record_hash_of(fields: dict[str, Any]) -> str:
    return audit.record_hash(
        seq=int(fields["seq"]),
        at=datetime.fromisoformat(str(fields["at"])).replace(tzinfo=UTC),
        actor=str(fields["actor"]),
        action=str(fields["action"]),
        subject=str(fields["subject"]),
        outcome=str(fields["outcome"]),
        details=str(fields["details"]),
        prev_hash=str(fields["prev_hash"]),
    )


def read_device(name: str, lines: Iterable[str]) -> DeviceLog:
    """Parse a device's lines (a JSON Lines file, or a syslog collector's file of them)."""
    log = DeviceLog(name)
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        fields = _json_of(raw)
        try:
            kind = fields["type"] if fields else None
            seq = int(fields["seq"]) if fields else 0
        except (KeyError, TypeError, ValueError):
            kind, seq = None, 0
        if fields is None or kind not in {"record", "checkpoint", "void"}:
            log.problems.append(ChainProblem(seq, f"{name} line {number} is unreadable (edited)"))
            continue
        try:
            if kind == "void":
                log.voided.add((seq, str(fields["hash"])))
            elif kind == "checkpoint":
                entry = DeviceEntry(name, number, seq, str(fields["head_hash"]), fields)
                log.checkpoints[seq] = entry
            else:
                entry = DeviceEntry(name, number, seq, str(fields["hash"]), fields)
                if _record_hash_of(fields) != entry.hash:
                    log.problems.append(
                        ChainProblem(
                            seq, f"{entry.where} does not match its hash (the device was edited)"
                        )
                    )
                    continue
                log.records.setdefault(seq, []).append(entry)
        except (KeyError, TypeError, ValueError):
            log.problems.append(ChainProblem(seq, f"{name} line {number} is unreadable (edited)"))
    return log


def read_device_file(path: Path) -> DeviceLog:
    name = str(Path(path).absolute())
    with open(path, encoding="utf-8", errors="replace") as lines:
        return read_device(name, lines)


class HashedRecord(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def hash(self) -> str: ...


class Checkpoint(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def head_hash(self) -> str: ...
    @property
    def signature(self) -> str: ...


def compare(
    records: Iterable[HashedRecord],
    checkpoints: Sequence[Checkpoint],
    logs: Sequence[DeviceLog],
    *,
    complete: bool = True,
) -> list[ChainProblem]:
    """What the database (its records' sequence numbers and hashes, its checkpoints) and
    the devices' logs disagree on, one problem per record or checkpoint, naming it. Several
    logs (one file per node) are combined: a record need only be in one of them. With
    ``complete`` the logs are every device there is, so a record newer than the oldest one
    they hold must be in one (older ones predate the devices); without it (one node's file
    of several) a record in none of them is not reported."""
    problems = [problem for log in logs for problem in log.problems]
    held: dict[int, list[DeviceEntry]] = {}
    voided: set[tuple[int, str]] = set()
    device_checkpoints: dict[int, DeviceEntry] = {}
    for log in logs:
        for seq, entries in log.records.items():
            held.setdefault(seq, []).extend(entries)
        voided |= log.voided
        device_checkpoints.update(log.checkpoints)
    live = {
        seq: [e for e in entries if (seq, e.hash) not in voided] for seq, entries in held.items()
    }
    first = min((seq for seq, entries in live.items() if entries), default=None)
    in_database: set[int] = set()
    for rec in records:
        in_database.add(rec.seq)
        entries = held.get(rec.seq, [])
        if any(e.hash == rec.hash for e in entries):
            continue
        others = live.get(rec.seq, [])
        if others:
            problems.append(
                ChainProblem(
                    rec.seq,
                    f"differs from {others[-1].where} (altered in the database)",
                )
            )
        elif complete and first is not None and rec.seq > first:
            problems.append(ChainProblem(rec.seq, "is in the database but in no audit device"))
    for seq in sorted(set(live) - in_database):
        if live[seq]:
            problems.append(
                ChainProblem(seq, f"is in {live[seq][-1].where} but not in the database (deleted)")
            )
    stored = {c.seq: c for c in checkpoints}
    for seq, entry in sorted(device_checkpoints.items()):
        checkpoint = stored.get(seq)
        if checkpoint is None:
            problems.append(
                ChainProblem(seq, f"checkpoint in {entry.where} is not in the database (deleted)")
            )
        elif (checkpoint.head_hash, checkpoint.signature) != (
            entry.hash,
            entry.fields.get("signature"),
        ):
            problems.append(ChainProblem(seq, f"checkpoint differs from {entry.where} (altered)"))
    return problems
