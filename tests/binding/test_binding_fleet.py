"""The fleet view's use cases over a real database (SQLite, and PostgreSQL when configured):
real hosts and SEs report through them; the theft rules raise flags an operator lists and
acknowledges; concurrent reports neither miss nor double a flag."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.binding.errors import (
    SeBoundElsewhere,
    SeFlagAlreadyAcknowledged,
    SeMalformedMessage,
    SeReportIdReused,
    SeUnknownElement,
    SeUnknownFlag,
)
from trustfleet.binding.fleet import Fleet, SeState, judge
from trustfleet.binding.host import EventKind
from trustfleet.binding.models import BindingEventRecord, FleetFlag
from trustfleet.binding.protocol import Lifecycle, Mode
from trustfleet.binding.storage import PowerCut
from trustfleet.store import Database
from trustfleet.store.audit import iter_records, verify_chain

from .conftest import GATEWAY_ACTOR, HostFactory, ServiceReporter, make_se, report_body

SE = "00112233445566778899aabbccddeeff"
OTHER_SE = "ffeeddccbbaa99887766554433221100"


def _audit_actions(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        return [record.action for record in iter_records(session)]


# =====================================================================================
# The rules, as a table
# =====================================================================================

A, B = "host-a", "host-b"
K = EventKind
UNLOCKED_A, LOCKED_A = SeState(A, False), SeState(A, True)


@pytest.mark.parametrize(
    ("state", "kind", "device", "next_state", "flags"),
    [
        # the honest life: bound, verified, locked, verified ... in one host
        (None, K.BOUND, A, UNLOCKED_A, ()),
        (UNLOCKED_A, K.VERIFIED, A, UNLOCKED_A, ()),
        (UNLOCKED_A, K.LOCKED, A, LOCKED_A, ()),
        (LOCKED_A, K.VERIFIED, A, LOCKED_A, ()),
        # before the lock, binding again anywhere is the protocol (factory retries)
        (UNLOCKED_A, K.BOUND, A, UNLOCKED_A, ()),
        (UNLOCKED_A, K.BOUND, B, SeState(B, False), ()),
        (UNLOCKED_A, K.FAILED, A, UNLOCKED_A, ()),  # stale credential after a crash
        # a theft: the SE bound to A fails in B
        (LOCKED_A, K.FAILED, B, LOCKED_A, ("foreign-failure",)),
        (LOCKED_A, K.BLOCKED, B, LOCKED_A, ("foreign-failure",)),
        (UNLOCKED_A, K.FAILED, B, UNLOCKED_A, ("foreign-failure",)),
        # a copied credential (or a false report): verified in another host
        (LOCKED_A, K.VERIFIED, B, LOCKED_A, ("foreign-verification",)),
        # bound or locked elsewhere after the lock: only the issuer's reset allows it
        (LOCKED_A, K.BOUND, B, SeState(B, False), ("moved",)),
        (LOCKED_A, K.LOCKED, B, SeState(B, True), ("moved",)),
        # bound again in its own host after the lock: a reset there, counted, not flagged
        (LOCKED_A, K.BOUND, A, UNLOCKED_A, ()),
        # never reported bound
        (None, K.FAILED, B, None, ("unknown-failure",)),
        (None, K.BLOCKED, B, None, ("unknown-failure",)),
        (None, K.VERIFIED, A, LOCKED_A, ()),  # bound and locked before reporting: learnt
        (None, K.LOCKED, A, LOCKED_A, ()),  # the bound report was lost
        # its own host fails it after the lock: lost credential, or a substitute SE
        (LOCKED_A, K.FAILED, A, LOCKED_A, ("home-failure",)),
        (LOCKED_A, K.BLOCKED, A, LOCKED_A, ("home-failure",)),
    ],
)
def test_the_rules(
    state: SeState | None,
    kind: EventKind,
    device: str,
    next_state: SeState | None,
    flags: tuple[str, ...],
) -> None:
    verdict = judge(state, kind, device)
    assert verdict.flags == flags
    assert verdict.bind is (kind is K.BOUND)
    if next_state is not None:
        assert verdict.state == next_state
    else:
        assert verdict.state.bound_device is None


# =====================================================================================
# Real hosts
# =====================================================================================


@pytest.mark.parametrize("mode", [Mode.MUTUAL, Mode.DIGEST])
def test_an_se_bound_to_host_a_that_fails_in_host_b_raises_a_theft_flag(
    make_host: HostFactory, fleet: Fleet, sessions: sessionmaker[Session], mode: Mode
) -> None:
    reporter = ServiceReporter(fleet)
    se = make_se()
    owner = make_host(se, device_id="gateway-1", mode=mode, reporter=reporter)
    owner.power_up()
    owner.power_up()
    assert fleet.flags(status="all") == []
    se_id = se.se_id.hex()
    assert fleet.element(se_id).bound_device == "gateway-1"

    thief = make_host(se, device_id="gateway-2", mode=mode, reporter=reporter)
    for _ in range(3):
        with pytest.raises(SeBoundElsewhere):
            thief.power_up()

    assert reporter.errors == []
    (flag,) = fleet.flags()
    assert (flag.rule, flag.se_id, flag.device_id, flag.bound_device) == (
        "foreign-failure",
        se_id,
        "gateway-2",
        "gateway-1",
    )
    assert flag.count == 3 and flag.status == "open"
    assert "theft" in flag.description
    element = fleet.element(se_id)
    assert (element.bound_device, element.locked, element.open_flags) == ("gateway-1", True, 1)
    assert (element.last_kind, element.last_device) == ("failed", "gateway-2")
    assert fleet.flags(device="gateway-1") == [flag]  # the bound host finds it too
    assert fleet.flags(device="gateway-3") == []
    assert _audit_actions(sessions).count("se.flag_raised") == 1

    # back home the SE works, and nothing more is raised
    owner.power_up()
    assert fleet.flags() == [flag]
    assert [e.kind for e in fleet.events(se_id, limit=3)] == ["verified", "failed", "failed"]


def test_the_honest_host_is_never_flagged_after_any_number_of_power_cycles(
    make_host: HostFactory, fleet: Fleet
) -> None:
    reporter = ServiceReporter(fleet)
    se = make_se()
    host = make_host(se, device_id="meter-17", reporter=reporter)
    for _ in range(60):
        host.power_up()
    assert reporter.errors == []
    assert len(reporter.receipts) == 3 + 59  # bound, verified, locked; then one each
    assert all(receipt.flags == () for receipt in reporter.receipts)
    assert fleet.flags(status="all") == []
    element = fleet.element(se.se_id.hex())
    assert (element.bound_device, element.locked, element.binds) == ("meter-17", True, 1)
    assert fleet.elements(flagged=True) == []


def test_a_host_recovering_from_a_power_cut_during_its_first_bind_is_not_flagged(
    make_host: HostFactory, fleet: Fleet
) -> None:
    """The power fails while the host stores its credential (the SE has registered it,
    the host reported nothing): the next power-up binds again and locks; no flag."""
    reporter = ServiceReporter(fleet)
    se = make_se()
    host = make_host(se, device_id="gw", mode=Mode.DIGEST, reporter=reporter)
    store_put = host.store.put

    def cut(_credential: Any) -> None:
        raise PowerCut()

    host.store.put = cut  # type: ignore[method-assign]
    with pytest.raises(PowerCut):
        host.power_up()
    assert se.status().lifecycle is Lifecycle.REGISTERED
    host.store.put = store_put  # type: ignore[method-assign]
    for _ in range(3):
        host.power_up()
    assert reporter.errors == []
    assert fleet.flags(status="all") == []
    element = fleet.element(se.se_id.hex())
    assert (element.bound_device, element.locked, element.binds) == ("gw", True, 1)


# =====================================================================================
# Every rule, scripted
# =====================================================================================


def _report(fleet: Fleet, kind: str, device: str, se_id: str = SE, **kwargs: Any) -> Any:
    return fleet.report(report_body(kind, device, se_id, **kwargs), actor=GATEWAY_ACTOR)


def test_every_rule_raises_its_own_flag(fleet: Fleet) -> None:
    assert _report(fleet, "failed", "field-9").flags == ("unknown-failure",)
    assert _report(fleet, "bound", "gw-a").flags == ()
    assert _report(fleet, "locked", "gw-a").flags == ()
    assert _report(fleet, "verified", "gw-b").flags == ("foreign-verification",)
    assert _report(fleet, "failed", "gw-a").flags == ("home-failure",)
    assert _report(fleet, "blocked", "gw-c").flags == ("foreign-failure",)
    assert _report(fleet, "bound", "gw-d").flags == ("moved",)
    element = fleet.element(SE)
    assert (element.bound_device, element.locked, element.binds) == ("gw-d", False, 2)
    rules = [(f.rule, f.device_id, f.bound_device) for f in fleet.flags()]
    assert rules == [
        ("unknown-failure", "field-9", None),
        ("foreign-verification", "gw-b", "gw-a"),
        ("home-failure", "gw-a", "gw-a"),
        ("foreign-failure", "gw-c", "gw-a"),
        ("moved", "gw-d", "gw-a"),
    ]
    assert element.open_flags == 5
    assert [f.rule for f in fleet.flags(rule="moved")] == ["moved"]
    # the old host is a foreign host now
    assert _report(fleet, "failed", "gw-a").flags == ("foreign-failure",)


def test_a_retried_report_is_recorded_once_and_a_reused_id_is_refused(
    fleet: Fleet, engine: Engine
) -> None:
    _report(fleet, "bound", "gw-a")
    _report(fleet, "locked", "gw-a")
    body = report_body("failed", "gw-b", SE)
    first = fleet.report(body, actor=GATEWAY_ACTOR)
    again = fleet.report(body, actor=GATEWAY_ACTOR)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert fleet.flags()[0].count == 1
    report_id = first.report_id
    with pytest.raises(SeReportIdReused):
        _report(fleet, "failed", "gw-c", report_id=report_id)
    with pytest.raises(SeReportIdReused):
        _report(fleet, "failed", "gw-b", OTHER_SE, report_id=report_id)
    with engine.connect() as connection:
        events = connection.execute(select(func.count()).select_from(BindingEventRecord))
        assert events.scalar() == 3


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{}",
        b'{"type":"se-binding-report","v":1}',
        report_body("failed", "gw", SE).replace(b'"failed"', b'"stolen"'),
        report_body("failed", "gw", SE).replace(SE.encode(), SE.upper().encode()),
        report_body("failed", "gw", SE).replace(b'"gw"', b'"gw\\u0000"'),
        report_body("failed", "gw", SE).replace(b'"gw"', b'"' + b"x" * 65 + b'"'),
        report_body("failed", "gw", SE).replace(b"}", b',"extra":1}'),
        report_body("failed", "gw", SE).replace(b"10:00:00Z", b"10:00:00.5Z"),
    ],
)
def test_malformed_reports_are_refused_audited_and_record_nothing(
    fleet: Fleet, body: bytes, sessions: sessionmaker[Session]
) -> None:
    with pytest.raises(SeMalformedMessage):
        fleet.report(body, actor=GATEWAY_ACTOR)
    assert fleet.elements() == []
    assert _audit_actions(sessions) == ["se.report_refused"]


def test_an_operator_acknowledges_a_flag_and_new_evidence_opens_another(
    fleet: Fleet, sessions: sessionmaker[Session]
) -> None:
    _report(fleet, "bound", "gw-a")
    _report(fleet, "locked", "gw-a")
    _report(fleet, "failed", "gw-b")
    _report(fleet, "failed", "gw-b", OTHER_SE)
    first, other = fleet.flags()
    acknowledged = fleet.acknowledge(first.id, actor="token:2:ops", note="field swap, ticket 7")
    assert (acknowledged.status, acknowledged.acknowledged_by) == ("acknowledged", "token:2:ops")
    assert acknowledged.note == "field swap, ticket 7" and acknowledged.acknowledged_at
    with pytest.raises(SeFlagAlreadyAcknowledged):
        fleet.acknowledge(first.id, actor="token:2:ops")
    with pytest.raises(SeUnknownFlag):
        fleet.acknowledge(999_999, actor="token:2:ops")
    assert fleet.element(SE).open_flags == 0
    assert fleet.flags() == [other]
    assert fleet.flags(status="acknowledged") == [acknowledged]
    assert fleet.flags(se_id=SE, status="all") == [acknowledged]
    assert [e.se_id for e in fleet.elements(flagged=True)] == [OTHER_SE]

    _report(fleet, "failed", "gw-b")
    reopened = fleet.flags(se_id=SE)
    assert len(reopened) == 1 and reopened[0].id != first.id and reopened[0].count == 1
    assert fleet.element(SE).open_flags == 1
    assert _audit_actions(sessions).count("se.flag_acknowledged") == 1


def test_listings_page_and_filter(fleet: Fleet) -> None:
    ids = sorted(os.urandom(16).hex() for _ in range(5))
    for index, se_id in enumerate(ids):
        _report(fleet, "bound", f"gw-{index % 2}", se_id)
    assert [e.se_id for e in fleet.elements(limit=2)] == ids[:2]
    assert [e.se_id for e in fleet.elements(after=ids[1], limit=2)] == ids[2:4]
    assert [e.se_id for e in fleet.elements(device="gw-1")] == ids[1::2]
    for _ in range(4):
        _report(fleet, "verified", "gw-0", ids[0])
    newest = fleet.events(ids[0], limit=2)
    assert [e.kind for e in newest] == ["verified", "verified"]
    older = fleet.events(ids[0], before=newest[-1].id)
    assert [e.kind for e in older] == ["verified", "verified", "bound"]
    assert all(e.reported_by == GATEWAY_ACTOR for e in older)
    with pytest.raises(SeUnknownElement):
        fleet.element(OTHER_SE)
    with pytest.raises(SeUnknownElement):
        fleet.events(OTHER_SE)


# =====================================================================================
# Concurrency: reports arriving together, on one SE
# =====================================================================================


def _together(count: int, work: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(count)

    def run(index: int) -> Any:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def test_concurrent_first_reports_of_an_unknown_se_raise_one_flag(
    db: Database, sessions: sessionmaker[Session], engine: Engine
) -> None:
    """Eight hosts report the same never-seen SE failing at once: one SE row, eight
    events, one open flag per host, each raised once."""
    receipts = _together(8, lambda i: _report(Fleet(db), "failed", f"gw-{i % 4}"))
    fleet = Fleet(db)
    assert all(r.flags == ("unknown-failure",) for r in receipts)
    flags = fleet.flags()
    assert sorted((f.device_id, f.count) for f in flags) == [(f"gw-{i}", 2) for i in range(4)]
    assert fleet.element(SE).open_flags == 4
    assert len(fleet.events(SE)) == 8
    assert _audit_actions(sessions).count("se.flag_raised") == 4
    with sessions() as session:
        assert verify_chain(iter_records(session)).ok


def test_concurrent_theft_reports_raise_exactly_one_flag_and_count_them_all(
    db: Database, sessions: sessionmaker[Session], engine: Engine
) -> None:
    fleet = Fleet(db)
    _report(fleet, "bound", "gw-a")
    _report(fleet, "locked", "gw-a")
    reports = 12

    def one(index: int) -> Any:
        if index % 3 == 0:  # the owner keeps verifying meanwhile
            return _report(Fleet(db), "verified", "gw-a")
        return _report(Fleet(db), "failed", "gw-b")

    _together(reports, one)
    (flag,) = fleet.flags(status="all")
    assert (flag.rule, flag.count) == ("foreign-failure", 8)
    element = fleet.element(SE)
    assert (element.bound_device, element.locked, element.open_flags) == ("gw-a", True, 1)
    with engine.connect() as connection:
        count = select(func.count()).select_from(FleetFlag)
        assert connection.execute(count).scalar() == 1
    assert _audit_actions(sessions).count("se.reported") == 2 + reports


def test_acknowledging_while_reports_arrive_leaves_a_consistent_count(db: Database) -> None:
    fleet = Fleet(db)
    _report(fleet, "bound", "gw-a")
    _report(fleet, "locked", "gw-a")
    _report(fleet, "failed", "gw-b")
    (flag,) = fleet.flags()

    def one(index: int) -> Any:
        if index == 0:
            return Fleet(db).acknowledge(flag.id, actor="token:2:ops")
        return _report(Fleet(db), "failed", "gw-b")

    _together(6, one)
    open_flags = fleet.flags()
    assert fleet.element(SE).open_flags == len(open_flags) <= 1
    total = sum(f.count for f in fleet.flags(status="all"))
    assert total == 6  # every failure counted on exactly one flag
