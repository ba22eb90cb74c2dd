"""The TMK service over a real database and soft key store (SQLite, and PostgreSQL when
configured): downloads step by step, every refusal with its code, audit record and no TMK
left half-issued; rotation, working keys, PIN blocks, the key server's identity."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import KeyNotFound
from trustfleet.keystore.base import KeyStore
from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.pki.service import PkiService
from trustfleet.store import Database
from trustfleet.store.audit import AuditRecord, iter_records, verify_chain
from trustfleet.tmk import errors, registry
from trustfleet.tmk.models import DownloadSession, ServerIdentity, TerminalMasterKey, WorkingKey
from trustfleet.tmk.protocol import (
    Confirmation,
    KeyDelivery,
    ServerChallenge,
    ServerTrust,
    TerminalProof,
    TerminalSession,
)
from trustfleet.tmk.service import (
    Activation,
    TmkDownloadNotAllowed,
    TmkNoActiveTmk,
    TmkNoWorkingKey,
    TmkService,
    TmkSessionNotFound,
    TmkTerminalAborted,
    TmkTerminalRevoked,
    TmkTerminalSuspended,
    TmkUnknownTerminal,
)
from trustfleet.tmk.terminal import PosTerminal

PAN = "4111111111111111"


class Clock:
    """A clock the test moves; starts at the current second."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keystore(db: Database) -> SoftKeyStore:
    return SoftKeyStore(db, MasterKeyring([MasterKey.new()]))


@pytest.fixture
def service(sessions: sessionmaker[Session], keystore: KeyStore, clock: Clock) -> TmkService:
    tmk = TmkService(sessions, keystore, clock=clock)
    tmk.identity.ensure(actor="test")
    return tmk


@pytest.fixture
def root_pem(service: TmkService) -> bytes:
    return service.identity.root().pem.encode()


@pytest.fixture
def make_terminal(
    tmp_path: Path, sessions: sessionmaker[Session], root_pem: bytes
) -> Callable[..., PosTerminal]:
    counter = iter(range(100))

    def make(
        sn: str = "POS-1", algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256, *, register: bool = True
    ) -> PosTerminal:
        directory = tmp_path / f"pos-{next(counter)}"
        record = PosTerminal.factory(directory, sn, algorithm, root_pem=root_pem)
        if register:
            registry.register_terminal(
                sessions, sn=sn, model="A920", public_key=record.public_key_pem, actor="maker"
            )
        return PosTerminal.open(directory)

    return make


@pytest.fixture
def terminal(make_terminal: Callable[..., PosTerminal]) -> PosTerminal:
    return make_terminal()


@dataclass
class Steps:
    """One download driven step by step (the terminal role in memory, the service as the
    HTTP routes call it)."""

    service: TmkService
    terminal: PosTerminal
    session: TerminalSession
    challenge: ServerChallenge | None = None
    delivery: KeyDelivery | None = None
    confirmation: Confirmation | None = None

    @property
    def session_id(self) -> str:
        assert self.challenge is not None
        return self.challenge.session_id

    def start(self) -> ServerChallenge:
        self.challenge = self.service.start_download(self.session.start().to_json(), actor="gw")
        return self.challenge

    def proof(self) -> KeyDelivery:
        assert self.challenge is not None
        proof = self.session.receive_challenge(self.challenge)
        self.delivery = self.service.accept_proof(self.session_id, proof.to_json(), actor="gw")
        return self.delivery

    def confirm(self) -> Activation:
        assert self.delivery is not None
        self.confirmation = self.session.receive_delivery(self.delivery)
        return self.service.confirm(self.session_id, self.confirmation.to_json(), actor="gw")


def steps(
    service: TmkService,
    terminal: PosTerminal,
    clock: Clock,
    crls: tuple[x509.CertificateRevocationList, ...] = (),
) -> Steps:
    trust = ServerTrust(terminal.roots, crls)
    return Steps(service, terminal, TerminalSession(terminal.scm, trust, clock=clock))


def download(service: TmkService, terminal: PosTerminal, clock: Clock) -> Activation:
    run = steps(service, terminal, clock)
    run.start()
    run.proof()
    return run.confirm()


def _audit(sessions: sessionmaker[Session]) -> list[AuditRecord]:
    with sessions() as session:
        return list(iter_records(session))


