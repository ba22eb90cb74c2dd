"""TMK use cases on the server: downloads, TMK activation and rotation, working keys, PIN
block checks, and the terminals' key status.

Each download step drives one pure function of :mod:`trustfleet.tmk.protocol` (no state
in process memory: any node can serve any step). Key-store writes (making or destroying a
key) never run inside an ORM transaction: the soft key store writes to the same database,
and on SQLite a second writer would wait for the first. Inside a raw transaction they join
it instead (:func:`trustfleet.store.driver.raw_transaction`; see ``docs/architecture.md``). So:

- ``start``: read the terminal and the active identity, check it may download, sign the
  challenge and seal the session into its ticket (key-store reads). Nothing is written.
- ``proof``: open the ticket, then in one transaction under the terminal's row lock check
  again that it may download, verify the proof, make the TMK (its key-store row joins the
  transaction), supersede the terminal's other open sessions and store the session as
  delivered with its pending TMK. The session id is the primary key, so a ticket is
  answered once.
- ``confirm``: one transaction: verify the CMAC (a key-store read), activate the TMK, retire
  the terminal's previous TMK and its working keys; their keys are destroyed after commit.

On any :class:`~trustfleet.tmk.errors.TmkError` the session is aborted in its own
transaction (``server_abort``: single use, a delivered TMK is destroyed; a session known
only from its ticket is stored as aborted, which spends the ticket), a
``tmk.download_failed`` audit record with the error's code is written, and the error goes
back to the caller (the API answers problem+json with that code).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Select, bindparam, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.crypto import load_public_key
from trustfleet.crypto.base import KeyAlgorithm, PublicKey
from trustfleet.crypto.payment import pinblock
from trustfleet.crypto.payment.tr31 import KeyBlockHeader
from trustfleet.errors import InvalidInput, KeyNotFound
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.store import audit
from trustfleet.store.driver import (
    IntegrityViolation,
    RawConnection,
    insert_columns,
    raw_reading,
    raw_transaction,
    read_engine,
)
from trustfleet.store.engine import reading, transaction
from trustfleet.tmk import registry
from trustfleet.tmk.errors import TmkError, TmkOutOfOrder, TmkReplay
from trustfleet.tmk.identity import IdentityService
from trustfleet.tmk.models import (
    DownloadPolicy,
    DownloadSession,
    ServerIdentity,
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
    TicketKey,
    open_ticket,
    server_abort,
    server_accept_proof,
    server_confirm,
    server_start,
)
from trustfleet.wire import as_utc

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


def _check_status(sn: str, status: str | None) -> None:
    """Only an active registered terminal may download and get keys."""
    if status is None:
        raise TmkUnknownTerminal(f"no terminal {sn[:64]!r} is registered")
    if status == "suspended":
        raise TmkTerminalSuspended(f"terminal {sn} is suspended")
    if status == "revoked":
        raise TmkTerminalRevoked(f"terminal {sn} is revoked")


def _check_terminal(row: Terminal | None, sn: str) -> Terminal:
    _check_status(sn, row.status if row is not None else None)
    assert row is not None
    return row


class _NoIdentity(Exception):
    """The key server has no work certificate yet (only before the first download)."""


def _registration(sn: str, public_key_der: bytes) -> RegisteredTerminal:
    return RegisteredTerminal(sn=sn, auth_public=_terminal_key(public_key_der))


@functools.lru_cache(maxsize=4096)
def _terminal_key(public_key_der: bytes) -> PublicKey:
    """A registered TKP_Pu, parsed once per process (a public key: nothing to protect, and
    the DER is the whole cache key, so a re-registered key is parsed afresh)."""
    return load_public_key(public_key_der)


def _active_tmk_query(sn: str, *, for_update: bool = False) -> Select[TerminalMasterKey]:
    query = select(TerminalMasterKey).where(TerminalMasterKey.active_sn == sn)
    return query.with_for_update() if for_update else query


def _tmk_info(row: TerminalMasterKey) -> TmkInfo:
    return TmkInfo(
        algorithm=row.algorithm,
        kcv=row.kcv_hex,
        status=row.status,
        session_id=row.session_id,
        created_at=as_utc(row.created_at),
        activated_at=as_utc(row.activated_at) if row.activated_at else None,
        retired_at=as_utc(row.retired_at) if row.retired_at else None,
    )


@dataclass
class _Retired:
    """Keys whose rows a transaction retired or aborted; destroyed after it commits."""

    tmks: list[tuple[int, str]]  # (row id, handle)
    working_keys: list[tuple[int, str]]
    aborted: list[ServerSessionState]
    kcvs: list[str]  # of the retired TMKs

    @classmethod
    def none(cls) -> _Retired:
        return cls([], [], [], [])


def _check_session_id(session_id: object) -> None:
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise TmkSessionNotFound()


# The download's statements, built once and run on the driver (trustfleet.store.driver): a
# download is three requests whose own work is a few statements each.
_START_FACTS = (
    select(
        Terminal.status,
        Terminal.public_key_der,
        DownloadPolicy.tmk_algorithm,
        DownloadPolicy.rotation_requested_at,
        TerminalMasterKey.id.label("active_tmk"),
    )
    .select_from(Terminal)
    .outerjoin(DownloadPolicy, DownloadPolicy.sn == Terminal.sn)
    .outerjoin(TerminalMasterKey, TerminalMasterKey.active_sn == Terminal.sn)
    .where(Terminal.sn == bindparam("b_sn"))
)
_START_FACTS_LOCKED = _START_FACTS.with_for_update(of=Terminal.sn)
# a start's facts and the active work certificate's, in one read (no row: no terminal;
# a NULL identity: none yet, only before the first download)
_START_FACTS_AND_IDENTITY = _START_FACTS.add_columns(
    ServerIdentity.id.label("identity_id"),
    ServerIdentity.work_key_handle,
    ServerIdentity.kswcrt_der,
    ServerIdentity.ticket_key_handle,
).outerjoin(ServerIdentity, ServerIdentity.active_slot == 1)
_TICKET_KEY = select(ServerIdentity.ticket_key_handle, ServerIdentity.status).where(
    ServerIdentity.id == bindparam("b_id")
)
_INSERT_SESSION = insert_columns(*DownloadSession.__table__.columns)
# the confirmation's facts, under the session's and then the terminal's row lock
_CONFIRM_FACTS_LOCKED = (
    select(
        DownloadSession.sn,
        DownloadSession.state_json,
        Terminal.status,
        DownloadPolicy.rotation_requested_at,
    )
    .select_from(DownloadSession)
    .join(Terminal, Terminal.sn == DownloadSession.sn)
    .outerjoin(DownloadPolicy, DownloadPolicy.sn == DownloadSession.sn)
    .where(DownloadSession.session_id == bindparam("b_sid"))
    .with_for_update(of=[DownloadSession.session_id, Terminal.sn])
)
_NEW_STATE: dict[Any, Any] = {
    DownloadSession.state_json: bindparam("state_json"),
    DownloadSession.stage: bindparam("stage"),
    DownloadSession.updated_at: bindparam("updated_at"),
}
_INSERT_TMK = insert_columns(
    TerminalMasterKey.sn,
    TerminalMasterKey.session_id,
    TerminalMasterKey.key_handle,
    TerminalMasterKey.algorithm,
    TerminalMasterKey.kcv_hex,
    TerminalMasterKey.status,
    TerminalMasterKey.created_at,
)
_SET_SESSION_STATE = (
    update(DownloadSession)
    .where(DownloadSession.session_id == bindparam("b_sid"))
    .values(_NEW_STATE)
)
_ABORT_SESSION = _SET_SESSION_STATE.values(error_code=bindparam("error_code"))
_RETIRE_TMK = (
    update(TerminalMasterKey)
    .where(TerminalMasterKey.active_sn == bindparam("b_sn"))
    .values(status="retired", active_sn=None, retired_at=bindparam("b_now"))
    .returning(TerminalMasterKey.id, TerminalMasterKey.key_handle, TerminalMasterKey.kcv_hex)
)
_RETIRE_WORKING_KEYS = (
    update(WorkingKey)
    .where(WorkingKey.tmk_id == bindparam("b_tmk"), WorkingKey.status == "active")
    .values(status="retired", active_slot=None, retired_at=bindparam("b_now"))
    .returning(WorkingKey.id, WorkingKey.key_handle)
)
_ACTIVATE_TMK = (
    update(TerminalMasterKey)
    .where(TerminalMasterKey.session_id == bindparam("b_sid"))
    .values(status="active", active_sn=bindparam("b_sn"), activated_at=bindparam("b_now"))
)
_SESSION_COLUMNS = (
    DownloadSession.session_id,
    DownloadSession.sn,
    DownloadSession.state_json,
    DownloadSession.stage,
)
_IS_OPEN = or_(*(DownloadSession.stage == stage for stage in _OPEN_STAGES))
_SESSION_FOR_ABORT = (
    select(*_SESSION_COLUMNS)
    .where(DownloadSession.session_id == bindparam("b_sid"))
    .with_for_update()
)
_OPEN_SESSIONS = (
    select(*_SESSION_COLUMNS)
    .where(DownloadSession.sn == bindparam("b_sn"), _IS_OPEN)
    .with_for_update()
)
_OPEN_SESSIONS_SKIP_LOCKED = _OPEN_SESSIONS.with_for_update(skip_locked=True)
_EXPIRED_SESSIONS = (
    select(*_SESSION_COLUMNS)
    .where(_IS_OPEN, DownloadSession.expires_at <= bindparam("b_now"))
    .with_for_update()
)
_ABORT_PENDING_TMK = (
    update(TerminalMasterKey)
    .where(
        TerminalMasterKey.session_id == bindparam("b_sid"), TerminalMasterKey.status == "pending"
    )
    .values(status="aborted")
)
_CLEAR_ROTATION = (
    update(DownloadPolicy)
    .where(
        DownloadPolicy.sn == bindparam("b_sn"), DownloadPolicy.rotation_requested_at.is_not(None)
    )
    .values(rotation_requested_at=None, updated_at=bindparam("b_now"))
)


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
        self._engine: Engine = sessions.kw["bind"]
        self._reads = read_engine(self._engine)
        self._keystore = keystore
        self._clock = clock or (lambda: datetime.now(UTC))
        self._random = random
        self._ttl = session_ttl
        self._default_algorithm = default_tmk_algorithm
        self.identity = IdentityService(sessions, keystore, clock=clock)

    def _now(self) -> datetime:
        return as_utc(self._clock())

    # -- step 1-2: start --------------------------------------------------------------

    def start_download(self, body: bytes | str, *, actor: str) -> ServerChallenge:
        """A terminal's DownloadRequest: the signed challenge, with the session sealed in
        its ticket. Nothing is written: the session is stored when the proof comes."""
        try:
            request = DownloadRequest.from_json(body)
        except TmkError as exc:
            self._fail(None, exc.code, actor=actor, step="request")
            raise
        try:
            try:
                return self._start(request)
            except _NoIdentity:  # the very first download: make KSRCRT and KSWCRT, then retry
                self.identity.ensure(actor=SERVICE_ACTOR)
                return self._start(request)
        except TmkError as exc:
            self._fail(None, exc.code, actor=actor, step="request", sn=request.sn)
            raise

    def _start(self, request: DownloadRequest) -> ServerChallenge:
        with raw_reading(self._reads) as connection:
            facts = connection.one(_START_FACTS_AND_IDENTITY, {"b_sn": request.sn})
        self._download_algorithm(request.sn, facts)
        assert facts is not None  # checked above
        if facts.identity_id is None or facts.ticket_key_handle is None:
            raise _NoIdentity()
        challenge, _ = server_start(
            request,
            terminal=_registration(request.sn, facts.public_key_der),
            keystore=self._keystore,
            work_key=facts.work_key_handle,
            kswcrt_der=facts.kswcrt_der,
            ticket_key=TicketKey(facts.identity_id, facts.ticket_key_handle),
            now=self._now(),
            ttl=self._ttl,
            random=self._random,
        )
        return challenge

    def _download_algorithm(self, sn: str, facts: Any) -> KeyAlgorithm:
        """The TMK algorithm of this terminal's download, or why it may not download."""
        _check_status(sn, facts.status if facts else None)
        assert facts is not None
        if facts.active_tmk is not None and facts.rotation_requested_at is None:
            raise TmkDownloadNotAllowed(
                f"terminal {sn} has an active TMK; ask for a new one with rotate-tmk first"
            )
        return KeyAlgorithm(facts.tmk_algorithm) if facts.tmk_algorithm else self._default_algorithm

    # -- step 4-6: proof ----------------------------------------------------------------

    def accept_proof(self, session_id: str, body: bytes | str, *, actor: str) -> KeyDelivery:
        """The terminal's proof: open its ticket, verify it, make the TMK and deliver it
        wrapped.

        One transaction, under the terminal's row lock: the checks of the start are made
        again, the TMK is made (a soft key store's insert joins the transaction, see
        :func:`trustfleet.store.driver.raw_transaction`), the session is stored as delivered (its
        id is the primary key: a ticket answers once) and the terminal's other open
        sessions are superseded. Should anything fail after the TMK was made, it is
        destroyed (a key store outside the database, PKCS#11, would keep it otherwise)."""
        state: ServerSessionState | None = None
        delivered: ServerSessionState | None = None
        try:
            proof = TerminalProof.from_json(body)
            state = self._open_ticket(session_id, proof.ticket)
            with raw_transaction(self._engine) as connection:
                facts = connection.one(_START_FACTS_LOCKED, {"b_sn": state.sn})
                algorithm = self._download_algorithm(state.sn, facts)
                delivery, delivered = server_accept_proof(
                    state,
                    proof,
                    terminal=_registration(state.sn, facts.public_key_der),
                    keystore=self._keystore,
                    now=self._now(),
                    tmk_algorithm=algorithm,
                )
                superseded = self._abort_open_sessions(
                    connection, state.sn, "tmk-superseded", skip_locked=True
                )
                self._store_delivery(connection, delivered)
        except BaseException as exc:
            if delivered is not None and delivered.tmk_handle is not None:
                self._destroy_quietly(delivered.tmk_handle)  # never stored: nobody knows it
            if isinstance(exc, TmkError):
                self._fail(session_id, exc.code, actor=actor, step="proof", ticketed=state)
            raise
        self._destroy(superseded)
        return delivery

    def _open_ticket(self, session_id: str, ticket: bytes) -> ServerSessionState:
        """The challenged state the ticket carries, which must be ``session_id``'s."""
        _check_session_id(session_id)
        state = open_ticket(ticket, keystore=self._keystore, key_for=self._ticket_key)
        if state.session_id != session_id:
            raise TmkReplay("the ticket is another session's")
        return state

    def _ticket_key(self, key_id: int) -> str | None:
        """The ticket key of an identity, None once the identity is revoked."""
        with raw_reading(self._reads) as connection:
            row = connection.one(_TICKET_KEY, {"b_id": key_id})
        return row.ticket_key_handle if row is not None and row.status != "revoked" else None

    def _store_delivery(self, connection: RawConnection, delivered: ServerSessionState) -> None:
        now = self._now()
        handle, algorithm, kcv = delivered.tmk
        try:
            self._insert_session(connection, delivered, algorithm, now)
        except IntegrityViolation:
            raise TmkOutOfOrder("the session was answered already") from None
        connection.run(
            _INSERT_TMK,
            {
                "sn": delivered.sn,
                "session_id": delivered.session_id,
                "key_handle": handle,
                "algorithm": algorithm.value,
                "kcv_hex": kcv.hex().upper(),
                "status": "pending",
                "created_at": now,
            },
        )

    @staticmethod
    def _insert_session(
        connection: RawConnection,
        state: ServerSessionState,
        algorithm: KeyAlgorithm,
        now: datetime,
        error_code: str | None = None,
    ) -> None:
        connection.run(
            _INSERT_SESSION,
            {
                "session_id": state.session_id,
                "sn": state.sn,
                "stage": state.stage.value,
                "state_json": state.to_json().decode(),
                "tmk_algorithm": algorithm.value,
                "expires_at": state.expires_at,
                "error_code": error_code,
                "created_at": state.created_at,
                "updated_at": now,
            },
        )

    # -- step 7: confirm ----------------------------------------------------------------

    def confirm(self, session_id: str, body: bytes | str, *, actor: str) -> Activation:
        """The terminal's confirmation: the TMK becomes active, the previous one retired.

        One transaction under the session's row lock, then its terminal's (a proof locks
        the terminal first but skips locked sessions, so the two never wait for each other);
        the CMAC check is a few microseconds and reads the TMK in the same transaction."""
        try:
            confirmation = Confirmation.from_json(body)
            _check_session_id(session_id)
            with raw_transaction(self._engine) as connection:
                facts = connection.one(_CONFIRM_FACTS_LOCKED, {"b_sid": session_id})
                if facts is None:
                    raise TmkSessionNotFound()
                sn = facts.sn
                _check_status(sn, facts.status)
                event, active = server_confirm(
                    ServerSessionState.from_json(facts.state_json),
                    confirmation,
                    keystore=self._keystore,
                    now=self._now(),
                )
                connection.run(
                    _SET_SESSION_STATE,
                    {
                        "b_sid": session_id,
                        "state_json": active.to_json().decode(),
                        "stage": active.stage.value,
                        "updated_at": event.activated_at,
                    },
                )
                retired, old_kcv = self._activate(
                    connection, session_id, sn, rotation_requested=facts.rotation_requested_at
                )
                audit.append_raw(
                    connection,
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

    def _activate(
        self,
        connection: RawConnection,
        session_id: str,
        sn: str,
        *,
        rotation_requested: datetime | None,
    ) -> tuple[_Retired, str | None]:
        """Retire the terminal's active TMK (and its working keys), activate the session's
        and clear the rotation request it answers. The caller holds the terminal's row
        lock (a rotation asked for since then stays asked for)."""
        now = self._now()
        retired = self._retire_active_tmk(connection, sn, now)
        old_kcv = retired.kcvs[0] if retired.kcvs else None
        connection.run(_ACTIVATE_TMK, {"b_sid": session_id, "b_sn": sn, "b_now": now})
        if rotation_requested is not None:
            connection.run(_CLEAR_ROTATION, {"b_sn": sn, "b_now": now})
        return retired, old_kcv

    @staticmethod
    def _retire_active_tmk(connection: RawConnection, sn: str, now: datetime) -> _Retired:
        retired = _Retired.none()
        for tmk_id, handle, kcv_hex in connection.all(_RETIRE_TMK, {"b_sn": sn, "b_now": now}):
            retired.tmks.append((tmk_id, handle))
            retired.kcvs.append(kcv_hex)
            keys = connection.all(_RETIRE_WORKING_KEYS, {"b_tmk": tmk_id, "b_now": now})
            retired.working_keys += [(key_id, key_handle) for key_id, key_handle in keys]
        return retired

    # -- terminal-side failure, failures, sweeping ----------------------------------------

    def abort_download(
        self, session_id: str, code: str, *, actor: str, ticket: bytes | None = None
    ) -> None:
        """The terminal reports that the download failed on its side (an untrusted server,
        a KCV mismatch...): end the session now and destroy its TMK. A session that has not
        sent its proof yet is known only by its ``ticket``; it is then stored as aborted,
        so that the ticket can no longer be answered."""
        reported = code if _ERROR_CODE.fullmatch(code) else "invalid-code"
        state = None
        try:
            self._read_session(session_id)
        except TmkSessionNotFound:
            if ticket is None:
                raise
            state = self._open_ticket(session_id, ticket)
        self._fail(
            session_id,
            TmkTerminalAborted.code,
            actor=actor,
            step="terminal",
            reported=reported,
            ticketed=state,
        )

    def _read_session(self, session_id: str) -> DownloadSession:
        _check_session_id(session_id)
        with reading(self._sessions) as session:
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
        ticketed: ServerSessionState | None = None,
    ) -> None:
        """Abort the session (if it is still open) and audit the failure. A session known
        only from its ticket (``ticketed``) is stored as aborted: it is single-use too."""
        aborted = _Retired.none()
        with raw_transaction(self._engine) as connection:
            if session_id is not None and _SESSION_ID.fullmatch(session_id):
                row = connection.one(_SESSION_FOR_ABORT, {"b_sid": session_id})
                if row is not None:
                    sn = row.sn
                    self._abort_rows(connection, [row], code, aborted)
                elif ticketed is not None and ticketed.session_id == session_id:
                    sn = ticketed.sn
                    self._insert_session(
                        connection,
                        replace(ticketed, stage=ServerStage.ABORTED),
                        self._default_algorithm,
                        self._now(),
                        error_code=code,
                    )
            details: dict[str, Any] = {"code": code, "step": step, "session_id": session_id}
            if reported is not None:
                details["reported_code"] = reported
            audit.append_raw(
                connection,
                action="tmk.download_failed",
                actor=actor,
                subject=sn or "",
                outcome="failure",
                details=details,
            )
        self._destroy(aborted)

    def _abort_rows(
        self, connection: RawConnection, rows: Sequence[Any], code: str, aborted: _Retired
    ) -> None:
        """Abort the open sessions among ``rows`` (session_id, sn, state_json, stage); their
        TMKs are destroyed after commit (:meth:`_destroy` of ``aborted``)."""
        for row in rows:
            if row.stage not in _OPEN_STAGES:
                continue
            state = ServerSessionState.from_json(row.state_json)
            connection.run(
                _ABORT_SESSION,
                {
                    "b_sid": row.session_id,
                    "state_json": replace(state, stage=ServerStage.ABORTED).to_json().decode(),
                    "stage": ServerStage.ABORTED.value,
                    "error_code": code,
                    "updated_at": self._now(),
                },
            )
            connection.run(_ABORT_PENDING_TMK, {"b_sid": row.session_id})
            aborted.aborted.append(state)

    def _abort_open_sessions(
        self, connection: RawConnection, sn: str, code: str, *, skip_locked: bool = False
    ) -> _Retired:
        """Abort the terminal's open sessions (with ``skip_locked``, those another
        transaction is confirming right now are left to it)."""
        aborted = _Retired.none()
        query = _OPEN_SESSIONS_SKIP_LOCKED if skip_locked else _OPEN_SESSIONS
        rows = connection.all(query, {"b_sn": sn})
        self._abort_rows(connection, rows, code, aborted)
        return aborted

    def sweep(self, *, actor: str = "tmk-sweeper") -> SweepReport:
        """Abort expired open sessions (destroying their undelivered or unconfirmed TMKs),
        and destroy any retired or aborted key a crash left in the key store."""
        now = self._now()
        aborted = _Retired.none()
        with raw_transaction(self._engine) as connection:
            expired = connection.all(_EXPIRED_SESSIONS, {"b_now": now})
            self._abort_rows(connection, expired, "tmk-session-expired", aborted)
            if expired:
                audit.append_raw(
                    connection,
                    action="tmk.sessions_expired",
                    actor=actor,
                    subject="sessions",
                    details={"aborted": len(expired)},
                )
        with reading(self._sessions) as session:
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
            with raw_transaction(self._engine) as connection:
                aborted = self._abort_open_sessions(connection, sn, f"tmk-terminal-{action}d")
                retired.aborted += aborted.aborted
                if action == "revoke":
                    revoked = self._retire_active_tmk(connection, sn, self._now())
                    retired.tmks += revoked.tmks
                    retired.working_keys += revoked.working_keys
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
        with reading(self._sessions) as session:
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
        with reading(self._sessions) as session:
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
        with reading(self._sessions) as session:
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
            created_at=as_utc(terminal.created_at),
            updated_at=as_utc(terminal.updated_at),
            tmk_algorithm=policy.tmk_algorithm if policy else self._default_algorithm.value,
            rotation_requested=bool(policy and policy.rotation_requested_at),
            active_tmk=_tmk_info(tmk) if tmk else None,
            working_keys=[
                WorkingKeyInfo(k.usage, k.algorithm, k.key_version, k.kcv_hex, as_utc(k.created_at))
                for k in keys
            ],
            tmk_history=int(history or 0),
        )
