"""A node's audit trail (devices and signed checkpoints, from settings) and ``audit verify``.

The devices and the trail itself are the store's (:mod:`trustfleet.store.audit_devices`);
what needs the key store is here: the checkpoint signer (an Ed25519 key-store key labelled
``audit-checkpoint``, made by the first checkpoint's transaction) and the check of the
checkpoints' signatures. docs/audit.md says what each check catches.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustfleet import crypto
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import CryptoError, KeyNotFound
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.server.context import AppContext
from trustfleet.settings import Settings
from trustfleet.store import Database, audit
from trustfleet.store.audit import ChainedRecord, ChainProblem
from trustfleet.store.audit_devices import (
    AuditDevice,
    AuditTrail,
    DeviceLog,
    FileDevice,
    SyslogDevice,
    compare,
    read_device_file,
)

CHECKPOINT_KEY_LABEL = "audit-checkpoint"
CHECKPOINT_KEY_ALGORITHM = KeyAlgorithm.ED25519


class KeyStoreSigner:
    """Signs checkpoints with the key of the newest checkpoint, or a new key-store key.

    Runs inside the appending unit of work: the soft key store's reads and a new key join
    it, so a key made for a checkpoint that rolls back is gone with it. Nothing is cached:
    a checkpoint is rare (every ``audit_checkpoint_every`` records)."""

    def __init__(self, keystore: KeyStore, db: Database) -> None:
        self._keystore = keystore
        self._db = db

    def key_handle(self) -> str:
        with self._db.reading() as reads:
            handle = audit.last_checkpoint_key(reads)
        if handle is not None and is_checkpoint_key(self._keystore, handle):
            return handle
        info = self._keystore.generate(
            CHECKPOINT_KEY_ALGORITHM, KeyUsage.SIGN, label=CHECKPOINT_KEY_LABEL
        )
        return info.handle

    def sign(self, handle: str, data: bytes) -> bytes:
        return self._keystore.sign(handle, data)


def is_checkpoint_key(keystore: KeyStore, handle: str) -> bool:
    """Whether ``handle`` is an audit-checkpoint signing key of the key store (a key store
    that cannot be reached raises)."""
    try:
        info = keystore.info(handle)
    except KeyNotFound:
        return False
    return info.label == CHECKPOINT_KEY_LABEL and KeyUsage.SIGN in info.usage


def devices_of(settings: Settings) -> list[AuditDevice]:
    devices: list[AuditDevice] = []
    if settings.audit_file:
        devices.append(FileDevice(Path(settings.audit_file)))
    if settings.audit_syslog:
        devices.append(SyslogDevice(settings.audit_syslog))
    return devices


def install_audit_trail(context: AppContext) -> None:
    """Give the context's database its audit devices and checkpoint signer (once)."""
    if context.db.trail is not None:
        return
    context.db.trail = AuditTrail(
        devices=devices_of(context.settings),
        checkpoint_every=context.settings.audit_checkpoint_every,
        checkpoint_seconds=context.settings.audit_checkpoint_seconds,
        signer=KeyStoreSigner(context.keystore, context.db),
    )


# --- verify ----------------------------------------------------------------------------


@dataclass
class AuditReport:
    records: int = 0
    checkpoints: int = 0
    devices: list[str] = field(default_factory=list)
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Hashed:
    seq: int
    hash: str