def _failures(sessions: sessionmaker[Session]) -> list[dict[str, object]]:
    return [
        json.loads(r.details) | {"subject": r.subject}
        for r in _audit(sessions)
        if r.action == "tmk.download_failed"
    ]


def _tmks(sessions: sessionmaker[Session], sn: str) -> list[TerminalMasterKey]:
    with sessions() as session:
        return list(
            session.scalars(
                select(TerminalMasterKey)
                .where(TerminalMasterKey.sn == sn)
                .order_by(TerminalMasterKey.id)
            )
        )


def _session_row(sessions: sessionmaker[Session], session_id: str) -> DownloadSession:
    with sessions() as session:
        row = session.get(DownloadSession, session_id)
    assert row is not None
    return row


def assert_destroyed(keystore: KeyStore, handle: str) -> None:
    with pytest.raises(KeyNotFound):
        keystore.info(handle)


def assert_no_tmk_left(sessions: sessionmaker[Session], keystore: KeyStore, sn: str) -> None:
    """No TMK of ``sn`` is active, and every one ever made is destroyed in the key store."""
    for tmk in _tmks(sessions, sn):
        assert tmk.status in ("aborted", "retired")
        assert tmk.destroyed_at is not None
        assert_destroyed(keystore, tmk.key_handle)


# =====================================================================================
# The download
# =====================================================================================


@pytest.mark.parametrize(
    "algorithm",
    [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048, KeyAlgorithm.SM2],
    ids=["p256", "rsa", "gm"],
)
def test_download_activates_the_tmk_the_terminal_holds(
    service: TmkService,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
    algorithm: KeyAlgorithm,
) -> None:
    terminal = make_terminal("POS-A", algorithm)
    run = steps(service, terminal, clock)
    run.start()
    with sessions() as session:  # a challenge writes nothing: its session is in the ticket
        assert session.get(DownloadSession, run.session_id) is None
    run.proof()
    assert _session_row(sessions, run.session_id).stage == "delivered"
    (pending,) = _tmks(sessions, "POS-A")
    assert pending.status == "pending" and pending.active_sn is None  # not active yet
    activation = run.confirm()

    assert activation.kcv == terminal.scm.tmk_kcv
    (tmk,) = _tmks(sessions, "POS-A")
    assert (tmk.status, tmk.active_sn, tmk.kcv_hex) == (
        "active",
        "POS-A",
        activation.kcv.hex().upper(),
    )
    assert keystore.kcv(tmk.key_handle)[:5] == terminal.scm.tmk_kcv
    assert _session_row(sessions, run.session_id).stage == "active"
    actions = [r.action for r in _audit(sessions) if r.subject == "POS-A"]
    assert actions[-1] == "tmk.tmk_activated" and "tmk.download_started" not in actions
    with sessions() as session:
        assert verify_chain(iter_records(session)).ok


def test_tdes_profile_downloads_a_tdes_tmk(
    service: TmkService, terminal: PosTerminal, clock: Clock
) -> None:
    service.request_rotation("POS-1", actor="ops", algorithm=KeyAlgorithm.TDES)
    activation = download(service, terminal, clock)
    assert activation.algorithm is KeyAlgorithm.TDES
    assert len(activation.kcv) == 3 and terminal.scm.tmk_algorithm is KeyAlgorithm.TDES


@pytest.mark.parametrize(
    ("status_change", "error"),
    [
        (None, TmkUnknownTerminal),
        ("suspend", TmkTerminalSuspended),
        ("revoke", TmkTerminalRevoked),
    ],
)
def test_unknown_suspended_and_revoked_terminals_are_refused_with_their_own_codes(
    service: TmkService,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    clock: Clock,
    status_change: str | None,
    error: type[errors.TmkError],
) -> None:
    terminal = make_terminal("POS-X", register=status_change is not None)
    if status_change:
        service.change_terminal_status("POS-X", status_change, actor="ops")
    with pytest.raises(error):
        steps(service, terminal, clock).start()
    assert _failures(sessions)[-1]["code"] == error.code
    assert _failures(sessions)[-1]["subject"] == "POS-X"
    with sessions() as session:
        assert session.scalars(select(DownloadSession)).all() == []


