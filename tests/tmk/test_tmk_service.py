"""The TMK tmk over a real database and soft key store (SQLite, and PostgreSQL when
configured): downloads step by step, every refusal with its code, audit record and no TMK
left half-issued; rotation, working keys, PIN blocks, the key server's identity."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import KeyNotFound
from trustfleet.keystore.base import KeyStore
from trustfleet.pki.service import PkiService
from trustfleet.store.audit import iter_records, verify_chain
from trustfleet.tmk import errors, lifecycle
from trustfleet.tmk.errors import (
    TmkDownloadNotAllowed,
    TmkNoActiveTmk,
    TmkNoWorkingKey,
    TmkSessionNotFound,
    TmkTerminalAborted,
    TmkTerminalRevoked,
    TmkTerminalSuspended,
    TmkUnknownTerminal,
)
from trustfleet.tmk.models import DownloadSession, ServerIdentity, WorkingKey
from trustfleet.tmk.protocol import (
    Confirmation,
    ServerTrust,
    TerminalProof,
    TerminalSession,
)
from trustfleet.tmk.terminal import PosTerminal

from .conftest import (
    PAN,
    VERSIONS,
    Clock,
    Tmk,
    assert_destroyed,
    assert_no_tmk_left,
    audit_records,
    download,
    failures,
    session_row,
    steps,
    tmks_of,
)

# =====================================================================================
# The download
# =====================================================================================


@pytest.mark.parametrize(
    "algorithm",
    [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072, KeyAlgorithm.SM2],
    ids=["p256", "rsa", "rsa-3072", "gm"],
)
def test_download_activates_the_tmk_the_terminal_holds(
    tmk: Tmk,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
    algorithm: KeyAlgorithm,
) -> None:
    terminal = make_terminal("POS-A", algorithm)
    run = steps(tmk, terminal, clock)
    run.start()
    with sessions() as session:  # a challenge writes nothing: its session is in the ticket
        assert session.get(DownloadSession, run.session_id) is None
    run.proof()
    assert session_row(sessions, run.session_id).stage == "delivered"
    (pending,) = tmks_of(sessions, "POS-A")
    assert pending.status == "pending" and pending.active_sn is None  # not active yet
    activation = run.confirm()

    assert activation.kcv == terminal.scm.tmk_kcv
    (active,) = tmks_of(sessions, "POS-A")
    assert (active.status, active.active_sn, active.kcv_hex) == (
        "active",
        "POS-A",
        activation.kcv.hex().upper(),
    )
    assert keystore.kcv(active.key_handle)[:5] == terminal.scm.tmk_kcv
    assert session_row(sessions, run.session_id).stage == "active"
    actions = [r.action for r in audit_records(sessions) if r.subject == "POS-A"]
    assert actions[-1] == "tmk.tmk_activated" and "tmk.download_started" not in actions
    with sessions() as session:
        assert verify_chain(iter_records(session)).ok


def test_tdes_profile_downloads_a_tdes_tmk(tmk: Tmk, terminal: PosTerminal, clock: Clock) -> None:
    tmk.terminals.request_rotation("POS-1", actor="ops", algorithm=KeyAlgorithm.TDES)
    activation = download(tmk, terminal, clock)
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
    tmk: Tmk,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    clock: Clock,
    status_change: str | None,
    error: type[errors.TmkError],
) -> None:
    terminal = make_terminal("POS-X", register=status_change is not None)
    if status_change:
        tmk.terminals.change_status("POS-X", status_change, actor="ops")
    with pytest.raises(error):
        steps(tmk, terminal, clock).start()
    assert failures(sessions)[-1]["code"] == error.code
    assert failures(sessions)[-1]["subject"] == "POS-X"
    with sessions() as session:
        assert session.scalars(select(DownloadSession)).all() == []


def test_suspending_mid_download_refuses_the_next_step_and_destroys_the_tmk(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    run = steps(tmk, terminal, clock)
    run.start()
    run.proof()
    tmk.terminals.change_status("POS-1", "suspend", actor="ops")
    with pytest.raises(TmkTerminalSuspended):
        run.confirm()
    assert_no_tmk_left(sessions, keystore, "POS-1")
    tmk.terminals.change_status("POS-1", "reactivate", actor="ops")
    download(tmk, terminal, clock)  # a fresh download works again


def test_expired_session_is_refused_and_aborted(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run = steps(tmk, terminal, clock)
    run.start()
    proof = run.session.receive_challenge(run.challenge)  # type: ignore[arg-type]
    clock.advance(61)
    with pytest.raises(errors.TmkSessionExpired):
        tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    row = session_row(sessions, run.session_id)
    assert (row.stage, row.error_code) == ("aborted", "tmk-session-expired")
    clock.advance(-61)  # even back in time, an aborted session stays dead: the same proof
    with pytest.raises(errors.TmkSessionExpired):  # gets the same refusal again
        tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    assert session_row(sessions, run.session_id).stage == "aborted"
    assert tmks_of(sessions, "POS-1") == []


def test_confirmation_after_expiry_destroys_the_delivered_tmk(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    run = steps(tmk, terminal, clock)
    run.start()
    run.proof()
    confirmation = run.session.receive_delivery(run.delivery)  # type: ignore[arg-type]
    clock.advance(60)
    with pytest.raises(errors.TmkSessionExpired):
        tmk.downloads.confirm(run.session_id, confirmation.to_json(), actor="gw")
    assert_no_tmk_left(sessions, keystore, "POS-1")


def test_bad_confirmation_mac_leaves_no_tmk_active_and_destroys_it(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    run = steps(tmk, terminal, clock)
    run.start()
    run.proof()
    good = run.session.receive_delivery(run.delivery)  # type: ignore[arg-type]
    forged = replace(good, mac=bytes(16))
    with pytest.raises(errors.TmkBadConfirmation):
        tmk.downloads.confirm(run.session_id, forged.to_json(), actor="gw")
    assert_no_tmk_left(sessions, keystore, "POS-1")
    with pytest.raises(errors.TmkOutOfOrder):  # the genuine one comes too late: single use
        tmk.downloads.confirm(run.session_id, good.to_json(), actor="gw")
    assert [f["code"] for f in failures(sessions)] == [
        "tmk-bad-confirmation",
        "tmk-out-of-order",
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_tampered_kcv_on_the_terminal_is_reported_and_the_tmk_destroyed(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
    version: int,
) -> None:
    """Version 1 finds it opening the delivery; version 2 at the work key's signature."""
    run = steps(tmk, terminal, clock, version=version)
    run.start()
    delivery = run.proof()
    tampered = replace(delivery, kcv=bytes(5))
    refusal = errors.TmkKcvMismatch if version == 1 else errors.TmkBadDeliverySignature
    with pytest.raises(refusal):
        run.session.receive_delivery(tampered)
    assert not terminal.scm.has_tmk
    tmk.downloads.abort(run.session_id, refusal.code, actor="gw")
    assert_no_tmk_left(sessions, keystore, "POS-1")
    failure = failures(sessions)[-1]
    assert failure["code"] == TmkTerminalAborted.code
    assert failure["reported_code"] == refusal.code


