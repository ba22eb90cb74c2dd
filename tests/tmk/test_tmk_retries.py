"""Retries (docs/tmk-protocol.md, "Retries"): a gateway that sends a proof or a confirmation
again, after a timeout, gets the first answer again and harms nothing; a *different*
message for a step that was already answered is refused without touching the session.
On SQLite, and on PostgreSQL when configured; two server processes on PostgreSQL are in
test_tmk_multinode.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.keystore.base import KeyStore
from trustfleet.tmk import errors
from trustfleet.tmk.protocol import Confirmation, KeyDelivery, TerminalProof
from trustfleet.tmk.terminal import PosTerminal

from .conftest import (
    Clock,
    Steps,
    Tmk,
    assert_destroyed,
    audit_records,
    download,
    failures,
    session_row,
    steps,
    tmks_of,
)


def _proved(tmk: Tmk, terminal: PosTerminal, clock: Clock) -> tuple[Steps, TerminalProof]:
    run = steps(tmk, terminal, clock)
    challenge = run.start()
    return run, run.session.receive_challenge(challenge)


def _reordered(message: bytes) -> bytes:
    """The same message, not in its canonical form (keys reversed, with whitespace)."""
    fields = json.loads(message)
    return json.dumps(dict(reversed(list(fields.items()))), indent=2).encode()


def _active_kcv(tmk: Tmk, sn: str) -> str | None:
    tmk_view = tmk.terminals.overview(sn).active_tmk
    return tmk_view.kcv if tmk_view else None


# =====================================================================================
# One request, twice
# =====================================================================================


def test_a_repeated_proof_gets_the_same_delivery_and_the_download_completes(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run, proof = _proved(tmk, terminal, clock)
    first = tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    records = len(audit_records(sessions))
    again = tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    reordered = tmk.downloads.accept_proof(run.session_id, _reordered(proof.to_json()), actor="gw")
    assert again.to_json() == first.to_json() == reordered.to_json()
    assert len(audit_records(sessions)) == records  # a repeat writes nothing
    [pending] = tmks_of(sessions, "POS-1")
    assert pending.status == "pending" and pending.destroyed_at is None
    run.delivery = again  # the terminal got the repeat's answer: it is the same
    activation = run.confirm()
    assert activation.kcv == terminal.scm.tmk_kcv
    assert _active_kcv(tmk, "POS-1") == terminal.scm.tmk_kcv.hex().upper()
    assert failures(sessions) == []


def test_a_repeated_confirmation_gets_the_same_activation(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run, proof = _proved(tmk, terminal, clock)
    run.delivery = tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    first = run.confirm()
    assert run.confirmation is not None
    records = len(audit_records(sessions))
    clock.advance(3600)  # however late the copy comes, while the TMK is in force
    again = tmk.downloads.confirm(run.session_id, run.confirmation.to_json(), actor="gw")
    assert (again.session_id, again.sn, again.algorithm, again.kcv, again.activated_at) == (
        first.session_id,
        first.sn,
        first.algorithm,
        first.kcv,
        first.activated_at,
    )
    assert again.repeated and not first.repeated
    assert len(audit_records(sessions)) == records
    assert [r.action for r in audit_records(sessions)].count("tmk.tmk_activated") == 1
    assert _active_kcv(tmk, "POS-1") == terminal.scm.tmk_kcv.hex().upper()


def test_a_proof_repeated_after_the_download_completed_gets_the_same_delivery(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run, proof = _proved(tmk, terminal, clock)
    run.delivery = tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    run.confirm()
    clock.advance(120)
    again = tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    assert again.to_json() == run.delivery.to_json()
    assert session_row(sessions, run.session_id).stage == "active"
    assert failures(sessions) == []


def test_repeats_end_with_the_tmk_they_delivered(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    """Once a later download retired the TMK, the old session's proof and confirmation get
    tmk-out-of-order: the server does not claim a retired TMK is active."""
    run, proof = _proved(tmk, terminal, clock)
    run.delivery = tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    run.confirm()
    assert run.confirmation is not None
    tmk.terminals.request_rotation("POS-1", actor="ops")
    download(tmk, terminal, clock)
    with pytest.raises(errors.TmkOutOfOrder):
        tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    with pytest.raises(errors.TmkOutOfOrder):
        tmk.downloads.confirm(run.session_id, run.confirmation.to_json(), actor="gw")
    assert _active_kcv(tmk, "POS-1") == terminal.scm.tmk_kcv.hex().upper()


@pytest.mark.parametrize(
    ("make_refusal", "code"),
    [
        (lambda proof: replace(proof, signature=bytes(70)), "tmk-bad-terminal-proof"),
        (None, "tmk-session-expired"),
    ],
    ids=["forged", "expired"],
)
def test_a_refused_proof_repeated_gets_the_same_refusal_and_writes_nothing(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    clock: Clock,
    make_refusal: Callable[[TerminalProof], TerminalProof] | None,
    code: str,
) -> None:
    run, proof = _proved(tmk, terminal, clock)
    refused = make_refusal(proof) if make_refusal else proof
    if make_refusal is None:
        clock.advance(61)
    for attempt in range(3):
        with pytest.raises(errors.TmkError) as raised:
            tmk.downloads.accept_proof(run.session_id, refused.to_json(), actor="gw")
        assert raised.value.code == code
        if attempt == 0:
            records = len(audit_records(sessions))
    assert len(audit_records(sessions)) == records
    assert [f["code"] for f in failures(sessions)] == [code]
    assert tmks_of(sessions, "POS-1") == []


def test_a_refused_confirmation_repeated_gets_the_same_refusal(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run, proof = _proved(tmk, terminal, clock)
    delivery = tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    forged = Confirmation(session_id=run.session_id, mac=bytes(16), version=delivery.version)
    for _ in range(2):
        with pytest.raises(errors.TmkBadConfirmation):
            tmk.downloads.confirm(run.session_id, forged.to_json(), actor="gw")
    genuine = run.session.receive_delivery(delivery)
    with pytest.raises(errors.TmkOutOfOrder):  # single use: the genuine one comes too late
        tmk.downloads.confirm(run.session_id, genuine.to_json(), actor="gw")
    assert [f["code"] for f in failures(sessions)] == ["tmk-bad-confirmation", "tmk-out-of-order"]


# =====================================================================================
# Another message for a step that was answered: refused, and the session is left alone
# =====================================================================================


def test_another_proof_for_an_answered_session_cannot_end_it(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    """An attacker who saw the proof on the wire (its ticket, its session id) and holds the
    gateway token cannot abort the download it belongs to."""
    run, proof = _proved(tmk, terminal, clock)
    run.delivery = tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    [pending] = tmks_of(sessions, "POS-1")
    forged_ticket = bytearray(proof.ticket)
    forged_ticket[-1] ^= 1
    attacks: list[tuple[bytes, type[errors.TmkError]]] = [
        (replace(proof, signature=bytes(70)).to_json(), errors.TmkOutOfOrder),
        (replace(proof, ticket=bytes(forged_ticket)).to_json(), errors.TmkInvalidTicket),
        (b'{"type": "tmk-terminal-proof"', errors.TmkMalformedMessage),
    ]
    for body, error in attacks:
        with pytest.raises(error):
            tmk.downloads.accept_proof(run.session_id, body, actor="attacker")
    assert session_row(sessions, run.session_id).stage == "delivered"
    assert keystore.info(pending.key_handle).handle == pending.key_handle
    run.confirm()  # the terminal's download goes on
    assert _active_kcv(tmk, "POS-1") == terminal.scm.tmk_kcv.hex().upper()
    assert [f["code"] for f in failures(sessions)] == [
        "tmk-out-of-order",
        "tmk-invalid-ticket",
        "tmk-malformed-message",
    ]


def test_another_proof_after_completion_is_out_of_order(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    run, proof = _proved(tmk, terminal, clock)
    run.delivery = tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    run.confirm()
    other = replace(proof, signature=proof.signature[:-1] + bytes([proof.signature[-1] ^ 1]))
    with pytest.raises(errors.TmkOutOfOrder):
        tmk.downloads.accept_proof(run.session_id, other.to_json(), actor="gw")
    assert session_row(sessions, run.session_id).stage == "active"
    assert tmks_of(sessions, "POS-1")[0].status == "active"


def test_an_abort_with_the_ticket_after_completion_is_refused(
    tmk: Tmk, terminal: PosTerminal, sessions: sessionmaker[Session], clock: Clock
) -> None:
    """An abort that carries the challenge's ticket cannot end a completed download."""
    run, proof = _proved(tmk, terminal, clock)
    assert run.challenge is not None
    run.delivery = tmk.downloads.accept_proof(run.session_id, proof.to_json(), actor="gw")
    run.confirm()
    with pytest.raises(errors.TmkOutOfOrder):
        tmk.downloads.abort(
            run.session_id, "tmk-kcv-mismatch", actor="gw", ticket=run.challenge.ticket
        )
    assert session_row(sessions, run.session_id).stage == "active"


