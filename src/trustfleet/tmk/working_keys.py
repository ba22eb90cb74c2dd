"""Working keys under a terminal's TMK, as the terminal management system asks for them:
TR-31 key blocks for PIN (P0), MAC (M1, M3) and data (D0) keys, and the check of a PIN
block made with the terminal's P0 key.

A working key is made in the key store, wrapped into its TR-31 block there, and recorded in
one unit of work under the terminal's row lock, which also retires the terminal's previous
key of that usage (destroyed after commit).
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment import pinblock
from trustfleet.crypto.payment.tr31 import KeyBlockHeader
from trustfleet.errors import InvalidInput, KeyNotFound
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.store import Database, UnitOfWork
from trustfleet.tmk import lifecycle
from trustfleet.tmk.errors import TmkNoActiveTmk, TmkNoWorkingKey
from trustfleet.tmk.lifecycle import MARK_WORKING_KEY_DESTROYED
from trustfleet.tmk.models import Terminal, TerminalMasterKey, WorkingKey
from trustfleet.tmk.protocol import KCV_LENGTHS
from trustfleet.wire import as_utc, utcnow


@dataclass(frozen=True)
class WorkingKeyProfile:
    """A working key: its algorithm, what the server's copy may do, and its TR-31 header
    fields (usage, algorithm letter, mode of use; never exportable)."""

    usage: str
    algorithm: KeyAlgorithm
    keystore_usage: KeyUsage
    tr31_algorithm: str
    mode_of_use: str


#: the modes of use the terminal accepts for each usage it receives
TERMINAL_MODES = {"P0": {"E"}, "M1": {"C", "G"}, "M3": {"C", "G"}, "D0": {"B", "D", "E"}}
WORKING_KEY_USAGES = tuple(TERMINAL_MODES)
TR31_VERSION = {KeyAlgorithm.AES_128: "D", KeyAlgorithm.AES_256: "D", KeyAlgorithm.TDES: "B"}
_TR31_LETTER = {KeyAlgorithm.AES_128: "A", KeyAlgorithm.AES_256: "A", KeyAlgorithm.TDES: "T"}
#: X9.143 KCV algorithm indicator in the KC/KP optional blocks
_KCV_METHOD = {KeyAlgorithm.AES_128: "01", KeyAlgorithm.AES_256: "01", KeyAlgorithm.TDES: "00"}


def working_key_profile(usage: str, tmk_algorithm: KeyAlgorithm) -> WorkingKeyProfile:
    """P0 (PIN, the terminal only encrypts: mode E) and D0 (data, both ways: mode B) are
    keys of the TMK's algorithm; M1/M3 (ISO 9797-1 MAC algorithms 1 and 3, both ways:
    mode C) are 2-key TDES, the cipher those MAC algorithms are defined over."""
    if usage not in TERMINAL_MODES:
        raise InvalidInput(f"working key usage must be one of {', '.join(WORKING_KEY_USAGES)}")
    if usage in ("M1", "M3"):
        algorithm, keystore_usage, mode = KeyAlgorithm.TDES, KeyUsage.MAC, "C"
    elif usage == "P0":
        algorithm, keystore_usage, mode = tmk_algorithm, KeyUsage.DECRYPT, "E"
    else:
        algorithm, keystore_usage, mode = tmk_algorithm, KeyUsage.ENCRYPT | KeyUsage.DECRYPT, "B"
    return WorkingKeyProfile(
        usage, algorithm, keystore_usage | KeyUsage.WRAPPABLE, _TR31_LETTER[algorithm], mode
    )


@dataclass(frozen=True)
class IssuedWorkingKey:
    sn: str
    usage: str
    algorithm: KeyAlgorithm
    key_version: str
    key_block: str
    kcv: bytes
    tmk_kcv: bytes
    issued_at: datetime


@dataclass(frozen=True)
class _ActiveTmk:
    id: int
    handle: str
    algorithm: KeyAlgorithm
    kcv: bytes


_TERMINAL_STATUS = select(Terminal.status).where(Terminal.sn == bindparam("b_sn"))
_TERMINAL_STATUS_LOCKED = _TERMINAL_STATUS.with_for_update()
_ACTIVE_TMK = select(
    TerminalMasterKey.id,
    TerminalMasterKey.key_handle,
    TerminalMasterKey.algorithm,
    TerminalMasterKey.kcv_hex,
).where(TerminalMasterKey.active_sn == bindparam("b_sn"))
_ACTIVE_TMK_LOCKED = _ACTIVE_TMK.with_for_update()
_ISSUED = (
    select(func.count())
    .select_from(WorkingKey)
    .where(WorkingKey.tmk_id == bindparam("b_tmk"), WorkingKey.usage == bindparam("b_usage"))
)
_RETIRE_SLOT = (
    update(WorkingKey)
    .where(WorkingKey.active_slot == bindparam("b_slot"))
    .values(status="retired", active_slot=None, retired_at=bindparam("b_now"))
    .returning(WorkingKey.id, WorkingKey.key_handle, WorkingKey.kcv_hex)
)
_ACTIVE_KEY = select(WorkingKey.algorithm, WorkingKey.key_handle, WorkingKey.kcv_hex).where(
    WorkingKey.active_slot == bindparam("b_slot")
)


class WorkingKeys:
    """The TMS's working keys and PIN-block checks, over one database and one key store."""

    def __init__(
        self, db: Database, keystore: KeyStore, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._db = db
        self._keystore = keystore
        self._clock = clock

    def issue(self, sn: str, usage: str, *, actor: str) -> IssuedWorkingKey:
        """A new working key of ``usage`` for the terminal, as a TR-31 block under its
        active TMK; it replaces (retires and destroys) the terminal's previous key of that
        usage."""
        working_key_profile(usage, KeyAlgorithm.AES_128)  # refuse unknown usages first
        tmk, version = self._tmk_for_issue(sn, usage)
        profile = working_key_profile(usage, tmk.algorithm)
        info = self._keystore.generate(
            profile.algorithm, profile.keystore_usage, label=f"tmk-wk:{sn}:{usage}"
        )
        try:
            kcv = self._keystore.kcv(info.handle)[: KCV_LENGTHS[profile.algorithm]]
            block = self._keystore.wrap_tr31(
                info.handle, under=tmk.handle, header=_header(profile, tmk, version, kcv)
            )
            issued_at = as_utc(self._clock())
            with self._db.work() as uow:
                self._record(uow, sn, tmk, profile, version, info.handle, kcv, actor, issued_at)
        except BaseException:
            with contextlib.suppress(KeyNotFound):
                self._keystore.destroy(info.handle)
            raise
        return IssuedWorkingKey(
            sn, usage, profile.algorithm, version, block, kcv, tmk.kcv, issued_at
        )

    def _tmk_for_issue(self, sn: str, usage: str) -> tuple[_ActiveTmk, str]:
        with self._db.reading() as reads:
            lifecycle.check_status(sn, reads.scalar(_TERMINAL_STATUS, b_sn=sn))
            row = reads.one(_ACTIVE_TMK, b_sn=sn)
            if row is None:
                raise TmkNoActiveTmk(f"terminal {sn} has no active TMK: it must download one")
            issued = reads.scalar(_ISSUED, b_tmk=row.id, b_usage=usage)
        tmk = _ActiveTmk(
            row.id, row.key_handle, KeyAlgorithm(row.algorithm), bytes.fromhex(row.kcv_hex)
        )
        return tmk, f"{int(issued or 0) % 99 + 1:02d}"

    def _record(
        self,
        uow: UnitOfWork,
        sn: str,
        tmk: _ActiveTmk,
        profile: WorkingKeyProfile,
        version: str,
        handle: str,
        kcv: bytes,
        actor: str,
        now: datetime,
    ) -> None:
        lifecycle.check_status(sn, uow.scalar(_TERMINAL_STATUS_LOCKED, b_sn=sn))
        current = uow.one(_ACTIVE_TMK_LOCKED, b_sn=sn)
        if current is None or current.id != tmk.id:
            raise TmkNoActiveTmk("the terminal's TMK changed while the key was being made")
        slot = f"{sn}:{profile.usage}"
        previous = uow.one(_RETIRE_SLOT, b_slot=slot, b_now=now)
        if previous is not None:
            uow.destroy_after_commit(
                self._keystore,
                previous.key_handle,
                mark=MARK_WORKING_KEY_DESTROYED,
                b_id=previous.id,
                b_now=now,
            )
        uow.insert(
            WorkingKey,
            sn=sn,
            tmk_id=tmk.id,
            usage=profile.usage,
            algorithm=profile.algorithm.value,
            key_version=version,
            key_handle=handle,
            kcv_hex=kcv.hex().upper(),
            status="active",
            active_slot=slot,
            issued_by=actor,
            created_at=now,
        )
        uow.audit(
            "tmk.working_key_issued",
            actor=actor,
            subject=sn,
            details={
                "usage": profile.usage,
                "algorithm": profile.algorithm.value,
                "key_version": version,
                "kcv": kcv.hex().upper(),
                "replaced_kcv": previous.kcv_hex if previous is not None else None,
            },
        )

    def verify_pin_block(
        self, sn: str, pin_block: bytes, *, pan: str, pin: str, actor: str
    ) -> bool:
        """Decipher a PIN block made under the terminal's P0 key and compare its PIN with
        ``pin``; only the verdict leaves the server (see docs/tmk.md for the trade-off)."""
        pinblock.check_pin(pin)
        pinblock.check_pan(pan)
        key = self._pin_key(sn)
        pin_format = pinblock.FORMAT_FOR_ALGORITHM[KeyAlgorithm(key.algorithm)]
        if len(pin_block) != pinblock.BLOCK_SIZE[pin_format]:
            raise InvalidInput(
                f"an {pin_format} PIN block is {pinblock.BLOCK_SIZE[pin_format]} bytes"
            )

        def decrypt(block: bytes) -> bytes:
            return self._keystore.block_cipher(key.key_handle, block, decrypt=True, mode="ecb")

        try:
            clear = pinblock.decipher(pin_format, decrypt, pin_block, pan)
            match = hmac.compare_digest(clear.encode(), pin.encode())
        except pinblock.PinBlockInvalid:
            match = False
        with self._db.work() as uow:
            uow.audit(
                "tmk.pin_block_checked",
                actor=actor,
                subject=sn,
                outcome="success" if match else "failure",
                details={"format": pin_format, "working_key_kcv": key.kcv_hex, "match": match},
            )
        return match

    def _pin_key(self, sn: str) -> Any:
        with self._db.reading() as reads:
            lifecycle.check_status(sn, reads.scalar(_TERMINAL_STATUS, b_sn=sn))
            key = reads.one(_ACTIVE_KEY, b_slot=f"{sn}:P0")
        if key is None:
            raise TmkNoWorkingKey(f"terminal {sn} has no active PIN key (P0)")
        return key


def _header(
    profile: WorkingKeyProfile, tmk: _ActiveTmk, version: str, kcv: bytes
) -> KeyBlockHeader:
    return KeyBlockHeader(
        version_id=TR31_VERSION[tmk.algorithm],
        key_usage=profile.usage,
        algorithm=profile.tr31_algorithm,
        mode_of_use=profile.mode_of_use,
        key_version=version,
        exportability="N",
        optional_blocks=[
            ("KC", _KCV_METHOD[profile.algorithm] + kcv.hex().upper()),
            ("KP", _KCV_METHOD[tmk.algorithm] + tmk.kcv.hex().upper()),
        ],
    )