def test_suspending_mid_download_refuses_the_next_step_and_destroys_the_tmk(
    service: TmkService,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    run = steps(service, terminal, clock)
    run.start()
    run.proof()
    service.change_terminal_status("POS-1", "suspend", actor="ops")
    with pytest.raises(TmkTerminalSuspended):
        run.confirm()
    assert_no_tmk_left(sessions, keystore, "POS-1")
    service.change_terminal_status("POS-1", "reactivate", actor="ops")
    download(service, terminal, clock)  # a fresh download works again


def test_expired_session_is_refused_and_aborted(
    service: TmkService, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run = steps(service, terminal, clock)
    run.start()
    proof = run.session.receive_challenge(run.challenge)  # type: ignore[arg-type]
    clock.advance(61)
    with pytest.raises(errors.TmkSessionExpired):
        service.accept_proof(run.session_id, proof.to_json(), actor="gw")
    row = _session_row(sessions, run.session_id)
    assert (row.stage, row.error_code) == ("aborted", "tmk-session-expired")
    clock.advance(-61)  # even back in time, an aborted session stays dead
    with pytest.raises(errors.TmkOutOfOrder):
        service.accept_proof(run.session_id, proof.to_json(), actor="gw")
    assert _tmks(sessions, "POS-1") == []


def test_confirmation_after_expiry_destroys_the_delivered_tmk(
    service: TmkService,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    run = steps(service, terminal, clock)
    run.start()
    run.proof()
    confirmation = run.session.receive_delivery(run.delivery)  # type: ignore[arg-type]
    clock.advance(60)
    with pytest.raises(errors.TmkSessionExpired):
        service.confirm(run.session_id, confirmation.to_json(), actor="gw")
    assert_no_tmk_left(sessions, keystore, "POS-1")


def test_bad_confirmation_mac_leaves_no_tmk_active_and_destroys_it(
    service: TmkService,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    run = steps(service, terminal, clock)
    run.start()
    run.proof()
    good = run.session.receive_delivery(run.delivery)  # type: ignore[arg-type]
    forged = replace(good, mac=bytes(16))
    with pytest.raises(errors.TmkBadConfirmation):
        service.confirm(run.session_id, forged.to_json(), actor="gw")
    assert_no_tmk_left(sessions, keystore, "POS-1")
    with pytest.raises(errors.TmkOutOfOrder):  # the genuine one comes too late: single use
        service.confirm(run.session_id, good.to_json(), actor="gw")
    assert [f["code"] for f in _failures(sessions)] == [
        "tmk-bad-confirmation",
        "tmk-out-of-order",
    ]


def test_kcv_mismatch_on_the_terminal_is_reported_and_the_tmk_destroyed(
    service: TmkService,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    run = steps(service, terminal, clock)
    run.start()
    delivery = run.proof()
    tampered = replace(delivery, kcv=bytes(5))
    with pytest.raises(errors.TmkKcvMismatch):
        run.session.receive_delivery(tampered)
    assert not terminal.scm.has_tmk
    service.abort_download(run.session_id, "tmk-kcv-mismatch", actor="gw")
    assert_no_tmk_left(sessions, keystore, "POS-1")
    failure = _failures(sessions)[-1]
    assert failure["code"] == TmkTerminalAborted.code
    assert failure["reported_code"] == "tmk-kcv-mismatch"


def test_a_proof_replayed_into_another_session_fails_and_leaves_both_sessions_alone(
    service: TmkService,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    clock: Clock,
) -> None:
    first, second = make_terminal("POS-A"), make_terminal("POS-B")
    run_a, run_b = steps(service, first, clock), steps(service, second, clock)
    run_a.start()
    run_b.start()
    proof_a = run_a.session.receive_challenge(run_a.challenge)  # type: ignore[arg-type]
    with pytest.raises(errors.TmkReplay):
        service.accept_proof(run_b.session_id, proof_a.to_json(), actor="gw")
    assert _failures(sessions)[-1]["code"] == "tmk-replay"
    # B's session lives in B's ticket, which the replay does not carry: B goes on, and so
    # does the message in its own session
    service.accept_proof(run_a.session_id, proof_a.to_json(), actor="gw")
    run_b.proof()
    run_b.confirm()


def test_a_proof_replayed_into_its_own_session_aborts_it_and_destroys_the_tmk(
    service: TmkService,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    run = steps(service, terminal, clock)
    run.start()
    proof = run.session.receive_challenge(run.challenge)  # type: ignore[arg-type]
    service.accept_proof(run.session_id, proof.to_json(), actor="gw")
    with pytest.raises(errors.TmkOutOfOrder):
        service.accept_proof(run.session_id, proof.to_json(), actor="gw")
    assert_no_tmk_left(sessions, keystore, "POS-1")


def test_a_confirmation_replayed_into_another_session_fails(
    service: TmkService,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    run_a = steps(service, make_terminal("POS-A"), clock)
    run_b = steps(service, make_terminal("POS-B"), clock)
    for run in (run_a, run_b):
        run.start()
        run.proof()
    confirmation_a = run_a.session.receive_delivery(run_a.delivery)  # type: ignore[arg-type]
    with pytest.raises(errors.TmkReplay):
        service.confirm(run_b.session_id, confirmation_a.to_json(), actor="gw")
    assert_no_tmk_left(sessions, keystore, "POS-B")
    service.confirm(run_a.session_id, confirmation_a.to_json(), actor="gw")
    assert _tmks(sessions, "POS-A")[0].status == "active"


def test_replaying_a_finished_session_changes_nothing(
    service: TmkService,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    clock: Clock,
) -> None:
    run = steps(service, terminal, clock)
    run.start()
    run.proof()
    run.confirm()
    assert run.confirmation is not None
    with pytest.raises(errors.TmkOutOfOrder):
        service.confirm(run.session_id, run.confirmation.to_json(), actor="gw")
    assert _tmks(sessions, "POS-1")[0].status == "active"  # an active TMK is not aborted


def test_a_terminal_signing_with_another_sns_key_is_refused(
    service: TmkService,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    clock: Clock,
) -> None:
    make_terminal("POS-VICTIM")
    impostor = make_terminal("POS-VICTIM", register=False)  # same SN, its own key
    run = steps(service, impostor, clock)
    run.start()
    with pytest.raises(errors.TmkBadTerminalProof):
        run.proof()
    assert _session_row(sessions, run.session_id).stage == "aborted"
    assert _tmks(sessions, "POS-VICTIM") == []


def test_unknown_session_and_malformed_messages_are_refused_and_audited(
    service: TmkService, sessions: sessionmaker[Session]
) -> None:
    proof = TerminalProof(session_id="0" * 32, signature=b"x", ticket=b"\x01" + bytes(99))
    with pytest.raises(errors.TmkInvalidTicket):  # a session this server never sealed
        service.accept_proof("0" * 32, proof.to_json(), actor="gw")
    confirmation = Confirmation(session_id="0" * 32, mac=bytes(16))
    with pytest.raises(TmkSessionNotFound):
        service.confirm("../../etc", confirmation.to_json(), actor="gw")
    with pytest.raises(errors.TmkMalformedMessage):
        service.start_download(b'{"type":"tmk-download-request"}', actor="gw")
    with pytest.raises(errors.TmkMalformedMessage):
        service.accept_proof("0" * 32, b"{}", actor="gw")
    assert [f["code"] for f in _failures(sessions)] == [
        "tmk-invalid-ticket",
        "tmk-session-not-found",
        "tmk-malformed-message",
        "tmk-malformed-message",
    ]


def test_a_new_download_supersedes_an_open_one_and_destroys_its_tmk(
    service: TmkService,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    stale = steps(service, terminal, clock)
    stale.start()
    stale.proof()
    (pending,) = _tmks(sessions, "POS-1")
    # a mere download request for the SN (anyone with a gateway token can send one) changes
    # nothing: only a new download that proves the terminal's key supersedes the open one
    steps(service, terminal, clock).start()
    assert _session_row(sessions, stale.session_id).stage == "delivered"
    download(service, terminal, clock)
    assert _session_row(sessions, stale.session_id).error_code == "tmk-superseded"
    assert_destroyed(keystore, pending.key_handle)
    assert [t.status for t in _tmks(sessions, "POS-1")] == ["aborted", "active"]


def test_sweep_aborts_expired_sessions_and_destroys_their_tmks(
    service: TmkService,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    delivered = steps(service, make_terminal("POS-A"), clock)
    delivered.start()
    delivered.proof()
    challenged = steps(service, make_terminal("POS-B"), clock)
    late_proof = challenged.session.receive_challenge(challenged.start())
    assert service.sweep().sessions_aborted == 0
    clock.advance(120)
    report = service.sweep()  # a challenged session is only in its ticket: nothing to sweep
    assert report.sessions_aborted == 1 and report.keys_destroyed == 1
    assert_no_tmk_left(sessions, keystore, "POS-A")
    with pytest.raises(errors.TmkSessionExpired):  # and its ticket expired with it
        service.accept_proof(challenged.session_id, late_proof.to_json(), actor="gw")
    assert _session_row(sessions, challenged.session_id).error_code == "tmk-session-expired"


# =====================================================================================
# Rotation
# =====================================================================================


def test_a_second_download_needs_rotate_tmk_and_retires_the_old_tmk_and_its_keys(
    service: TmkService,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    first = download(service, terminal, clock)
    issued = service.issue_working_key("POS-1", "P0", actor="tms")
    terminal.install_working_key(issued.key_block, "P0")
    with pytest.raises(TmkDownloadNotAllowed):
        download(service, terminal, clock)
    assert service.overview("POS-1").active_tmk is not None  # the refusal changed nothing

    service.request_rotation("POS-1", actor="ops", algorithm=KeyAlgorithm.AES_256)
    assert service.overview("POS-1").rotation_requested
    second = download(service, terminal, clock)
    assert second.retired_tmk_kcv == first.kcv and second.algorithm is KeyAlgorithm.AES_256
    old, new = _tmks(sessions, "POS-1")
    assert (old.status, new.status) == ("retired", "active")
    assert_destroyed(keystore, old.key_handle)
    with sessions() as session:
        (key,) = session.scalars(select(WorkingKey)).all()
    assert key.status == "retired" and key.destroyed_at is not None
    assert_destroyed(keystore, key.key_handle)
    view = service.overview("POS-1")
    assert not view.rotation_requested and view.working_keys == [] and view.tmk_history == 2
    with pytest.raises(TmkDownloadNotAllowed):  # one rotation, one download
        download(service, terminal, clock)


def test_revoking_a_terminal_destroys_its_tmk_and_working_keys(
    service: TmkService,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    download(service, terminal, clock)
    service.issue_working_key("POS-1", "D0", actor="tms")
    service.change_terminal_status("POS-1", "revoke", actor="ops")
    assert_no_tmk_left(sessions, keystore, "POS-1")
    with sessions() as session:
        (key,) = session.scalars(select(WorkingKey)).all()
    assert_destroyed(keystore, key.key_handle)
    with pytest.raises(TmkTerminalRevoked):
        service.issue_working_key("POS-1", "P0", actor="tms")
    with pytest.raises(registry.TerminalStateConflict):
        service.change_terminal_status("POS-1", "reactivate", actor="ops")


# =====================================================================================
# Working keys and PIN blocks
# =====================================================================================


@pytest.mark.parametrize(
    ("usage", "algorithm", "mode"),
    [("P0", "A", "E"), ("D0", "A", "B"), ("M3", "T", "C"), ("M1", "T", "C")],
)
def test_working_keys_are_tr31_blocks_under_the_tmk_with_enforced_headers(
    service: TmkService,
    terminal: PosTerminal,
    clock: Clock,
    usage: str,
    algorithm: str,
    mode: str,
) -> None:
    activation = download(service, terminal, clock)
    issued = service.issue_working_key("POS-1", usage, actor="tms")
    received = terminal.install_working_key(issued.key_block, usage)
    assert issued.key_block[0] == "D" and issued.key_block[5:9] == f"{usage}{algorithm}{mode}"
    assert issued.key_block[11] == "N"  # not exportable
    assert received.kcv == issued.kcv and received.mode_of_use == mode
    assert issued.tmk_kcv == activation.kcv
    assert [k.usage for k in service.overview("POS-1").working_keys] == [usage]


def test_reissuing_a_working_key_retires_and_destroys_the_previous_one(
    service: TmkService,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    download(service, terminal, clock)
    first = service.issue_working_key("POS-1", "P0", actor="tms")
    second = service.issue_working_key("POS-1", "P0", actor="tms")
    assert (first.key_version, second.key_version) == ("01", "02")
    with sessions() as session:
        old, new = session.scalars(select(WorkingKey).order_by(WorkingKey.id)).all()
    assert (old.status, new.status) == ("retired", "active")
    assert_destroyed(keystore, old.key_handle)
    assert service.overview("POS-1").working_keys[0].kcv == second.kcv.hex().upper()


def test_working_keys_need_an_active_tmk(service: TmkService, terminal: PosTerminal) -> None:
    with pytest.raises(TmkNoActiveTmk):
        service.issue_working_key("POS-1", "P0", actor="tms")
    with pytest.raises(registry.TerminalNotFound):
        service.issue_working_key("NOPE", "P0", actor="tms")


@pytest.mark.parametrize(
    "tmk_algorithm",
    [KeyAlgorithm.AES_128, KeyAlgorithm.TDES],
)
def test_pin_block_from_the_terminal_deciphers_on_the_server(
    service: TmkService,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    clock: Clock,
    tmk_algorithm: KeyAlgorithm,
) -> None:
    if tmk_algorithm is KeyAlgorithm.TDES:
        service.request_rotation("POS-1", actor="ops", algorithm=tmk_algorithm)
    download(service, terminal, clock)
    with pytest.raises(TmkNoWorkingKey):
        service.verify_pin_block("POS-1", bytes(16), pan=PAN, pin="1234", actor="tms")
    issued = service.issue_working_key("POS-1", "P0", actor="tms")
    assert issued.key_block[0] == ("B" if tmk_algorithm is KeyAlgorithm.TDES else "D")
    terminal.install_working_key(issued.key_block, "P0")
    block = terminal.encrypt_pin("1234", PAN)
    assert len(block) == (8 if tmk_algorithm is KeyAlgorithm.TDES else 16)
    assert service.verify_pin_block("POS-1", block, pan=PAN, pin="1234", actor="tms")
    assert not service.verify_pin_block("POS-1", block, pan=PAN, pin="1235", actor="tms")
    assert not service.verify_pin_block(
        "POS-1", block, pan="5500000000000004", pin="1234", actor="tms"
    )
    checks = [r for r in _audit(sessions) if r.action == "tmk.pin_block_checked"]
    assert [r.outcome for r in checks] == ["success", "failure", "failure"]
    assert all("1234" not in r.details for r in checks)


# =====================================================================================
# The key server's identity
# =====================================================================================


def test_rotating_the_work_certificate_needs_no_change_on_terminals(
    service: TmkService,
    make_terminal: Callable[..., PosTerminal],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    old = service.identity.require_current()
    new = service.identity.rotate(actor="admin")
    assert new.serial_hex != old.serial_hex and new.work_key_handle != old.work_key_handle
    assert_destroyed(keystore, old.work_key_handle)
    challenge = steps(service, make_terminal("POS-R"), clock).start()
    assert challenge.kswcrt_der == new.kswcrt_der
    download(service, make_terminal("POS-S"), clock)  # same preloaded KSRCRT
    statuses = [i.status for i in service.identity.history()]
    assert statuses == ["retired", "active"]


def test_a_revoked_work_certificate_is_refused_by_terminals_given_the_crl(
    service: TmkService, make_terminal: Callable[..., PosTerminal], clock: Clock
) -> None:
    terminal = make_terminal()
    rnd1 = bytes(range(32))
    fixed = TerminalSession(terminal.scm, ServerTrust(terminal.roots), random=lambda n: rnd1)
    old_challenge = service.start_download(fixed.start().to_json(), actor="gw")

    revoked, new = service.identity.revoke(actor="admin")
    assert revoked.status == "revoked" and new.status == "active"
    crl = x509.load_der_x509_crl(service.identity.crl())
    assert crl.get_revoked_certificate_by_serial_number(int(revoked.serial_hex, 16))

    # the challenge signed under the now revoked certificate: refused with the CRL...
    with_crl = ServerTrust(terminal.roots, (crl,))
    session = TerminalSession(terminal.scm, with_crl, random=lambda n: rnd1)
    session.start()
    with pytest.raises(errors.TmkRevokedServerCertificate):
        session.receive_challenge(old_challenge)
    # ...and accepted by a terminal that was given no CRL (what the CRL is for)
    blind = TerminalSession(terminal.scm, ServerTrust(terminal.roots), random=lambda n: rnd1)
    blind.start()
    blind.receive_challenge(old_challenge)
    # the server now signs with the new certificate, which the CRL does not list
    fresh = steps(service, terminal, clock, crls=(crl,))
    assert fresh.start().kswcrt_der == new.kswcrt_der
    fresh.proof()
    fresh.confirm()


def test_a_server_whose_work_certificate_is_not_under_the_terminals_root_is_refused(
    service: TmkService,
    terminal: PosTerminal,
    db: Database,
    keystore: KeyStore,
    clock: Clock,
) -> None:
    other_root = PkiService(db, keystore).create_root_ca("another-root").certificate
    session = TerminalSession(terminal.scm, ServerTrust((other_root,)), clock=clock)
    challenge = service.start_download(session.start().to_json(), actor="gw")
    with pytest.raises(errors.TmkUntrustedServerCertificate):
        session.receive_challenge(challenge)
    assert not terminal.scm.has_tmk


def test_many_concurrent_downloads_all_complete(
    service: TmkService,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    clock: Clock,
) -> None:
    """More threads than the connection pool holds: no step may wait for a second
    connection while it holds the database's write lock (SQLite would deadlock)."""
    terminals = [make_terminal(f"POS-C{i}") for i in range(24)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        activations = list(pool.map(lambda t: download(service, t, clock), terminals))
    assert [a.kcv for a in activations] == [t.scm.tmk_kcv for t in terminals]
    assert _failures(sessions) == []


# =====================================================================================
# Session tickets (the challenged session travels with the terminal)
# =====================================================================================


def test_a_ticket_the_terminal_aborted_cannot_be_answered_after(
    service: TmkService, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run = steps(service, terminal, clock)
    challenge = run.start()
    proof = run.session.receive_challenge(challenge)
    with pytest.raises(TmkSessionNotFound):  # before its proof, a session is its ticket
        service.abort_download(run.session_id, "tmk-kcv-mismatch", actor="gw")
    service.abort_download(run.session_id, "tmk-kcv-mismatch", actor="gw", ticket=challenge.ticket)
    row = _session_row(sessions, run.session_id)
    assert (row.stage, row.error_code) == ("aborted", "tmk-terminal-aborted")
    with pytest.raises(errors.TmkOutOfOrder):
        service.accept_proof(run.session_id, proof.to_json(), actor="gw")
    other = steps(service, terminal, clock)
    forged = bytearray(other.start().ticket)
    forged[-1] ^= 1
    with pytest.raises(errors.TmkInvalidTicket):
        service.abort_download(other.session_id, "x", actor="gw", ticket=bytes(forged))


def test_a_refused_proof_uses_up_its_ticket(
    service: TmkService, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run = steps(service, terminal, clock)
    genuine = run.session.receive_challenge(run.start())
    forged = replace(genuine, signature=bytes(64))
    with pytest.raises(errors.TmkBadTerminalProof):
        service.accept_proof(run.session_id, forged.to_json(), actor="gw")
    assert _session_row(sessions, run.session_id).error_code == "tmk-bad-terminal-proof"
    with pytest.raises(errors.TmkOutOfOrder):  # the ticket is spent, even for the real proof
        service.accept_proof(run.session_id, genuine.to_json(), actor="gw")


def test_tickets_survive_a_work_certificate_rotation_but_not_a_revocation(
    service: TmkService,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    clock: Clock,
) -> None:
    rotated = steps(service, make_terminal("POS-A"), clock)
    rotated.start()
    service.identity.rotate(actor="ops")
    rotated.proof()  # in flight across a rotation: the retired identity's ticket key stays
    rotated.confirm()
    revoked = steps(service, make_terminal("POS-B"), clock)
    revoked.start()
    service.identity.revoke(actor="ops")
    with pytest.raises(errors.TmkInvalidTicket):
        revoked.proof()


def test_an_identity_from_before_tickets_gets_a_ticket_key_at_the_next_download(
    service: TmkService, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    identity = service.identity.ensure(actor="ops")
    with sessions() as session, session.begin():  # as migration tmk_0003 leaves it
        row = session.get(ServerIdentity, identity.id)
        assert row is not None
        row.ticket_key_handle = None
    assert download(service, terminal, clock).kcv == terminal.scm.tmk_kcv
    current = service.identity.require_current()
    assert current.id == identity.id and current.ticket_key_handle is not None