def _checkpoint_problems(
    keystore: KeyStore, checkpoints: Sequence[Any], hashes: dict[int, str], every: int
) -> list[ChainProblem]:
    problems: list[ChainProblem] = []
    last = max(hashes, default=0)
    signed: list[Any] = []
    for cp in checkpoints:
        problem = _signature_problem(keystore, cp)
        if problem is not None:
            problems.append(ChainProblem(cp.seq, problem))
            continue
        signed.append(cp)
        head = hashes.get(cp.seq)
        if head is None and cp.seq > last:
            problems.append(
                ChainProblem(
                    cp.seq,
                    f"records {last + 1}..{cp.seq} are missing: the newest records were "
                    f"deleted (signed checkpoint at {cp.seq})",
                )
            )
        elif head is None:
            problems.append(ChainProblem(cp.seq, "is missing (a signed checkpoint names it)"))
        elif head != cp.head_hash:
            problems.append(
                ChainProblem(
                    cp.seq,
                    "does not match the signed checkpoint's head: the chain was rewritten",
                )
            )
    # checkpoints deleted: after the first, each stretch of records holds at most one
    # multiple of ``every`` (the one its closing checkpoint covers), and after the last one
    # none; ``every`` as the closing checkpoint says (signed), and for the newest stretch
    # as configured now
    stretches = [(after.seq, after.every, 1) for after in signed[1:]]
    stretches += [(last, every, 0)] if signed else []
    for before, (end, step, allowed) in zip(signed, stretches, strict=True):
        if step <= 0:
            continue
        due = before.seq // step + 1
        if end // step - due + 1 > allowed:
            problems.append(
                ChainProblem(
                    due * step,
                    f"no signed checkpoint covers it (one is made every {step} records):"
                    " checkpoints were deleted",
                )
            )
    return problems


def _signature_problem(keystore: KeyStore, cp: Any) -> str | None:
    if not is_checkpoint_key(keystore, cp.key_handle):
        return f"checkpoint's key {cp.key_handle} is not an audit-checkpoint key of the key store"
    try:
        signature = base64.b64decode(cp.signature, validate=True)
        info = keystore.info(cp.key_handle)
        payload = audit.checkpoint_payload(
            seq=cp.seq,
            head_hash=cp.head_hash,
            every=cp.every,
            at=cp.at,
            key_handle=cp.key_handle,
        )
        suite = crypto.suite_for_algorithm(info.algorithm)
        suite.verify(keystore.public_key(cp.key_handle), payload, signature)
    except (binascii.Error, ValueError, CryptoError):
        return "checkpoint's signature does not verify (forged or altered)"
    return None


def verify_audit(
    context: AppContext, logs: Sequence[DeviceLog] = (), *, complete: bool | None = None
) -> AuditReport:
    """Walk the chain, check each signed checkpoint and that the chain reaches its head,
    and compare the database with the devices: this node's file device and ``logs``.
    ``complete`` (default: on SQLite, a single node) says the devices hold every record
    written since the oldest one they hold, so a newer record in none of them is a problem;
    on PostgreSQL a node's file holds what that node wrote."""
    settings = context.settings
    logs = list(logs)
    report = AuditReport()
    missing: list[ChainProblem] = []
    if settings.audit_file:
        path = Path(settings.audit_file).absolute()
        try:
            logs.append(read_device_file(path))
        except FileNotFoundError:  # a problem once there are records it should hold
            missing.append(ChainProblem(0, f"the audit device {path} is missing"))
        except OSError as exc:
            missing.append(ChainProblem(0, f"the audit device {path} cannot be read: {exc}"))
    report.devices = [log.name for log in logs]
    hashes: dict[int, str] = {}

    def walk(records: Iterator[ChainedRecord]) -> Iterator[ChainedRecord]:
        for rec in records:
            hashes[rec.seq] = rec.hash
            yield rec

    with context.db.reading() as reads:
        chain = audit.verify_chain(walk(audit.all_records(reads)))
        checkpoints = audit.checkpoints(reads)
    report.records = chain.records
    report.checkpoints = len(checkpoints)
    if hashes:
        report.problems += missing
    report.problems += chain.problems
    report.problems += _checkpoint_problems(
        context.keystore, checkpoints, hashes, settings.audit_checkpoint_every
    )
    if logs:
        whole = context.db.dialect_name == "sqlite" if complete is None else complete
        records = [_Hashed(seq, h) for seq, h in hashes.items()]
        report.problems += compare(records, checkpoints, logs, complete=whole)
    report.problems.sort(key=lambda p: p.seq)
    return report