def test_a_proof_replayed_into_another_session_fails_and_leaves_both_sessions_alone(
    tmk: Tmk,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    clock: Clock,
) -> None:
    first, second = make_terminal("POS-A"), make_terminal("POS-B")
    run_a, run_b = steps(tmk, first, clock), steps(tmk, second, clock)
    run_a.start()
    run_b.start()
    proof_a = run_a.session.receive_challenge(run_a.challenge)  # type: ignore[arg-type]
    with pytest.raises(errors.TmkReplay):
        tmk.downloads.accept_proof(run_b.session_id, proof_a.to_json(), actor="gw")
    assert failures(sessions)[-1]["code"] == "tmk-replay"
    # B's session lives in B's ticket, which the replay does not carry: B goes on, and so
    # does the message in its own session
    tmk.downloads.accept_proof(run_a.session_id, proof_a.to_json(), actor="gw")
    run_b.proof()
    run_b.confirm()


def test_a_confirmation_replayed_into_another_session_fails(
    tmk: Tmk,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    run_a = steps(tmk, make_terminal("POS-A"), clock)
    run_b = steps(tmk, make_terminal("POS-B"), clock)
    for run in (run_a, run_b):
        run.start()
        run.proof()
    confirmation_a = run_a.session.receive_delivery(run_a.delivery)  # type: ignore[arg-type]
    with pytest.raises(errors.TmkReplay):
        tmk.downloads.confirm(run_b.session_id, confirmation_a.to_json(), actor="gw")
    assert_no_tmk_left(sessions, keystore, "POS-B")
    tmk.downloads.confirm(run_a.session_id, confirmation_a.to_json(), actor="gw")
    assert tmks_of(sessions, "POS-A")[0].status == "active"


def test_a_terminal_cannot_abort_a_session_that_has_ended(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    clock: Clock,
) -> None:
    """Anyone with the gateway token could otherwise fill the audit log with false
    failures of completed downloads: an abort of an ended session is refused, and writes
    nothing."""
    run = steps(tmk, terminal, clock)
    run.start()
    run.proof()
    run.confirm()
    records = len(audit_records(sessions))
    for _ in range(2):
        with pytest.raises(errors.TmkOutOfOrder):
            tmk.downloads.abort(run.session_id, "tmk-kcv-mismatch", actor="gw")
    assert len(audit_records(sessions)) == records
    assert tmks_of(sessions, "POS-1")[0].status == "active"
    assert session_row(sessions, run.session_id).stage == "active"


def test_an_aborted_session_is_aborted_once(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run = steps(tmk, terminal, clock)
    run.start()
    run.proof()
    tmk.downloads.abort(run.session_id, "tmk-kcv-mismatch", actor="gw")
    records = len(audit_records(sessions))
    with pytest.raises(errors.TmkOutOfOrder):
        tmk.downloads.abort(run.session_id, "tmk-kcv-mismatch", actor="gw")
    assert len(audit_records(sessions)) == records
    assert session_row(sessions, run.session_id).error_code == "tmk-terminal-aborted"


def test_a_terminal_signing_with_another_sns_key_is_refused(
    tmk: Tmk,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    clock: Clock,
) -> None:
    make_terminal("POS-VICTIM")
    impostor = make_terminal("POS-VICTIM", register=False)  # same SN, its own key
    run = steps(tmk, impostor, clock)
    run.start()
    with pytest.raises(errors.TmkBadTerminalProof):
        run.proof()
    assert session_row(sessions, run.session_id).stage == "aborted"
    assert tmks_of(sessions, "POS-VICTIM") == []


def test_unknown_session_and_malformed_messages_are_refused_and_audited(
    tmk: Tmk, sessions: sessionmaker[Session]
) -> None:
    proof = TerminalProof(session_id="0" * 32, signature=b"x", ticket=b"\x01" + bytes(99))
    with pytest.raises(errors.TmkInvalidTicket):  # a session this server never sealed
        tmk.downloads.accept_proof("0" * 32, proof.to_json(), actor="gw")
    confirmation = Confirmation(session_id="0" * 32, mac=bytes(16))
    with pytest.raises(TmkSessionNotFound):
        tmk.downloads.confirm("../../etc", confirmation.to_json(), actor="gw")
    with pytest.raises(errors.TmkMalformedMessage):
        tmk.downloads.start(b'{"type":"tmk-download-request"}', actor="gw")
    with pytest.raises(errors.TmkMalformedMessage):
        tmk.downloads.accept_proof("0" * 32, b"{}", actor="gw")
    assert [f["code"] for f in failures(sessions)] == [
        "tmk-invalid-ticket",
        "tmk-session-not-found",
        "tmk-malformed-message",
        "tmk-malformed-message",
    ]


def test_a_new_download_supersedes_an_open_one_and_destroys_its_tmk(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    stale = steps(tmk, terminal, clock)
    stale.start()
    stale.proof()
    (pending,) = tmks_of(sessions, "POS-1")
    # a mere download request for the SN (anyone with a gateway token can send one) changes
    # nothing: only a new download that proves the terminal's key supersedes the open one
    steps(tmk, terminal, clock).start()
    assert session_row(sessions, stale.session_id).stage == "delivered"
    download(tmk, terminal, clock)
    assert session_row(sessions, stale.session_id).error_code == "tmk-superseded"
    assert_destroyed(keystore, pending.key_handle)
    assert [t.status for t in tmks_of(sessions, "POS-1")] == ["aborted", "active"]


def test_sweep_aborts_expired_sessions_and_destroys_theirtmks_of(
    tmk: Tmk,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    delivered = steps(tmk, make_terminal("POS-A"), clock)
    delivered.start()
    delivered.proof()
    challenged = steps(tmk, make_terminal("POS-B"), clock)
    late_proof = challenged.session.receive_challenge(challenged.start())
    assert tmk.downloads.sweep().sessions_aborted == 0
    clock.advance(120)
    report = tmk.downloads.sweep()  # a challenged session is only in its ticket: nothing to sweep
    assert report.sessions_aborted == 1 and report.keys_destroyed == 1
    assert_no_tmk_left(sessions, keystore, "POS-A")
    with pytest.raises(errors.TmkSessionExpired):  # and its ticket expired with it
        tmk.downloads.accept_proof(challenged.session_id, late_proof.to_json(), actor="gw")
    assert session_row(sessions, challenged.session_id).error_code == "tmk-session-expired"


# =====================================================================================
# Rotation
# =====================================================================================


def test_a_second_download_needs_rotate_tmk_and_retires_the_old_tmk_and_its_keys(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    first = download(tmk, terminal, clock)
    issued = tmk.working_keys.issue("POS-1", "P0", actor="tms")
    terminal.install_working_key(issued.key_block, "P0")
    with pytest.raises(TmkDownloadNotAllowed):
        download(tmk, terminal, clock)
    assert tmk.terminals.overview("POS-1").active_tmk is not None  # the refusal changed nothing

    tmk.terminals.request_rotation("POS-1", actor="ops", algorithm=KeyAlgorithm.AES_256)
    assert tmk.terminals.overview("POS-1").rotation_requested
    second = download(tmk, terminal, clock)
    assert second.retired_tmk_kcv == first.kcv and second.algorithm is KeyAlgorithm.AES_256
    old, new = tmks_of(sessions, "POS-1")
    assert (old.status, new.status) == ("retired", "active")
    assert_destroyed(keystore, old.key_handle)
    with sessions() as session:
        (key,) = session.scalars(select(WorkingKey)).all()
    assert key.status == "retired" and key.destroyed_at is not None
    assert_destroyed(keystore, key.key_handle)
    view = tmk.terminals.overview("POS-1")
    assert not view.rotation_requested and view.working_keys == [] and view.tmk_history == 2
    with pytest.raises(TmkDownloadNotAllowed):  # one rotation, one download
        download(tmk, terminal, clock)


def test_revoking_a_terminal_destroys_its_tmk_and_working_keys(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    download(tmk, terminal, clock)
    tmk.working_keys.issue("POS-1", "D0", actor="tms")
    tmk.terminals.change_status("POS-1", "revoke", actor="ops")
    assert_no_tmk_left(sessions, keystore, "POS-1")
    with sessions() as session:
        (key,) = session.scalars(select(WorkingKey)).all()
    assert_destroyed(keystore, key.key_handle)
    with pytest.raises(TmkTerminalRevoked):
        tmk.working_keys.issue("POS-1", "P0", actor="tms")
    with pytest.raises(errors.TmkTerminalStateConflict):
        tmk.terminals.change_status("POS-1", "reactivate", actor="ops")


class Crash(Exception):
    """The process dies here (injected)."""


def test_a_crash_while_revoking_leaves_the_terminal_and_its_tmk_as_they_were(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The status and the TMK's retirement are one unit of work: a crash between the two
    must not leave a revoked terminal whose TMK stays active (sweep would never destroy it,
    and a second revoke would be refused as a state conflict)."""
    download(tmk, terminal, clock)

    def crash(*_args: object, **_kwargs: object) -> None:
        raise Crash()

    with monkeypatch.context() as patch:
        patch.setattr(lifecycle, "retire_active_tmk", crash)
        with pytest.raises(Crash):
            tmk.terminals.change_status("POS-1", "revoke", actor="ops")
    view = tmk.terminals.overview("POS-1")
    assert view.status == "active" and view.active_tmk is not None
    assert "tmk.terminal_revoked" not in [r.action for r in audit_records(sessions)]

    tmk.terminals.change_status("POS-1", "revoke", actor="ops")  # the operator tries again
    assert tmk.terminals.overview("POS-1").status == "revoked"
    assert_no_tmk_left(sessions, keystore, "POS-1")


# =====================================================================================
# Working keys and PIN blocks
# =====================================================================================


@pytest.mark.parametrize(
    ("usage", "algorithm", "mode"),
    [("P0", "A", "E"), ("D0", "A", "B"), ("M3", "T", "C"), ("M1", "T", "C")],
)
def test_working_keys_are_tr31_blocks_under_the_tmk_with_enforced_headers(
    tmk: Tmk,
    terminal: PosTerminal,
    clock: Clock,
    usage: str,
    algorithm: str,
    mode: str,
) -> None:
    activation = download(tmk, terminal, clock)
    issued = tmk.working_keys.issue("POS-1", usage, actor="tms")
    received = terminal.install_working_key(issued.key_block, usage)
    assert issued.key_block[0] == "D" and issued.key_block[5:9] == f"{usage}{algorithm}{mode}"
    assert issued.key_block[11] == "N"  # not exportable
    assert received.kcv == issued.kcv and received.mode_of_use == mode
    assert issued.tmk_kcv == activation.kcv
    assert [k.usage for k in tmk.terminals.overview("POS-1").working_keys] == [usage]


def test_reissuing_a_working_key_retires_and_destroys_the_previous_one(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    download(tmk, terminal, clock)
    first = tmk.working_keys.issue("POS-1", "P0", actor="tms")
    second = tmk.working_keys.issue("POS-1", "P0", actor="tms")
    assert (first.key_version, second.key_version) == ("01", "02")
    with sessions() as session:
        old, new = session.scalars(select(WorkingKey).order_by(WorkingKey.id)).all()
    assert (old.status, new.status) == ("retired", "active")
    assert_destroyed(keystore, old.key_handle)
    assert tmk.terminals.overview("POS-1").working_keys[0].kcv == second.kcv.hex().upper()


def test_working_keys_need_an_active_tmk(tmk: Tmk, terminal: PosTerminal) -> None:
    with pytest.raises(TmkNoActiveTmk):
        tmk.working_keys.issue("POS-1", "P0", actor="tms")
    with pytest.raises(TmkUnknownTerminal):
        tmk.working_keys.issue("NOPE", "P0", actor="tms")


@pytest.mark.parametrize(
    "tmk_algorithm",
    [KeyAlgorithm.AES_128, KeyAlgorithm.TDES],
)
def test_pin_block_from_the_terminal_deciphers_on_the_server(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    clock: Clock,
    tmk_algorithm: KeyAlgorithm,
) -> None:
    if tmk_algorithm is KeyAlgorithm.TDES:
        tmk.terminals.request_rotation("POS-1", actor="ops", algorithm=tmk_algorithm)
    download(tmk, terminal, clock)
    with pytest.raises(TmkNoWorkingKey):
        tmk.working_keys.verify_pin_block("POS-1", bytes(16), pan=PAN, pin="1234", actor="tms")
    issued = tmk.working_keys.issue("POS-1", "P0", actor="tms")
    assert issued.key_block[0] == ("B" if tmk_algorithm is KeyAlgorithm.TDES else "D")
    terminal.install_working_key(issued.key_block, "P0")
    block = terminal.encrypt_pin("1234", PAN)
    assert len(block) == (8 if tmk_algorithm is KeyAlgorithm.TDES else 16)
    assert tmk.working_keys.verify_pin_block("POS-1", block, pan=PAN, pin="1234", actor="tms")
    assert not tmk.working_keys.verify_pin_block("POS-1", block, pan=PAN, pin="1235", actor="tms")
    assert not tmk.working_keys.verify_pin_block(
        "POS-1", block, pan="5500000000000004", pin="1234", actor="tms"
    )
    checks = [r for r in audit_records(sessions) if r.action == "tmk.pin_block_checked"]
    assert [r.outcome for r in checks] == ["success", "failure", "failure"]
    assert all("1234" not in r.details for r in checks)


# =====================================================================================
# The key server's identity
# =====================================================================================


def test_rotating_the_work_certificate_needs_no_change_on_terminals(
    tmk: Tmk,
    make_terminal: Callable[..., PosTerminal],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    old = tmk.identity.require_current()
    new = tmk.identity.rotate(actor="admin")
    assert new.serial_hex != old.serial_hex and new.work_key_handle != old.work_key_handle
    assert_destroyed(keystore, old.work_key_handle)
    challenge = steps(tmk, make_terminal("POS-R"), clock).start()
    assert challenge.kswcrt_der == new.kswcrt_der
    download(tmk, make_terminal("POS-S"), clock)  # same preloaded KSRCRT
    statuses = [i.status for i in tmk.identity.history()]
    assert statuses == ["retired", "active"]


def test_a_revoked_work_certificate_is_refused_by_terminals_given_the_crl(
    tmk: Tmk, make_terminal: Callable[..., PosTerminal], clock: Clock
) -> None:
    terminal = make_terminal()
    rnd1 = bytes(range(32))
    fixed = TerminalSession(terminal.scm, ServerTrust(terminal.roots), random=lambda n: rnd1)
    old_challenge = tmk.downloads.start(fixed.start().to_json(), actor="gw")

    revoked, new = tmk.identity.revoke(actor="admin")
    assert revoked.status == "revoked" and new.status == "active"
    crl = x509.load_der_x509_crl(tmk.identity.crl())
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
    fresh = steps(tmk, terminal, clock, crls=(crl,))
    assert fresh.start().kswcrt_der == new.kswcrt_der
    fresh.proof()
    fresh.confirm()


def test_a_server_whose_work_certificate_is_not_under_the_terminals_root_is_refused(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    other_root = PkiService(tmk.db, keystore).create_root_ca("another-root").certificate
    session = TerminalSession(terminal.scm, ServerTrust((other_root,)), clock=clock)
    challenge = tmk.downloads.start(session.start().to_json(), actor="gw")
    with pytest.raises(errors.TmkUntrustedServerCertificate):
        session.receive_challenge(challenge)
    assert not terminal.scm.has_tmk


def test_many_concurrent_downloads_all_complete(
    tmk: Tmk,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    clock: Clock,
) -> None:
    """More threads than the connection pool holds: no step may wait for a second
    connection while it holds the database's write lock (SQLite would deadlock)."""
    terminals = [make_terminal(f"POS-C{i}") for i in range(24)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        activations = list(pool.map(lambda t: download(tmk, t, clock), terminals))
    assert [a.kcv for a in activations] == [t.scm.tmk_kcv for t in terminals]
    assert failures(sessions) == []


# =====================================================================================
# Session tickets (the challenged session travels with the terminal)
# =====================================================================================


def test_a_ticket_the_terminal_aborted_cannot_be_answered_after(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run = steps(tmk, terminal, clock)
    challenge = run.start()
    proof = run.session.receive_challenge(challenge)
    with pytest.raises(TmkSessionNotFound):  # before its proof, a session is its ticket
        tmk.downloads.abort(run.session_id, "tmk-kcv-mismatch", actor="gw")
    tmk.downloads.abort(run.session_id, "tmk-kcv-mismatch", actor="gw", ticket=challenge.ticket)
    row = session_row(sessions, run.session_id)
    assert (row.stage, row.error_code) == ("aborted", "tmk-terminal-aborted")
    with pytest.raises(errors.TmkOutOfOrder):
        tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    other = steps(tmk, terminal, clock)
    forged = bytearray(other.start().ticket)
    forged[-1] ^= 1
    with pytest.raises(errors.TmkInvalidTicket):
        tmk.downloads.abort(other.session_id, "x", actor="gw", ticket=bytes(forged))


def test_a_refused_proof_uses_up_its_ticket(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run = steps(tmk, terminal, clock)
    genuine = run.session.receive_challenge(run.start())
    forged = replace(genuine, signature=bytes(64))
    with pytest.raises(errors.TmkBadTerminalProof):
        tmk.downloads.accept_proof(run.session_id, forged.to_json(), actor="gw")
    assert session_row(sessions, run.session_id).error_code == "tmk-bad-terminal-proof"
    with pytest.raises(errors.TmkOutOfOrder):  # the ticket is spent, even for the real proof
        tmk.downloads.accept_proof(run.session_id, genuine.to_json(), actor="gw")


def test_v1_tickets_survive_a_work_certificate_rotation_but_not_a_revocation(
    tmk: Tmk,
    make_terminal: Callable[..., PosTerminal],
    sessions: sessionmaker[Session],
    clock: Clock,
) -> None:
    rotated = steps(tmk, make_terminal("POS-A"), clock, version=1)
    rotated.start()
    tmk.identity.rotate(actor="ops")
    rotated.proof()  # in flight across a rotation: the retired identity's ticket key stays
    rotated.confirm()
    revoked = steps(tmk, make_terminal("POS-B"), clock, version=1)
    revoked.start()
    tmk.identity.revoke(actor="ops")
    with pytest.raises(errors.TmkInvalidTicket):
        revoked.proof()


@pytest.mark.parametrize("change", ["rotate", "revoke"])
def test_a_v2_download_in_flight_across_a_new_work_certificate_starts_again(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
    change: str,
) -> None:
    """The version 2 delivery is signed by the work key that signed the challenge, the one
    the terminal verified; a rotation destroys it, so the proof is refused, nothing is
    made, and the terminal's new download runs under the new certificate."""
    old = tmk.identity.require_current()
    run = steps(tmk, terminal, clock, version=2)
    run.start()
    getattr(tmk.identity, change)(actor="ops")
    with pytest.raises(errors.TmkInvalidTicket):
        run.proof()
    assert tmks_of(sessions, "POS-1") == []
    with pytest.raises(KeyNotFound):
        keystore.info(old.work_key_handle)
    assert failures(sessions)[-1]["code"] == "tmk-invalid-ticket"
    again = steps(tmk, terminal, clock, version=2)
    again.start()
    again.proof()
    assert again.confirm().kcv == terminal.scm.tmk_kcv


def test_an_identity_from_before_tickets_gets_a_ticket_key_at_the_next_download(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    identity = tmk.identity.ensure(actor="ops")
    with sessions() as session, session.begin():  # as migration tmk_0003 leaves it
        row = session.get(ServerIdentity, identity.id)
        assert row is not None
        row.ticket_key_handle = None
    assert download(tmk, terminal, clock).kcv == terminal.scm.tmk_kcv
    current = tmk.identity.require_current()
    assert current.id == identity.id and current.ticket_key_handle is not None
