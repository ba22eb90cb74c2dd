"""TMK use cases on the server: downloads, TMK activation and rotation, working keys, PIN
block checks, and the terminals' key status.

Each download step drives one pure function of :mod:`trustfleet.tmk.protocol` over the
session state kept in ``tmk_download_sessions`` (no state in process memory: any node can
serve any step). A step's database work is one transaction, but key-store *writes* (making
or destroying a key) happen outside it: the soft key store writes to the same database, and
on SQLite a write inside another open write transaction would wait for it (see
``docs/architecture.md``). So:

- ``start``: lock the terminal, check it may download, sign the challenge (a key-store
  read), store the session and its audit record in one transaction.
- ``proof``: read the session, verify the proof and make the TMK in the key store (the
  protocol function), then in one transaction re-read the session under lock, store the
  delivered state only if nobody changed it meanwhile, and record the pending TMK; else
  destroy the TMK just made.
- ``confirm``: one transaction: verify the CMAC (a key-store read), activate the TMK, retire
  the terminal's previous TMK and its working keys; their keys are destroyed after commit.

On any :class:`~trustfleet.tmk.errors.TmkError` the session is aborted in its own
transaction (``server_abort``: single use, a delivered TMK is destroyed), a
``tmk.download_failed`` audit record with the error's code is written, and the error goes
back to the caller (the API answers problem+json with that code).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.crypto import load_public_key
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.db import transaction
from trustfleet.errors import InvalidInput, KeyNotFound
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.server import audit
from trustfleet.tmk import pinblock, registry
from trustfleet.tmk.errors import TmkError, TmkOutOfOrder
from trustfleet.tmk.identity import IdentityService
from trustfleet.tmk.models import (
    DownloadPolicy,
    DownloadSession,
    Terminal,
    TerminalMasterKey,
    WorkingKey,
)
from trustfleet.tmk.protocol import (
    DEFAULT_SESSION_TTL,
    KCV_LENGTHS,
    TMK_ALGORITHMS,
    Confirmation,
    DownloadRequest,
    KeyDelivery,
    RegisteredTerminal,
    ServerChallenge,
    ServerSessionState,
    ServerStage,
    TerminalProof,
    server_abort,
    server_accept_proof,
    server_confirm,
    server_start,
)
from trustfleet.tmk.tr31 import KeyBlockHeader

DEFAULT_TMK_ALGORITHM = KeyAlgorithm.AES_128
SERVICE_ACTOR = "tmk-service"
_SESSION_ID = re.compile(r"[0-9a-f]{32}")
_ERROR_CODE = re.compile(r"[a-z0-9-]{1,64}")
_OPEN_STAGES = (ServerStage.CHALLENGED.value, ServerStage.DELIVERED.value)


# =====================================================================================
# Errors the service adds to the protocol's (codes documented in docs/tmk.md)
# =====================================================================================


class TmkUnknownTerminal(TmkError):
    code = "tmk-unknown-terminal"
    status = 404
    title = "No terminal is registered with that SN"


class TmkTerminalSuspended(TmkError):
    code = "tmk-terminal-suspended"
    status = 403
    title = "The terminal is suspended"


class TmkTerminalRevoked(TmkError):
    code = "tmk-terminal-revoked"
    status = 403
    title = "The terminal is revoked"


class TmkSessionNotFound(TmkError):
    code = "tmk-session-not-found"
    status = 404
    title = "No TMK download session has that id"


class TmkDownloadNotAllowed(TmkError):
    code = "tmk-download-not-allowed"
    status = 409
    title = "The terminal has an active TMK; a new download needs an operator's rotate-tmk"


class TmkTerminalAborted(TmkError):
    code = "tmk-terminal-aborted"
    status = 409
    title = "The terminal reported that the download failed on its side"


class TmkNoActiveTmk(TmkError):
    code = "tmk-no-active-tmk"
    status = 409
    title = "The terminal has no active TMK"


class TmkNoWorkingKey(TmkError):
    code = "tmk-no-working-key"
    status = 409
    title = "The terminal has no active working key of that usage"


# =====================================================================================
# Working-key profiles: what each TR-31 usage gets
# =====================================================================================


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


# =====================================================================================
# Results
# =====================================================================================


@dataclass(frozen=True)
class Activation:
    session_id: str
    sn: str
    algorithm: KeyAlgorithm
    kcv: bytes
    activated_at: datetime
    retired_tmk_kcv: bytes | None


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
class TmkInfo:
    algorithm: str
    kcv: str
    status: str
    session_id: str
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None


@dataclass(frozen=True)
class WorkingKeyInfo:
    usage: str
    algorithm: str
    key_version: str
    kcv: str
    created_at: datetime


@dataclass(frozen=True)
class TerminalOverview:
    sn: str
    model: str
    key_algorithm: str
    status: str
    registered_by: str
    created_at: datetime
    updated_at: datetime
    tmk_algorithm: str
    rotation_requested: bool
    active_tmk: TmkInfo | None
    working_keys: list[WorkingKeyInfo]
    tmk_history: int


@dataclass(frozen=True)
class SweepReport:
    sessions_aborted: int
    keys_destroyed: int


# =====================================================================================
# Helpers
# =====================================================================================


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _check_terminal(row: Terminal | None, sn: str) -> Terminal:
    if row is None:
        raise TmkUnknownTerminal(f"no terminal {sn[:64]!r} is registered")
    if row.status == "suspended":
        raise TmkTerminalSuspended(f"terminal {row.sn} is suspended")
    if row.status == "revoked":
        raise TmkTerminalRevoked(f"terminal {row.sn} is revoked")
    return row


def _registration(row: Terminal) -> RegisteredTerminal:
    return RegisteredTerminal(sn=row.sn, auth_public=load_public_key(row.public_key_der))


def _active_tmk_query(sn: str, *, for_update: bool = False) -> Select[TerminalMasterKey]:
    query = select(TerminalMasterKey).where(TerminalMasterKey.active_sn == sn)
    return query.with_for_update() if for_update else query


def _tmk_info(row: TerminalMasterKey) -> TmkInfo:
    return TmkInfo(
        algorithm=row.algorithm,
        kcv=row.kcv_hex,
        status=row.status,
        session_id=row.session_id,
        created_at=_utc(row.created_at),
        activated_at=_utc(row.activated_at) if row.activated_at else None,
        retired_at=_utc(row.retired_at) if row.retired_at else None,
    )


@dataclass
class _Retired:
    """Keys whose rows a transaction retired or aborted; destroyed after it commits."""

    tmks: list[tuple[int, str]]  # (row id, handle)
    working_keys: list[tuple[int, str]]
    aborted: list[ServerSessionState]

    @classmethod
    def none(cls) -> _Retired:
        return cls([], [], [])


# =====================================================================================
# The service
# =====================================================================================


class TmkService:
    """The key server's TMK use cases over one database and one key store."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        keystore: KeyStore,
        *,
        clock: Callable[[], datetime] | None = None,
        random: Callable[[int], bytes] = os.urandom,
        session_ttl: timedelta = DEFAULT_SESSION_TTL,
        default_tmk_algorithm: KeyAlgorithm = DEFAULT_TMK_ALGORITHM,
    ) -> None:
        self._sessions = sessions
        self._keystore = keystore
        self._clock = clock or (lambda: datetime.now(UTC))
        self._random = random
        self._ttl = session_ttl
        self._default_algorithm = default_tmk_algorithm
        self.identity = IdentityService(sessions, keystore, clock=clock)

    def _now(self) -> datetime:
        return _utc(self._clock())

    # -- step 1-2: start --------------------------------------------------------------

    def start_download(self, body: bytes | str, *, actor: str) -> ServerChallenge:
        """A terminal's DownloadRequest: open a session and return the signed challenge."""
        try:
            request = DownloadRequest.from_json(body)
        except TmkError as exc:
            self._fail(None, exc.code, actor=actor, step="request")
            raise
        try:
            identity = self.identity.ensure(actor=SERVICE_ACTOR)
            now = self._now()
            with self._sessions() as session:
                terminal = _check_terminal(session.get(Terminal, request.sn), request.sn)
                self._may_download(session, terminal.sn)
                registration = _registration(terminal)
            # signing reads the key store: done between the check and the write, which
            # checks again under lock
            challenge, state = server_start(
                request,
                terminal=registration,
                keystore=self._keystore,
                work_key=identity.work_key_handle,
                kswcrt_der=identity.kswcrt_der,
                now=now,
                ttl=self._ttl,
                random=self._random,
            )
            with transaction(self._sessions) as session:
                _check_terminal(session.get(Terminal, state.sn, with_for_update=True), state.sn)
                algorithm = self._may_download(session, state.sn, lock=True)
                superseded = self._abort_open_sessions(session, state.sn, "tmk-superseded")
                session.add(
                    DownloadSession(
                        session_id=state.session_id,
                        sn=state.sn,
                        stage=state.stage.value,
                        state_json=state.to_json().decode(),
                        tmk_algorithm=algorithm.value,
                        expires_at=state.expires_at,
                        created_at=now,
                        updated_at=now,
                    )
                )
                audit.append(
                    session,
                    action="tmk.download_started",
                    actor=actor,
                    subject=state.sn,
                    details={
                        "session_id": state.session_id,
                        "suite": state.suite,
                        "tmk_algorithm": algorithm.value,
                        "work_certificate": identity.serial_hex,
                        "superseded_sessions": len(superseded.aborted),
                    },
                )
        except TmkError as exc:
            self._fail(None, exc.code, actor=actor, step="request", sn=request.sn)
            raise
        self._destroy(superseded)
        return challenge

    def _may_download(self, session: Session, sn: str, *, lock: bool = False) -> KeyAlgorithm:
        """The TMK algorithm this terminal's download gets, or TmkDownloadNotAllowed."""
        policy = session.get(DownloadPolicy, sn, with_for_update=lock)
        has_tmk = session.scalars(_active_tmk_query(sn)).first() is not None
        if has_tmk and (policy is None or policy.rotation_requested_at is None):
            raise TmkDownloadNotAllowed(
                f"terminal {sn} has an active TMK; ask for a new one with rotate-tmk first"
            )
        return KeyAlgorithm(policy.tmk_algorithm) if policy else self._default_algorithm

    # -- step 4-6: proof ----------------------------------------------------------------

    def accept_proof(self, session_id: str, body: bytes | str, *, actor: str) -> KeyDelivery:
        """The terminal's proof: verify it, make the TMK and deliver it wrapped."""
        try:
            proof = TerminalProof.from_json(body)
            row = self._read_session(session_id)
            state = ServerSessionState.from_json(row.state_json)
            with self._sessions() as session:
                terminal = _check_terminal(session.get(Terminal, row.sn), row.sn)
            delivery, delivered = server_accept_proof(
                state,
                proof,
                terminal=_registration(terminal),
                keystore=self._keystore,
                now=self._now(),
                tmk_algorithm=KeyAlgorithm(row.tmk_algorithm),
            )
        except TmkError as exc:
            self._fail(session_id, exc.code, actor=actor, step="proof")
            raise
        try:
            self._store_delivery(row.state_json, delivered, actor=actor)
        except BaseException as exc:
            assert delivered.tmk_handle is not None
            self._destroy_quietly(delivered.tmk_handle)  # never recorded: nobody else knows it
            if isinstance(exc, TmkError):
                self._fail(session_id, exc.code, actor=actor, step="proof")
            raise
        return delivery

    def _store_delivery(
        self, read_state: str, delivered: ServerSessionState, *, actor: str
    ) -> None:
        now = self._now()
        handle, algorithm, kcv = delivered.tmk
        with transaction(self._sessions) as session:
            _check_terminal(session.get(Terminal, delivered.sn, with_for_update=True), delivered.sn)
            row = session.get(DownloadSession, delivered.session_id, with_for_update=True)
            if row is None or row.state_json != read_state:
                raise TmkOutOfOrder("the session changed while the proof was being checked")
            row.state_json = delivered.to_json().decode()
            row.stage = delivered.stage.value
            row.updated_at = now
            session.add(
                TerminalMasterKey(
                    sn=delivered.sn,
                    session_id=delivered.session_id,
                    key_handle=handle,
                    algorithm=algorithm.value,
                    kcv_hex=kcv.hex().upper(),
                    status="pending",
                    created_at=now,
                )
            )
            audit.append(
                session,
                action="tmk.tmk_delivered",
                actor=actor,
                subject=delivered.sn,
                details={
                    "session_id": delivered.session_id,
                    "algorithm": algorithm.value,
                    "kcv": kcv.hex().upper(),
                },
            )

    # -- step 7: confirm ----------------------------------------------------------------

    def confirm(self, session_id: str, body: bytes | str, *, actor: str) -> Activation:
        """The terminal's confirmation: the TMK becomes active, the previous one retired."""
        try:
            confirmation = Confirmation.from_json(body)
            read = self._read_session(session_id)
            with self._sessions() as session:
                _check_terminal(session.get(Terminal, read.sn), read.sn)
            # the MAC check reads the key store: done before the write, which stores the
            # result only if the session is still the one that was checked
            event, active = server_confirm(
                ServerSessionState.from_json(read.state_json),
                confirmation,
                keystore=self._keystore,
                now=self._now(),
            )
            sn = event.sn
            with transaction(self._sessions) as session:
                _check_terminal(session.get(Terminal, sn, with_for_update=True), sn)
                row = session.get(DownloadSession, session_id, with_for_update=True)
                if row is None or row.state_json != read.state_json:
                    raise TmkOutOfOrder("the session changed while the confirmation was checked")
                row.state_json = active.to_json().decode()
                row.stage = active.stage.value
                row.updated_at = event.activated_at
                retired, old_kcv = self._activate(session, event.session_id, sn)
                audit.append(
                    session,
                    action="tmk.tmk_activated",
                    actor=actor,
                    subject=sn,
                    details={
                        "session_id": session_id,
                        "algorithm": event.algorithm.value,
                        "kcv": event.kcv.hex().upper(),
                        "retired_tmk_kcv": old_kcv,
                        "retired_working_keys": len(retired.working_keys),
                    },
                )
        except TmkError as exc:
            self._fail(session_id, exc.code, actor=actor, step="confirm")
            raise
        self._destroy(retired)
        return Activation(
            session_id=session_id,
            sn=sn,
            algorithm=event.algorithm,
            kcv=event.kcv,
            activated_at=event.activated_at,
            retired_tmk_kcv=bytes.fromhex(old_kcv) if old_kcv else None,
        )

    def _activate(self, session: Session, session_id: str, sn: str) -> tuple[_Retired, str | None]:
        now = self._now()
        retired = _Retired.none()
        old = session.scalars(_active_tmk_query(sn, for_update=True)).one_or_none()
        old_kcv = None
        if old is not None:
            old_kcv = old.kcv_hex
            self._retire_tmk(session, old, now, retired)
            session.flush()  # free the active slot first
        tmk = session.scalars(
            select(TerminalMasterKey).where(TerminalMasterKey.session_id == session_id)
        ).one()
        tmk.status, tmk.active_sn, tmk.activated_at = "active", sn, now
        policy = session.get(DownloadPolicy, sn, with_for_update=True)
        if policy is not None:
            policy.rotation_requested_at = None
            policy.updated_at = now
        return retired, old_kcv

    @staticmethod
    def _retire_tmk(
        session: Session, tmk: TerminalMasterKey, now: datetime, retired: _Retired
    ) -> None:
        tmk.status, tmk.active_sn, tmk.retired_at = "retired", None, now
        retired.tmks.append((tmk.id, tmk.key_handle))
        working = session.scalars(
            select(WorkingKey)
            .where(WorkingKey.tmk_id == tmk.id, WorkingKey.status == "active")
            .with_for_update()
        ).all()
        for key in working:
            key.status, key.active_slot, key.retired_at = "retired", None, now
            retired.working_keys.append((key.id, key.key_handle))

    # -- terminal-side failure, failures, sweeping ----------------------------------------

    def abort_download(self, session_id: str, code: str, *, actor: str) -> None:
        """The terminal reports that the download failed on its side (an untrusted server,
        a KCV mismatch...): end the session now and destroy its TMK."""
        reported = code if _ERROR_CODE.fullmatch(code) else "invalid-code"
        self._read_session(session_id)
        self._fail(
            session_id, TmkTerminalAborted.code, actor=actor, step="terminal", reported=reported
        )

    def _read_session(self, session_id: str) -> DownloadSession:
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise TmkSessionNotFound()
        with self._sessions() as session:
            row = session.get(DownloadSession, session_id)
        if row is None:
            raise TmkSessionNotFound()
        return row

    def _fail(
        self,
        session_id: str | None,
        code: str,
        *,
        actor: str,
        step: str,
        sn: str | None = None,
        reported: str | None = None,
    ) -> None:
        """Abort the session (if it is still open) and audit the failure."""
        aborted = _Retired.none()
        with transaction(self._sessions) as session:
            row = None
            if session_id is not None and _SESSION_ID.fullmatch(session_id):
                row = session.get(DownloadSession, session_id, with_for_update=True)
            if row is not None:
                sn = row.sn
                self._abort_row(session, row, code, aborted)
            details: dict[str, Any] = {"code": code, "step": step, "session_id": session_id}
            if reported is not None:
                details["reported_code"] = reported
            audit.append(
                session,
                action="tmk.download_failed",
                actor=actor,
                subject=sn or "",
                outcome="failure",
                details=details,
            )
        self._destroy(aborted)

    def _abort_row(
        self, session: Session, row: DownloadSession, code: str, aborted: _Retired
    ) -> None:
        if row.stage not in _OPEN_STAGES:
            return
        state = ServerSessionState.from_json(row.state_json)
        row.state_json = replace(state, stage=ServerStage.ABORTED).to_json().decode()
        row.stage = ServerStage.ABORTED.value
        row.error_code = code
        row.updated_at = self._now()
        session.execute(
            update(TerminalMasterKey)
            .where(
                TerminalMasterKey.session_id == row.session_id,
                TerminalMasterKey.status == "pending",
            )
            .values(status="aborted")
        )
        aborted.aborted.append(state)

    def _abort_open_sessions(self, session: Session, sn: str, code: str) -> _Retired:
        aborted = _Retired.none()
        rows = session.scalars(
            select(DownloadSession)
            .where(DownloadSession.sn == sn, DownloadSession.stage.in_(_OPEN_STAGES))
            .with_for_update()
        ).all()
        for row in rows:
            self._abort_row(session, row, code, aborted)
        return aborted

    def sweep(self, *, actor: str = "tmk-sweeper") -> SweepReport:
        """Abort expired open sessions (destroying their undelivered or unconfirmed TMKs),
        and destroy any retired or aborted key a crash left in the key store."""
        now = self._now()
        aborted = _Retired.none()
        with transaction(self._sessions) as session:
            expired = session.scalars(
                select(DownloadSession)
                .where(DownloadSession.stage.in_(_OPEN_STAGES), DownloadSession.expires_at <= now)
                .with_for_update()
            ).all()
            for row in expired:
                self._abort_row(session, row, "tmk-session-expired", aborted)
            if expired:
                audit.append(
                    session,
                    action="tmk.sessions_expired",
                    actor=actor,
                    subject="sessions",
                    details={"aborted": len(expired)},
                )
        with self._sessions() as session:
            aborted.tmks += [
                (r.id, r.key_handle)
                for r in session.scalars(
                    select(TerminalMasterKey).where(
                        TerminalMasterKey.status.in_(("retired", "aborted")),
                        TerminalMasterKey.destroyed_at.is_(None),
                    )
                )
            ]
            aborted.working_keys += [
                (r.id, r.key_handle)
                for r in session.scalars(
                    select(WorkingKey).where(
                        WorkingKey.status == "retired", WorkingKey.destroyed_at.is_(None)
                    )
                )
            ]
        destroyed = self._destroy(aborted)
        return SweepReport(sessions_aborted=len(expired), keys_destroyed=destroyed)

    def _destroy(self, retired: _Retired) -> int:
        """Destroy keys whose rows are already retired or aborted, then record it."""
        tmk_ids = {tmk_id for tmk_id, _ in retired.tmks}
        for state in retired.aborted:
            with contextlib.suppress(KeyNotFound):
                server_abort(state, keystore=self._keystore)
        aborted_sessions = [s.session_id for s in retired.aborted if s.tmk_handle is not None]
        for _, handle in retired.tmks + retired.working_keys:
            self._destroy_quietly(handle)
        if not (tmk_ids or aborted_sessions or retired.working_keys):
            return 0
        now = self._now()
        with transaction(self._sessions) as session:
            session.execute(
                update(TerminalMasterKey)
                .where(
                    (TerminalMasterKey.id.in_(tmk_ids))
                    | (TerminalMasterKey.session_id.in_(aborted_sessions)),
                    TerminalMasterKey.destroyed_at.is_(None),
                )
                .values(destroyed_at=now)
            )
            session.execute(
                update(WorkingKey)
                .where(
                    WorkingKey.id.in_([key_id for key_id, _ in retired.working_keys]),
                    WorkingKey.destroyed_at.is_(None),
                )
                .values(destroyed_at=now)
            )
        aborted_handles = {s.tmk_handle for s in retired.aborted if s.tmk_handle is not None}
        return len(aborted_handles | {h for _, h in retired.tmks + retired.working_keys})

    def _destroy_quietly(self, handle: str) -> None:
        with contextlib.suppress(KeyNotFound):
            self._keystore.destroy(handle)

    # -- operators: TMK rotation, status changes -----------------------------------------

    def request_rotation(
        self, sn: str, *, actor: str, algorithm: KeyAlgorithm | None = None
    ) -> TerminalOverview:
        """Allow (and ask for) a new download: the next completed one retires the current
        TMK and its working keys. ``algorithm`` sets the TMK algorithm of this terminal."""
        if algorithm is not None and algorithm not in TMK_ALGORITHMS:
            raise InvalidInput("a TMK is aes-128, aes-256 or tdes")
        now = self._now()
        with transaction(self._sessions) as session:
            terminal = session.get(Terminal, sn, with_for_update=True)
            if terminal is None:
                raise registry.TerminalNotFound(f"no terminal {sn[:64]!r}")
            _check_terminal(terminal, sn)
            policy = session.get(DownloadPolicy, sn, with_for_update=True)
            if policy is None:
                policy = DownloadPolicy(sn=sn, tmk_algorithm=self._default_algorithm.value)
                session.add(policy)
            if algorithm is not None:
                policy.tmk_algorithm = algorithm.value
            policy.rotation_requested_at, policy.requested_by, policy.updated_at = now, actor, now
            audit.append(
                session,
                action="tmk.rotation_requested",
                actor=actor,
                subject=sn,
                details={"tmk_algorithm": policy.tmk_algorithm},
            )
        return self.overview(sn)

    def change_terminal_status(
        self, sn: str, action: str, *, actor: str, reason: str = ""
    ) -> TerminalOverview:
        """suspend / revoke / reactivate (registry rules). Suspending or revoking ends the
        terminal's open downloads; revoking also retires and destroys its TMK and working
        keys (a revoked terminal never gets keys again)."""
        registry.change_status(self._sessions, sn, action, actor=actor, reason=reason)
        if action in ("suspend", "revoke"):
            retired = _Retired.none()
            with transaction(self._sessions) as session:
                aborted = self._abort_open_sessions(session, sn, f"tmk-terminal-{action}d")
                retired.aborted += aborted.aborted
                if action == "revoke":
                    tmk = session.scalars(_active_tmk_query(sn, for_update=True)).one_or_none()
                    if tmk is not None:
                        self._retire_tmk(session, tmk, self._now(), retired)
            self._destroy(retired)
        return self.overview(sn)

    # -- working keys -------------------------------------------------------------------

    def issue_working_key(self, sn: str, usage: str, *, actor: str) -> IssuedWorkingKey:
        """A new working key of ``usage`` for the terminal, as a TR-31 block under its
        active TMK; it replaces (retires and destroys) the terminal's previous key of that
        usage."""
        tmk_id, tmk_handle, tmk_algorithm, tmk_kcv, version = self._tmk_for_issue(sn, usage)
        profile = working_key_profile(usage, tmk_algorithm)
        info = self._keystore.generate(
            profile.algorithm, profile.keystore_usage, label=f"tmk-wk:{sn}:{usage}"
        )
        try:
            kcv = self._keystore.kcv(info.handle)[: KCV_LENGTHS[profile.algorithm]]
            header = KeyBlockHeader(
                version_id=TR31_VERSION[tmk_algorithm],
                key_usage=usage,
                algorithm=profile.tr31_algorithm,
                mode_of_use=profile.mode_of_use,
                key_version=version,
                exportability="N",
                optional_blocks=[
                    ("KC", _KCV_METHOD[profile.algorithm] + kcv.hex().upper()),
                    ("KP", _KCV_METHOD[tmk_algorithm] + tmk_kcv.hex().upper()),
                ],
            )
            block = self._keystore.wrap_tr31(info.handle, under=tmk_handle, header=header)
            issued_at = self._now()
            retired = self._store_working_key(
                sn, tmk_id, profile, version, info.handle, kcv, actor, issued_at
            )
        except BaseException:
            self._destroy_quietly(info.handle)
            raise
        self._destroy(retired)
        return IssuedWorkingKey(
            sn=sn,
            usage=usage,
            algorithm=profile.algorithm,
            key_version=version,
            key_block=block,
            kcv=kcv,
            tmk_kcv=tmk_kcv,
            issued_at=issued_at,
        )

    def _tmk_for_issue(self, sn: str, usage: str) -> tuple[int, str, KeyAlgorithm, bytes, str]:
        working_key_profile(usage, KeyAlgorithm.AES_128)  # refuse unknown usages first
        with self._sessions() as session:
            terminal = session.get(Terminal, sn)
            if terminal is None:
                raise registry.TerminalNotFound(f"no terminal {sn[:64]!r}")
            _check_terminal(terminal, sn)
            tmk = session.scalars(_active_tmk_query(sn)).one_or_none()
            if tmk is None:
                raise TmkNoActiveTmk(f"terminal {sn} has no active TMK: it must download one")
            issued = session.scalar(
                select(func.count())
                .select_from(WorkingKey)
                .where(WorkingKey.tmk_id == tmk.id, WorkingKey.usage == usage)
            )
        version = f"{int(issued or 0) % 99 + 1:02d}"
        return (
            tmk.id,
            tmk.key_handle,
            KeyAlgorithm(tmk.algorithm),
            bytes.fromhex(tmk.kcv_hex),
            version,
        )

    def _store_working_key(
        self,
        sn: str,
        tmk_id: int,
        profile: WorkingKeyProfile,
        version: str,
        handle: str,
        kcv: bytes,
        actor: str,
        now: datetime,
    ) -> _Retired:
        retired = _Retired.none()
        slot = f"{sn}:{profile.usage}"
        with transaction(self._sessions) as session:
            _check_terminal(session.get(Terminal, sn, with_for_update=True), sn)
            tmk = session.scalars(_active_tmk_query(sn, for_update=True)).one_or_none()
            if tmk is None or tmk.id != tmk_id:
                raise TmkNoActiveTmk("the terminal's TMK changed while the key was being made")
            previous = session.scalars(
                select(WorkingKey).where(WorkingKey.active_slot == slot).with_for_update()
            ).one_or_none()
            if previous is not None:
                previous.status, previous.active_slot, previous.retired_at = "retired", None, now
                retired.working_keys.append((previous.id, previous.key_handle))
                session.flush()
            session.add(
                WorkingKey(
                    sn=sn,
                    tmk_id=tmk_id,
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
            )
            audit.append(
                session,
                action="tmk.working_key_issued",
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
        return retired

    # -- PIN blocks (demo) ----------------------------------------------------------------

    def verify_pin_block(
        self, sn: str, pin_block: bytes, *, pan: str, pin: str, actor: str
    ) -> bool:
        """Decipher a PIN block made under the terminal's P0 key and compare its PIN with
        ``pin``; only the verdict leaves the server (see docs/tmk.md for the trade-off)."""
        pinblock.check_pin(pin)
        pinblock.check_pan(pan)
        with self._sessions() as session:
            terminal = session.get(Terminal, sn)
            if terminal is None:
                raise registry.TerminalNotFound(f"no terminal {sn[:64]!r}")
            _check_terminal(terminal, sn)
            key = session.scalars(
                select(WorkingKey).where(WorkingKey.active_slot == f"{sn}:P0")
            ).one_or_none()
            if key is None:
                raise TmkNoWorkingKey(f"terminal {sn} has no active PIN key (P0)")
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
        with transaction(self._sessions) as session:
            audit.append(
                session,
                action="tmk.pin_block_checked",
                actor=actor,
                subject=sn,
                outcome="success" if match else "failure",
                details={"format": pin_format, "working_key_kcv": key.kcv_hex, "match": match},
            )
        return match

    # -- reading ------------------------------------------------------------------------

    def overview(self, sn: str) -> TerminalOverview:
        """The terminal's registration, its active TMK and working keys (KCVs only)."""
        with self._sessions() as session:
            terminal = session.get(Terminal, sn)
            if terminal is None:
                raise registry.TerminalNotFound(f"no terminal {sn[:64]!r}")
            policy = session.get(DownloadPolicy, sn)
            tmk = session.scalars(_active_tmk_query(sn)).one_or_none()
            keys = session.scalars(
                select(WorkingKey)
                .where(WorkingKey.sn == sn, WorkingKey.status == "active")
                .order_by(WorkingKey.usage)
            ).all()
            history = session.scalar(
                select(func.count())
                .select_from(TerminalMasterKey)
                .where(TerminalMasterKey.sn == sn)
            )
        return TerminalOverview(
            sn=terminal.sn,
            model=terminal.model,
            key_algorithm=terminal.key_algorithm,
            status=terminal.status,
            registered_by=terminal.registered_by,
            created_at=_utc(terminal.created_at),
            updated_at=_utc(terminal.updated_at),
            tmk_algorithm=policy.tmk_algorithm if policy else self._default_algorithm.value,
            rotation_requested=bool(policy and policy.rotation_requested_at),
            active_tmk=_tmk_info(tmk) if tmk else None,
            working_keys=[
                WorkingKeyInfo(k.usage, k.algorithm, k.key_version, k.kcv_hex, _utc(k.created_at))
                for k in keys
            ],
            tmk_history=int(history or 0),
        )

    def session_stage(self, session_id: str) -> str:
        return self._read_session(session_id).stage
