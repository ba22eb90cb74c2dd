"""The TMK download on the server: the three device steps, the terminal's abort, and the
sweep of expired sessions.

Each step drives one pure function of :mod:`trustfleet.tmk.protocol` (no state in process
memory: any node serves any step):

- ``start``: read the terminal and the active identity, check it may download, sign the
  challenge and seal the session into its ticket. Nothing is written.
- ``accept_proof``: open the ticket, then in one unit of work under the terminal's row lock
  check again that it may download, verify the proof, make the TMK (a soft key store's
  row joins the unit of work), sign the delivery in protocol version 2 (with the work key
  of the identity whose ticket key sealed the ticket: the key that signed the challenge),
  supersede the terminal's other open sessions and store the session as delivered with
  its pending TMK. The session id is the primary key, so a ticket is answered once.
- ``confirm``: one unit of work under the session's and the terminal's row locks: verify
  the CMAC, activate the TMK, retire the previous one and its working keys (destroyed
  after commit).

On a :class:`~trustfleet.tmk.errors.TmkError` the session ends (single use: a delivered
TMK is destroyed; a session known only from its ticket is stored as aborted, which spends
the ticket), a ``tmk.download_failed`` audit record with the error's code is written, and
the error goes back to the caller.

Retries (docs/tmk-protocol.md, "Retries"): a gateway may send the same proof or
confirmation again, to any node. The session keeps what it answered (the delivery's exact
bytes, the SHA-256 of the canonical proof and confirmation it took), so a repeat gets the
same answer, or the same refusal, and writes nothing; a *different* proof for a session
that was already answered is ``tmk-out-of-order`` and leaves the session alone. Two copies
of a proof racing on two nodes queue on the terminal's row lock; the second then finds the
first's session and answers it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select, update

from trustfleet.crypto import load_public_key
from trustfleet.crypto.base import KeyAlgorithm, PublicKey
from trustfleet.errors import KeyNotFound
from trustfleet.keystore.base import KeyStore
from trustfleet.kit.sessions import is_session_id
from trustfleet.kit.tickets import key_id_of
from trustfleet.store import Database, IntegrityViolation, UnitOfWork
from trustfleet.tmk import lifecycle
from trustfleet.tmk.errors import (
    TmkDownloadNotAllowed,
    TmkError,
    TmkInvalidTicket,
    TmkOutOfOrder,
    TmkReplay,
    TmkSessionNotFound,
    TmkTerminalAborted,
    error_for_code,
)
from trustfleet.tmk.identity import IdentityService
from trustfleet.tmk.lifecycle import MARK_TMK_DESTROYED, MARK_WORKING_KEY_DESTROYED
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
    PROTOCOL_V1,
    PROTOCOL_VERSIONS,
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
    require_version,
    server_accept_proof,
    server_confirm,
    server_start,
)
from trustfleet.wire import as_utc, utcnow

DEFAULT_TMK_ALGORITHM = KeyAlgorithm.AES_128
SERVICE_ACTOR = "tmk-service"
_ERROR_CODE = re.compile(r"[a-z0-9-]{1,64}")


@dataclass(frozen=True)
class Activation:
    """A confirmed download. A repeated confirmation gets the same activation again, with
    ``retired_tmk_kcv`` None (that is told once) and ``repeated`` set."""

    session_id: str
    sn: str
    algorithm: KeyAlgorithm
    kcv: bytes
    activated_at: datetime
    retired_tmk_kcv: bytes | None
    repeated: bool = False


@dataclass(frozen=True)
class SweepReport:
    sessions_aborted: int
    keys_destroyed: int


class _NoIdentity(Exception):
    """The key server has no work certificate yet (only before the first download)."""


@functools.lru_cache(maxsize=4096)
def _terminal_key(public_key_der: bytes) -> PublicKey:
    """A registered TKP_Pu, parsed once per process (a public key: nothing to protect, and
    the DER is the whole cache key, so a re-registered key is parsed afresh)."""
    return load_public_key(public_key_der)


def _registration(sn: str, public_key_der: bytes) -> RegisteredTerminal:
    return RegisteredTerminal(sn=sn, auth_public=_terminal_key(public_key_der))


def _check_session_id(session_id: object) -> None:
    if not is_session_id(session_id):
        raise TmkSessionNotFound()


def _digest(message: bytes) -> str:
    """What identifies a proof or confirmation: SHA-256 of its canonical encoding (so the
    same message is the same whatever whitespace or key order a gateway sent)."""
    return hashlib.sha256(message).hexdigest()


class _Repeat(Exception):
    """A repeated request, answered as its first copy was: ``answer`` is what to give back
    (a delivery or an activation), ``refusal`` the error to raise again. Nothing is
    written for a repeat."""

    def __init__(self, answer: Any = None, refusal: TmkError | None = None) -> None:
        super().__init__()
        self.answer = answer
        self.refusal = refusal

    def result(self) -> Any:
        if self.refusal is not None:
            raise self.refusal
        return self.answer


def _refused_again(code: str, step: str) -> TmkError:
    return error_for_code(code)(f"this {step} was refused before, with {code}")


# A download is three requests whose own work is a few statements each: the statements are
# built once, here.
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
# the work key of an identity while it is the active one (a rotation destroys the old key)
_ACTIVE_WORK_KEY = select(ServerIdentity.work_key_handle).where(
    ServerIdentity.id == bindparam("b_id"), ServerIdentity.active_slot == 1
)
_LOCK_TERMINAL = (
    select(Terminal.sn).where(Terminal.sn == bindparam("b_sn")).with_for_update(of=Terminal.sn)
)
# what a session answered, with the state of the TMK it delivered
_ANSWERED = (
    select(
        DownloadSession.stage,
        DownloadSession.error_code,
        DownloadSession.proof_sha256,
        DownloadSession.delivery_json,
        TerminalMasterKey.status.label("tmk_status"),
    )
    .select_from(DownloadSession)
    .outerjoin(TerminalMasterKey, TerminalMasterKey.session_id == DownloadSession.session_id)
    .where(DownloadSession.session_id == bindparam("b_sid"))
)
# the confirmation's facts, under the session's and then the terminal's row lock
_CONFIRM_FACTS_LOCKED = (
    select(
        DownloadSession.sn,
        DownloadSession.state_json,
        DownloadSession.stage,
        DownloadSession.error_code,
        DownloadSession.confirmation_sha256,
        Terminal.status,
        DownloadPolicy.rotation_requested_at,
    )
    .select_from(DownloadSession)
    .join(Terminal, Terminal.sn == DownloadSession.sn)
    .outerjoin(DownloadPolicy, DownloadPolicy.sn == DownloadSession.sn)
    .where(DownloadSession.session_id == bindparam("b_sid"))
    .with_for_update(of=[DownloadSession.session_id, Terminal.sn])
)
# the session's TMK, read after the session's lock was granted (a statement of its own: on
# PostgreSQL a row joined to a locked one is as of before the wait)
_SESSION_TMK = select(
    TerminalMasterKey.status,
    TerminalMasterKey.algorithm,
    TerminalMasterKey.kcv_hex,
    TerminalMasterKey.activated_at,
).where(TerminalMasterKey.session_id == bindparam("b_sid"))
_SET_CONFIRMATION_DIGEST = (
    update(DownloadSession)
    .where(DownloadSession.session_id == bindparam("b_sid"))
    .values(confirmation_sha256=bindparam("digest"))
)
_ACTIVATE_SESSION = (
    update(DownloadSession)
    .where(DownloadSession.session_id == bindparam("b_sid"))
    .values(
        state_json=bindparam("state_json"),
        stage=bindparam("stage"),
        confirmation_sha256=bindparam("digest"),
        updated_at=bindparam("updated_at"),
    )
)
_ACTIVATE_TMK = (
    update(TerminalMasterKey)
    .where(TerminalMasterKey.session_id == bindparam("b_sid"))
    .values(status="active", active_sn=bindparam("b_sn"), activated_at=bindparam("b_now"))
)
_CLEAR_ROTATION = (
    update(DownloadPolicy)
    .where(
        DownloadPolicy.sn == bindparam("b_sn"), DownloadPolicy.rotation_requested_at.is_not(None)
    )
    .values(rotation_requested_at=None, updated_at=bindparam("b_now"))
)
_SESSION = select(*lifecycle.SESSION_COLUMNS).where(
    DownloadSession.session_id == bindparam("b_sid")
)
_SESSION_LOCKED = _SESSION.with_for_update()
_EXPIRED_SESSIONS = (
    select(*lifecycle.SESSION_COLUMNS)
    .where(lifecycle.IS_OPEN, DownloadSession.expires_at <= bindparam("b_now"))
    .with_for_update()
)
_UNDESTROYED_TMKS = select(TerminalMasterKey.id, TerminalMasterKey.key_handle).where(
    TerminalMasterKey.status.in_(("retired", "aborted")),
    TerminalMasterKey.destroyed_at.is_(None),
)
_UNDESTROYED_WORKING_KEYS = select(WorkingKey.id, WorkingKey.key_handle).where(
    WorkingKey.status == "retired", WorkingKey.destroyed_at.is_(None)
)


class Downloads:
    """The key server's side of TMK downloads, over one database and one key store."""

    def __init__(
        self,
        db: Database,
        keystore: KeyStore,
        identity: IdentityService,
        *,
        clock: Callable[[], datetime] = utcnow,
        random: Callable[[int], bytes] = os.urandom,
        session_ttl: timedelta = DEFAULT_SESSION_TTL,
        default_tmk_algorithm: KeyAlgorithm = DEFAULT_TMK_ALGORITHM,
        versions: Collection[int] = PROTOCOL_VERSIONS,
    ) -> None:
        """``versions``: the protocol versions a download request may be in (the setting
        ``tmk_min_protocol_version`` leaves out version 1)."""
        if not versions or not set(versions) <= PROTOCOL_VERSIONS:
            raise ValueError(f"versions are among {sorted(PROTOCOL_VERSIONS)}")
        self._db = db
        self._keystore = keystore
        self._identity = identity
        self._clock = clock
        self._random = random
        self._ttl = session_ttl
        self._default_algorithm = default_tmk_algorithm
        self._versions = frozenset(versions)

    def _now(self) -> datetime:
        return as_utc(self._clock())

    # -- steps 1-2: start ----------------------------------------------------------------

    def start(self, body: bytes | str, *, actor: str) -> ServerChallenge:
        """A terminal's DownloadRequest: the signed challenge, in the request's protocol
        version, with the session sealed in its ticket. Nothing is written: the session is
        stored when the proof comes."""
        request: DownloadRequest | None = None
        try:
            request = DownloadRequest.from_json(body)
            require_version(request.version, self._versions)
            try:
                return self._challenge(request)
            except _NoIdentity:  # the very first download: make KSRCRT and KSWCRT, then retry
                self._identity.ensure(actor=SERVICE_ACTOR)
                return self._challenge(request)
        except TmkError as exc:
            self._record_failure(exc.code, actor, "request", sn=request.sn if request else None)
            raise

    def _challenge(self, request: DownloadRequest) -> ServerChallenge:
        with self._db.reading() as reads:
            facts = reads.one(_START_FACTS_AND_IDENTITY, b_sn=request.sn)
        self._download_algorithm(request.sn, facts)
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
            versions=self._versions,
        )
        return challenge

    def _download_algorithm(self, sn: str, facts: Any) -> KeyAlgorithm:
        """The TMK algorithm of this terminal's download, or why it may not download."""
        lifecycle.check_status(sn, facts.status if facts else None)
        if facts.active_tmk is not None and facts.rotation_requested_at is None:
            raise TmkDownloadNotAllowed(
                f"terminal {sn} has an active TMK; ask for a new one with rotate-tmk first"
            )
        return KeyAlgorithm(facts.tmk_algorithm) if facts.tmk_algorithm else self._default_algorithm

    # -- steps 4-6: proof ----------------------------------------------------------------

    def accept_proof(self, session_id: str, body: bytes | str, *, actor: str) -> KeyDelivery:
        """The terminal's proof: open its ticket, verify it, make the TMK and deliver it
        wrapped. Should anything fail after the TMK was made, it is destroyed (a key store
        outside the database, PKCS#11, would keep it otherwise).

        A proof the session was already answered to gets that answer again (the stored
        delivery, or the stored refusal) and writes nothing; any other proof for an
        answered session is :class:`TmkOutOfOrder` and leaves it alone."""
        try:
            proof = TerminalProof.from_json(body)
            _check_session_id(session_id)
        except TmkError as exc:
            self._fail(session_id, exc.code, actor, "proof", end_existing=False)
            raise
        digest = _digest(proof.to_json())
        try:
            with self._db.reading() as reads:
                self._check_answered_proof(reads.one(_ANSWERED, b_sid=session_id), digest)
            return self._deliver(session_id, proof, digest, actor)
        except _Repeat as repeat:
            delivery: KeyDelivery = repeat.result()
            return delivery

    def _check_answered_proof(self, row: Any, digest: str) -> None:
        """Raise :class:`_Repeat` if the session (``row`` of :data:`_ANSWERED`, None when
        there is none) was answered to this very proof; return if it is not stored yet (or
        was stored from another message: the caller refuses that)."""
        if row is None or row.proof_sha256 != digest:
            return
        if row.delivery_json is None:  # the proof was refused, and the session ended
            raise _Repeat(refusal=_refused_again(row.error_code or TmkOutOfOrder.code, "proof"))
        if row.stage in (ServerStage.DELIVERED.value, ServerStage.ACTIVE.value) and (
            row.tmk_status in ("pending", "active")
        ):
            raise _Repeat(answer=KeyDelivery.from_json(row.delivery_json))
        # delivered once, but the session or its TMK has ended since: nothing to repeat
        raise _Repeat(refusal=TmkOutOfOrder("the session this proof was answered in has ended"))

    def _deliver(
        self, session_id: str, proof: TerminalProof, digest: str, actor: str
    ) -> KeyDelivery:
        """Steps 4-6 for a proof the session has not been answered to. A refusal after the
        ticket opened is stored (the session, aborted, with this proof's digest) in the
        same unit of work that made the checks, under the terminal's row lock: a copy of
        the proof then finds it and gets the same refusal."""
        delivered: ServerSessionState | None = None
        refusal: TmkError | None = None
        try:
            state = self._open_ticket(session_id, proof.ticket)
            work_key = self._signing_key(proof.ticket) if state.version > PROTOCOL_V1 else None
            with self._db.work() as uow:
                facts = uow.one(_START_FACTS_LOCKED, b_sn=state.sn)
                if facts is None:
                    lifecycle.check_status(state.sn, None)
                # under the terminal's lock: a copy of this proof may have been answered
                # since the read above (on another node); its answer is the answer
                answered = uow.one(_ANSWERED, b_sid=session_id)
                if answered is not None:
                    self._check_answered_proof(answered, digest)
                    raise TmkOutOfOrder("the session was answered already, to another message")
                try:
                    algorithm = self._download_algorithm(state.sn, facts)
                    delivery, delivered = server_accept_proof(
                        state,
                        proof,
                        terminal=_registration(state.sn, facts.public_key_der),
                        keystore=self._keystore,
                        now=self._now(),
                        tmk_algorithm=algorithm,
                        work_key=work_key,
                    )
                except TmkError as exc:
                    refusal = exc
                    aborted = replace(state, stage=ServerStage.ABORTED)
                    self._insert_session(
                        uow, aborted, self._default_algorithm, exc.code, proof_sha256=digest
                    )
                    self._audit_failure(uow, actor, state.sn, exc.code, "proof", session_id)
                else:
                    lifecycle.abort_open_sessions(
                        uow,
                        self._keystore,
                        state.sn,
                        "tmk-superseded",
                        self._now(),
                        skip_locked=True,
                    )
                    self._store_delivery(uow, delivered, delivery, digest)
        except _Repeat:
            raise
        except BaseException as exc:
            if delivered is not None and delivered.tmk_handle is not None:
                self._destroy_quietly(delivered.tmk_handle)  # never stored: nobody knows it
            if isinstance(exc, IntegrityViolation):
                # the session was stored by a request this one did not queue behind (an
                # abort with its ticket): answer from what it stored, and touch nothing
                with self._db.reading() as reads:
                    self._check_answered_proof(reads.one(_ANSWERED, b_sid=session_id), digest)
                exc = TmkOutOfOrder("the session was answered already")
                self._fail(session_id, exc.code, actor, "proof", end_existing=False)
                raise exc from None
            if isinstance(exc, TmkError):  # before the checks: the session is not touched
                self._fail(session_id, exc.code, actor, "proof", end_existing=False)
            raise
        if refusal is not None:
            raise refusal
        return delivery

    def _open_ticket(self, session_id: str, ticket: bytes) -> ServerSessionState:
        """The challenged state the ticket carries, which must be ``session_id``'s."""
        _check_session_id(session_id)
        state = open_ticket(ticket, keystore=self._keystore, key_for=self._ticket_key)
        if state.session_id != session_id:
            raise TmkReplay("the ticket is another session's")
        return state

    def _signing_key(self, ticket: bytes) -> str:
        """The work key that signed the challenge of an opened ``ticket`` (the identity
        whose ticket key sealed it), which signs the version 2 delivery: the terminal
        verifies it with that key. Once a rotation replaced that identity its work key is
        destroyed, so the proof is refused and the terminal starts a new download."""
        with self._db.reading() as reads:
            handle = reads.scalar(_ACTIVE_WORK_KEY, b_id=key_id_of(ticket))
        if handle is None:
            raise TmkInvalidTicket("the work certificate that signed this challenge was replaced")
        return str(handle)

    def _ticket_key(self, key_id: int) -> str | None:
        """The ticket key of an identity, None once the identity is revoked."""
        with self._db.reading() as reads:
            row = reads.one(_TICKET_KEY, b_id=key_id)
        return row.ticket_key_handle if row is not None and row.status != "revoked" else None

    def _store_delivery(
        self, uow: UnitOfWork, delivered: ServerSessionState, delivery: KeyDelivery, digest: str
    ) -> None:
        handle, algorithm, kcv = delivered.tmk
        self._insert_session(
            uow,
            delivered,
            algorithm,
            proof_sha256=digest,
            delivery_json=delivery.to_json().decode(),
        )
        uow.insert(
            TerminalMasterKey,
            sn=delivered.sn,
            session_id=delivered.session_id,
            key_handle=handle,
            algorithm=algorithm.value,
            kcv_hex=kcv.hex().upper(),
            status="pending",
            created_at=self._now(),
        )

    def _insert_session(
        self,
        uow: UnitOfWork,
        state: ServerSessionState,
        algorithm: KeyAlgorithm,
        error_code: str | None = None,
        *,
        proof_sha256: str | None = None,
        delivery_json: str | None = None,
    ) -> None:
        uow.insert(
            DownloadSession,
            session_id=state.session_id,
            sn=state.sn,
            stage=state.stage.value,
            state_json=state.to_json().decode(),
            tmk_algorithm=algorithm.value,
            expires_at=state.expires_at,
            error_code=error_code,
            proof_sha256=proof_sha256,
            delivery_json=delivery_json,
            created_at=state.created_at,
            updated_at=self._now(),
        )

    # -- step 7: confirm ----------------------------------------------------------------

    def confirm(self, session_id: str, body: bytes | str, *, actor: str) -> Activation:
        """The terminal's confirmation: the TMK becomes active, the previous one retired.

        Under the session's row lock, then its terminal's (a proof locks the terminal first
        but skips locked sessions, so the two never wait for each other); the CMAC check
        reads the TMK in the same transaction. The confirmation that activated a TMK gets
        the same activation again while that TMK is active, and writes nothing; one that
        was refused gets the same refusal."""
        digest: str | None = None
        try:
            confirmation = Confirmation.from_json(body)
            _check_session_id(session_id)
            digest = _digest(confirmation.to_json())
            with self._db.work() as uow:
                facts = uow.one(_CONFIRM_FACTS_LOCKED, b_sid=session_id)
                if facts is None:
                    raise TmkSessionNotFound()
                if facts.confirmation_sha256 == digest:
                    tmk = uow.one(_SESSION_TMK, b_sid=session_id)
                    raise self._repeated_confirmation(session_id, facts, tmk)
                lifecycle.check_status(facts.sn, facts.status)
                now = self._now()
                event, active = server_confirm(
                    ServerSessionState.from_json(facts.state_json),
                    confirmation,
                    keystore=self._keystore,
                    now=now,
                )
                uow.run(
                    _ACTIVATE_SESSION,
                    b_sid=session_id,
                    state_json=active.to_json().decode(),
                    stage=active.stage.value,
                    digest=digest,
                    updated_at=now,
                )
                retired = self._activate(
                    uow, session_id, facts.sn, facts.rotation_requested_at, now
                )
                uow.audit(
                    "tmk.tmk_activated",
                    actor=actor,
                    subject=facts.sn,
                    details={
                        "session_id": session_id,
                        "algorithm": event.algorithm.value,
                        "kcv": event.kcv.hex().upper(),
                        "retired_tmk_kcv": retired.kcv_hex if retired else None,
                        "retired_working_keys": retired.working_keys if retired else 0,
                    },
                )
        except _Repeat as repeat:
            activation: Activation = repeat.result()
            return activation
        except TmkError as exc:
            self._fail(session_id, exc.code, actor, "confirm", confirmation_sha256=digest)
            raise
        return Activation(
            session_id=session_id,
            sn=facts.sn,
            algorithm=event.algorithm,
            kcv=event.kcv,
            activated_at=event.activated_at,
            retired_tmk_kcv=bytes.fromhex(retired.kcv_hex) if retired else None,
        )

    @staticmethod
    def _repeated_confirmation(session_id: str, facts: Any, tmk: Any) -> _Repeat:
        """The answer to a confirmation the session took before (``facts`` of
        :data:`_CONFIRM_FACTS_LOCKED`, ``tmk`` of :data:`_SESSION_TMK`)."""
        if facts.stage == ServerStage.ABORTED.value:
            code = facts.error_code or TmkOutOfOrder.code
            return _Repeat(refusal=_refused_again(code, "confirmation"))
        if facts.stage != ServerStage.ACTIVE.value or tmk is None or tmk.status != "active":
            return _Repeat(refusal=TmkOutOfOrder("the TMK this confirmation activated is retired"))
        return _Repeat(
            answer=Activation(
                session_id=session_id,
                sn=facts.sn,
                algorithm=KeyAlgorithm(tmk.algorithm),
                kcv=bytes.fromhex(tmk.kcv_hex),
                activated_at=as_utc(tmk.activated_at),
                retired_tmk_kcv=None,
                repeated=True,
            )
        )

    def _activate(
        self,
        uow: UnitOfWork,
        session_id: str,
        sn: str,
        rotation_requested: datetime | None,
        now: datetime,
    ) -> lifecycle.RetiredTmk | None:
        """Retire the terminal's active TMK (and its working keys), activate the session's
        and clear the rotation request it answers. The caller holds the terminal's row
        lock (a rotation asked for since then stays asked for)."""
        retired = lifecycle.retire_active_tmk(uow, self._keystore, sn, now)
        uow.run(_ACTIVATE_TMK, b_sid=session_id, b_sn=sn, b_now=now)
        if rotation_requested is not None:
            uow.run(_CLEAR_ROTATION, b_sn=sn, b_now=now)
        return retired

    # -- the terminal gives up; failures -------------------------------------------------

    def abort(self, session_id: str, code: str, *, actor: str, ticket: bytes | None = None) -> None:
        """The terminal reports that the download failed on its side (an untrusted server,
        a KCV mismatch...): end the session now and destroy its TMK. A session that has not
        sent its proof yet is known only by its ``ticket``; it is then stored as aborted,
        so that the ticket can no longer be answered. A session that has already ended
        (confirmed, or aborted before) is :class:`TmkOutOfOrder`, and nothing is written."""
        reported = code if _ERROR_CODE.fullmatch(code) else "invalid-code"
        _check_session_id(session_id)
        with self._db.reading() as reads:
            row = reads.one(_SESSION, b_sid=session_id)
        ticketed = None
        if row is None:
            if ticket is None:
                raise TmkSessionNotFound()
            ticketed = self._open_ticket(session_id, ticket)
        elif row.stage not in lifecycle.OPEN_STAGES:
            raise TmkOutOfOrder(f"the session is {row.stage}: there is nothing to abort")
        ended = self._fail(
            session_id,
            TmkTerminalAborted.code,
            actor,
            "terminal",
            reported=reported,
            ticketed=ticketed,
            only_if_open=True,
        )
        if not ended:  # it ended (or was answered) between the read and the lock
            raise TmkOutOfOrder("the session has ended: there is nothing to abort")

    def _fail(
        self,
        session_id: str,
        code: str,
        actor: str,
        step: str,
        *,
        reported: str | None = None,
        ticketed: ServerSessionState | None = None,
        only_if_open: bool = False,
        end_existing: bool = True,
        confirmation_sha256: str | None = None,
    ) -> bool:
        """End the session (if it is still open) and audit the failure, in one unit of
        work. A session known only from its ticket (``ticketed``) is stored as aborted: it
        is single use too. With ``end_existing`` False (the proof step), a stored session
        is left as it is: a proof that fails is never the one the session was answered
        to, so it cannot end it. With ``only_if_open``, nothing is written unless a
        session was ended. Whether one was."""
        sn: str | None = None
        ended = False
        with self._db.work() as uow:
            if is_session_id(session_id):
                row = uow.one(_SESSION_LOCKED if end_existing else _SESSION, b_sid=session_id)
                if row is not None:
                    sn = row.sn
                    if end_existing:
                        ended = bool(
                            lifecycle.abort_sessions(uow, self._keystore, [row], code, self._now())
                        )
                    if ended and confirmation_sha256 is not None:
                        uow.run(
                            _SET_CONFIRMATION_DIGEST, b_sid=session_id, digest=confirmation_sha256
                        )
                elif ticketed is not None and ticketed.session_id == session_id:
                    sn = ticketed.sn
                    ended = self._store_aborted(uow, ticketed, code)
            if only_if_open and not ended:
                return False
            self._audit_failure(uow, actor, sn, code, step, session_id, reported=reported)
        return ended

    @staticmethod
    def _audit_failure(
        uow: UnitOfWork,
        actor: str,
        sn: str | None,
        code: str,
        step: str,
        session_id: str | None,
        *,
        reported: str | None = None,
    ) -> None:
        details: dict[str, Any] = {"code": code, "step": step, "session_id": session_id}
        if reported is not None:
            details["reported_code"] = reported
        uow.audit(
            "tmk.download_failed",
            actor=actor,
            subject=sn or "",
            outcome="failure",
            details=details,
        )

    def _store_aborted(self, uow: UnitOfWork, ticketed: ServerSessionState, code: str) -> bool:
        """Store a session known only from its ticket as aborted with ``code``, under its
        terminal's row lock (the lock a proof stores its session under, so the two
        queue); False, storing nothing, if a proof stored it meanwhile."""
        uow.one(_LOCK_TERMINAL, b_sn=ticketed.sn)
        if uow.one(_SESSION, b_sid=ticketed.session_id) is not None:
            return False
        aborted = replace(ticketed, stage=ServerStage.ABORTED)
        self._insert_session(uow, aborted, self._default_algorithm, code)
        return True

    def _record_failure(self, code: str, actor: str, step: str, *, sn: str | None) -> None:
        """Audit a refused start (no session exists yet)."""
        with self._db.work() as uow:
            self._audit_failure(uow, actor, sn, code, step, None)

    # -- sweeping ------------------------------------------------------------------------

    def sweep(self, *, actor: str = "tmk-sweeper") -> SweepReport:
        """Abort expired open sessions (destroying their undelivered or unconfirmed TMKs),
        and destroy any retired or aborted key a crash left in the key store."""
        now = self._now()
        with self._db.work() as uow:
            expired = uow.all(_EXPIRED_SESSIONS, b_now=now)
            aborted = lifecycle.abort_sessions(
                uow, self._keystore, expired, "tmk-session-expired", now
            )
            if aborted:
                uow.audit(
                    "tmk.sessions_expired",
                    actor=actor,
                    subject="sessions",
                    details={"aborted": len(aborted)},
                )
        tmks = sum(1 for state in aborted if state.tmk_handle is not None)
        return SweepReport(len(aborted), keys_destroyed=tmks + self._destroy_leftovers())

    def _destroy_leftovers(self) -> int:
        """Destroy the keys whose rows say retired or aborted but not destroyed."""
        with self._db.reading() as reads:
            tmks = reads.all(_UNDESTROYED_TMKS)
            working_keys = reads.all(_UNDESTROYED_WORKING_KEYS)
        now = self._now()
        with self._db.work() as uow:
            for row in tmks:
                uow.destroy_after_commit(
                    self._keystore, row.key_handle, mark=MARK_TMK_DESTROYED, b_id=row.id, b_now=now
                )
            for row in working_keys:
                uow.destroy_after_commit(
                    self._keystore,
                    row.key_handle,
                    mark=MARK_WORKING_KEY_DESTROYED,
                    b_id=row.id,
                    b_now=now,
                )
        return len({row.key_handle for row in (*tmks, *working_keys)})

    def _destroy_quietly(self, handle: str) -> None:
        with contextlib.suppress(KeyNotFound):
            self._keystore.destroy(handle)