# =====================================================================================
# Copies at the same time
# =====================================================================================

COPIES = 6


def _at_once(count: int, send: Callable[[int], Any]) -> list[Any]:
    """``send(i)`` from ``count`` threads released together; each result or the error."""
    barrier = threading.Barrier(count)

    def one(index: int) -> Any:
        barrier.wait()
        try:
            return send(index)
        except errors.TmkError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_concurrent_copies_of_a_proof_and_a_confirmation_all_get_the_first_answer(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    run, proof = _proved(tmk, terminal, clock)
    body = proof.to_json()
    deliveries = _at_once(
        COPIES, lambda _: tmk.downloads.accept_proof(run.session_id, body, actor="gw")
    )
    assert all(isinstance(d, KeyDelivery) for d in deliveries), deliveries
    assert len({d.to_json() for d in deliveries}) == 1
    [pending] = tmks_of(sessions, "POS-1")  # one TMK made, however many copies
    assert pending.status == "pending"

    confirmation = run.session.receive_delivery(deliveries[-1])
    confirmed = confirmation.to_json()
    activations = _at_once(
        COPIES, lambda _: tmk.downloads.confirm(run.session_id, confirmed, actor="gw")
    )
    assert not [a for a in activations if isinstance(a, errors.TmkError)], activations
    assert {(a.kcv, a.activated_at) for a in activations} == {
        (terminal.scm.tmk_kcv, activations[0].activated_at)
    }
    assert sum(not a.repeated for a in activations) == 1
    assert failures(sessions) == []
    [active] = tmks_of(sessions, "POS-1")
    assert active.status == "active" and active.destroyed_at is None
    assert _active_kcv(tmk, "POS-1") == terminal.scm.tmk_kcv.hex().upper()


def test_copies_of_a_proof_racing_a_forged_proof_of_its_session(
    tmk: Tmk,
    terminal: PosTerminal,
    sessions: sessionmaker[Session],
    keystore: KeyStore,
    clock: Clock,
) -> None:
    """Genuine and forged proofs of one session at once: whichever is answered first,
    every copy of it gets its answer, every copy of the other is tmk-out-of-order, and the
    session is never left half-ended."""
    run, proof = _proved(tmk, terminal, clock)
    forged = replace(proof, signature=bytes(70)).to_json()
    bodies = [proof.to_json(), forged] * (COPIES // 2)
    results = _at_once(
        len(bodies), lambda i: tmk.downloads.accept_proof(run.session_id, bodies[i], actor="gw")
    )
    genuine_results, forged_results = results[0::2], results[1::2]
    row = session_row(sessions, run.session_id)
    if row.stage == "delivered":  # the genuine proof won
        assert all(isinstance(r, KeyDelivery) for r in genuine_results), genuine_results
        assert len({r.to_json() for r in genuine_results}) == 1
        assert all(isinstance(r, errors.TmkOutOfOrder) for r in forged_results), forged_results
        run.delivery = genuine_results[0]
        run.confirm()
        assert _active_kcv(tmk, "POS-1") == terminal.scm.tmk_kcv.hex().upper()
    else:  # the forged one won: the session ended before any TMK was made
        assert (row.stage, row.error_code) == ("aborted", "tmk-bad-terminal-proof")
        assert all(isinstance(r, errors.TmkBadTerminalProof) for r in forged_results)
        assert all(isinstance(r, errors.TmkOutOfOrder) for r in genuine_results)
        assert tmks_of(sessions, "POS-1") == []
    for made in tmks_of(sessions, "POS-1"):
        if made.status != "active":
            assert_destroyed(keystore, made.key_handle)
