"""The fleet view's use cases: record what a host reports about its secure element, judge
it against the SE's history (the theft rules), and let operators list SEs, events and
flags and acknowledge flags.

Each report is one unit of work: it locks the SE's row (made by the SE's first report),
records the event, opens or counts the flags the rules raise, moves the SE's state on, and
writes its audit record, all committed together. Every report of one SE takes the same row
lock, so reports arriving at the same moment on several nodes are judged one after the
other against the history the previous one left: a flag can be neither missed nor raised
twice (and the unique ``open_key`` would refuse a second open flag anyway). Reports are
judged in the order they are received; ``time`` in a report is the host's clock, kept for
the operator.

The rules (:func:`judge`; docs/binding.md, *Fleet view*, says why each exists):

==========================  ==========================================================
``foreign-failure``         ``failed``/``blocked`` from a host other than the bound one:
                            a likely theft
``foreign-verification``    ``verified`` from a host other than the bound one: the host's
                            credential was copied, or the report is false
``moved``                   ``bound``/``locked`` from another host after the bound host
                            reported the lock: only the issuer's reset allows it
``unknown-failure``         ``failed``/``blocked`` for an SE no host reported bound or
                            verified
``home-failure``            ``failed``/``blocked`` from the bound host after the lock: it
                            lost its credential, or the SE is not the one it bound
==========================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, or_, select, update

from trustfleet.binding.errors import (
    SeError,
    SeFlagAlreadyAcknowledged,
    SeMalformedMessage,
    SeReportIdReused,
    SeUnknownElement,
    SeUnknownFlag,
)
from trustfleet.binding.host import EventKind
from trustfleet.binding.models import (
    FLAG_RULES,
    NOTE_CHARS,
    BindingEventRecord,
    FleetFlag,
    SecureElementRecord,
)
from trustfleet.binding.reporting import BindingReport
from trustfleet.store import Database, IntegrityViolation
from trustfleet.wire import as_utc, utcnow

#: what each rule means, in one line (the CLI and the docs say it this way)
RULES = {
    "foreign-failure": "failed in a host other than its bound one: a likely theft",
    "foreign-verification": "verified in a host other than its bound one: a copied credential",
    "moved": "bound in another host after it was locked: only an issuer's reset allows it",
    "unknown-failure": "failed, and no host ever reported it bound",
    "home-failure": "failed in its own host after the lock: lost credential or a substitute SE",
}
assert tuple(RULES) == FLAG_RULES
FLAG_STATUS_FILTERS = ("open", "acknowledged", "all")
MAX_PAGE = 500

# =====================================================================================
# The rules
# =====================================================================================


@dataclass(frozen=True, slots=True)
class SeState:
    """What the fleet view believes about an SE: its bound host and whether that host
    reported the lock."""

    bound_device: str | None
    locked: bool


@dataclass(frozen=True, slots=True)
class Verdict:
    """A report's effect: the SE's next state, whether it was a bind, the rules it broke."""

    state: SeState
    bind: bool
    flags: tuple[str, ...]


def judge(state: SeState | None, kind: EventKind, device_id: str) -> Verdict:
    """The rules, as a pure function of the SE's state (None: never reported) and one
    report. The honest life of an SE (bound, verified, locked in one host, then verified at
    every power-up in it) breaks none."""
    bound = state.bound_device if state else None
    locked = state.locked if state else False
    elsewhere = bound is not None and bound != device_id
    flags: tuple[str, ...]
    if kind in (EventKind.BOUND, EventKind.LOCKED):
        # A locked SE binds again only after the issuer's reset: a report that it did in
        # another host is a move the operator must know about (planned or not). Before the
        # lock, binding again (a factory retry, a crash before the lock) is the protocol.
        flags = ("moved",) if elsewhere and locked else ()
        next_state = SeState(device_id, kind is EventKind.LOCKED)
        return Verdict(next_state, kind is EventKind.BOUND, flags)
    if kind is EventKind.VERIFIED:
        if bound is None:
            # bound before its host reported anything: learn the binding. The host library
            # locks an unlocked SE at the power-up that verifies it (and reports ``locked``
            # then), so a host that reports only ``verified`` holds a locked SE.
            return Verdict(SeState(device_id, True), False, ())
        flags = ("foreign-verification",) if elsewhere else ()
        return Verdict(SeState(bound, locked), False, flags)
    # failed, blocked
    if bound is None:
        flags = ("unknown-failure",)
    elif elsewhere:
        flags = ("foreign-failure",)
    elif locked:
        flags = ("home-failure",)
    else:  # the bound host before the lock: a stale credential after a crash; it binds again
        flags = ()
    return Verdict(SeState(bound, locked), False, flags)


# =====================================================================================
# Views
# =====================================================================================


@dataclass(frozen=True)
class ElementView:
    se_id: str
    bound_device: str | None
    locked: bool
    binds: int
    bound_at: datetime | None
    last_kind: str
    last_device: str
    last_at: datetime
    open_flags: int
    first_seen_at: datetime


@dataclass(frozen=True)
class EventView:
    id: int
    report_id: str
    se_id: str
    kind: str
    device_id: str
    reported_at: datetime
    received_at: datetime
    reported_by: str


@dataclass(frozen=True)
class FlagView:
    id: int
    se_id: str
    rule: str
    description: str
    device_id: str
    bound_device: str | None
    report_id: str
    count: int
    raised_at: datetime
    last_seen_at: datetime
    status: str
    acknowledged_by: str | None
    acknowledged_at: datetime | None
    note: str


@dataclass(frozen=True)
class ReportReceipt:
    """What recording a report did: ``duplicate`` when this report id was recorded before
    (nothing changed); ``flags`` the rules it broke (opened or counted)."""

    report_id: str
    duplicate: bool
    flags: tuple[str, ...]


# =====================================================================================
# Statements
# =====================================================================================

_E = SecureElementRecord
_EV = BindingEventRecord
_F = FleetFlag

_ELEMENT = select(
    _E.se_id,
    _E.bound_device,
    _E.locked,
    _E.binds,
    _E.bound_at,
    _E.last_kind,
    _E.last_device,
    _E.last_at,
    _E.open_flags,
    _E.first_seen_at,
)
_ELEMENT_BY_ID = _ELEMENT.where(_E.se_id == bindparam("b_se_id"))
_ELEMENT_LOCKED = _ELEMENT_BY_ID.with_for_update()
_UPDATE_ELEMENT = (
    update(_E)
    .where(_E.se_id == bindparam("b_se_id"))
    .values(
        bound_device=bindparam("b_bound_device"),
        locked=bindparam("b_locked"),
        binds=_E.binds + bindparam("b_binds"),
        bound_at=bindparam("b_bound_at"),
        last_kind=bindparam("b_kind"),
        last_device=bindparam("b_device"),
        last_at=bindparam("b_now"),
        open_flags=_E.open_flags + bindparam("b_opened"),
    )
)
_FLAG_CLOSED = (
    update(_E).where(_E.se_id == bindparam("b_se_id")).values(open_flags=_E.open_flags - 1)
)
_EVENT = select(
    _EV.id,
    _EV.report_id,
    _EV.se_id,
    _EV.kind,
    _EV.device_id,
    _EV.reported_at,
    _EV.received_at,
    _EV.reported_by,
)
_EVENT_BY_REPORT = _EVENT.where(_EV.report_id == bindparam("b_report_id"))
_FLAG = select(
    _F.id,
    _F.se_id,
    _F.rule,
    _F.device_id,
    _F.bound_device,
    _F.report_id,
    _F.count,
    _F.raised_at,
    _F.last_seen_at,
    _F.status,
    _F.acknowledged_by,
    _F.acknowledged_at,
    _F.note,
)
_FLAG_BY_ID = _FLAG.where(_F.id == bindparam("b_id"))
_FLAG_LOCKED = _FLAG_BY_ID.with_for_update()
_OPEN_FLAG = select(_F.id).where(_F.open_key == bindparam("b_open_key"))
_REPEAT_FLAG = (
    update(_F)
    .where(_F.id == bindparam("b_id"))
    .values(count=_F.count + 1, last_seen_at=bindparam("b_now"))
)
_ACKNOWLEDGE = (
    update(_F)
    .where(_F.id == bindparam("b_id"), _F.status == "open")
    .values(
        status="acknowledged",
        open_key=None,
        acknowledged_by=bindparam("b_actor"),
        acknowledged_at=bindparam("b_now"),
        note=bindparam("b_note"),
    )
)


# =====================================================================================
# The use cases
# =====================================================================================


class Fleet:
    """The fleet view over one database."""

    def __init__(self, db: Database, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._db = db
        self._clock = clock

    def _now(self) -> datetime:
        return as_utc(self._clock())

    # -- reports (the device gateway) ----------------------------------------------------

    def report(self, body: bytes, *, actor: str) -> ReportReceipt:
        """Record one ``se-binding-report`` and judge it. A report id recorded before is
        answered as a duplicate and changes nothing; the same id with other content is
        ``se-report-id-reused``; a malformed report is refused and audited."""
        try:
            report = BindingReport.from_json(body)
        except SeMalformedMessage as refused:
            self._audit_refusal(refused, actor)
            raise
        now = self._now()
        try:
            return self._record(report, now, actor)
        except IntegrityViolation:
            # another node recorded this SE's first report, or this report id, meanwhile:
            # judged again, after it (a second violation is a bug, not a race)
            return self._record(report, now, actor)

    def _record(self, report: BindingReport, now: datetime, actor: str) -> ReportReceipt:
        se_id, device, kind = report.se_id, report.device_id, report.kind
        with self._db.work() as uow:
            row = uow.one(_ELEMENT_LOCKED, b_se_id=se_id)
            previous = uow.one(_EVENT_BY_REPORT, b_report_id=report.report_id)
            if previous is not None:
                if (previous.se_id, previous.device_id, previous.kind) != (se_id, device, kind):
                    raise SeReportIdReused()
                return ReportReceipt(report.report_id, duplicate=True, flags=())
            if row is None:
                uow.insert(
                    _E,
                    se_id=se_id,
                    bound_device=None,
                    locked=False,
                    binds=0,
                    bound_at=None,
                    last_kind=kind.value,
                    last_device=device,
                    last_at=now,
                    open_flags=0,
                    first_seen_at=now,
                )
            state = SeState(row.bound_device, row.locked) if row is not None else None
            verdict = judge(state, kind, device)
            uow.insert(
                _EV,
                report_id=report.report_id,
                se_id=se_id,
                device_id=device,
                kind=kind.value,
                reported_at=report.time,
                received_at=now,
                reported_by=actor,
            )
            opened = 0
            for rule in verdict.flags:
                open_key = f"{se_id}|{rule}|{device}"
                flag = uow.one(_OPEN_FLAG, b_open_key=open_key)
                if flag is not None:
                    uow.run(_REPEAT_FLAG, b_id=flag.id, b_now=now)
                    continue
                uow.insert(
                    _F,
                    se_id=se_id,
                    rule=rule,
                    device_id=device,
                    bound_device=state.bound_device if state else None,
                    report_id=report.report_id,
                    count=1,
                    raised_at=now,
                    last_seen_at=now,
                    status="open",
                    open_key=open_key,
                    acknowledged_by=None,
                    acknowledged_at=None,
                    note="",
                )
                opened += 1
                uow.audit(
                    "se.flag_raised",
                    actor=actor,
                    subject=se_id,
                    outcome="failure",
                    details={
                        "rule": rule,
                        "device_id": device,
                        "bound_device": state.bound_device if state else None,
                        "report_id": report.report_id,
                    },
                )
            rebound = state is None or verdict.state.bound_device != state.bound_device
            uow.run(
                _UPDATE_ELEMENT,
                b_se_id=se_id,
                b_bound_device=verdict.state.bound_device,
                b_locked=verdict.state.locked,
                b_binds=int(verdict.bind),
                b_bound_at=now if verdict.bind or rebound else row.bound_at,
                b_kind=kind.value,
                b_device=device,
                b_now=now,
                b_opened=opened,
            )
            uow.audit(
                "se.reported",
                actor=actor,
                subject=se_id,
                details={
                    "kind": kind.value,
                    "device_id": device,
                    "report_id": report.report_id,
                    "flags": list(verdict.flags),
                },
            )
        return ReportReceipt(report.report_id, duplicate=False, flags=verdict.flags)

    def _audit_refusal(self, refused: SeError, actor: str) -> None:
        with self._db.work() as uow:
            uow.audit(
                "se.report_refused", actor=actor, outcome="failure", details={"code": refused.code}
            )

    # -- what operators read -------------------------------------------------------------

    def elements(
        self,
        *,
        flagged: bool = False,
        device: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[ElementView]:
        """SEs by ID; ``flagged``: only those with an open flag; ``device``: only those
        bound to it; ``after``: the page after that SE ID."""
        query = _ELEMENT.order_by(_E.se_id).limit(_page(limit))
        if flagged:
            query = query.where(_E.open_flags > 0)
        if device is not None:
            query = query.where(_E.bound_device == device)
        if after is not None:
            query = query.where(_E.se_id > after)
        with self._db.reading() as reads:
            return [_element(row) for row in reads.all(query)]

    def element(self, se_id: str) -> ElementView:
        with self._db.reading() as reads:
            row = reads.one(_ELEMENT_BY_ID, b_se_id=se_id)
        if row is None:
            raise SeUnknownElement(f"no host has reported SE {se_id[:32]}")
        return _element(row)

    def events(self, se_id: str, *, before: int | None = None, limit: int = 100) -> list[EventView]:
        """The SE's reports, newest first; ``before``: the page before that event id."""
        self.element(se_id)
        query = _EVENT.where(_EV.se_id == se_id).order_by(_EV.id.desc()).limit(_page(limit))
        if before is not None:
            query = query.where(_EV.id < before)
        with self._db.reading() as reads:
            return [_event(row) for row in reads.all(query)]

    def flags(
        self,
        *,
        status: str = "open",
        se_id: str | None = None,
        device: str | None = None,
        rule: str | None = None,
        after: int | None = None,
        limit: int = 100,
    ) -> list[FlagView]:
        """Flags, oldest first. ``status``: open, acknowledged or all; ``device`` matches
        the reporting host or the SE's bound host at the time; ``after``: the page after
        that flag id."""
        query = _FLAG.order_by(_F.id).limit(_page(limit))
        if status != "all":
            query = query.where(_F.status == status)
        if se_id is not None:
            query = query.where(_F.se_id == se_id)
        if device is not None:
            query = query.where(or_(_F.device_id == device, _F.bound_device == device))
        if rule is not None:
            query = query.where(_F.rule == rule)
        if after is not None:
            query = query.where(_F.id > after)
        with self._db.reading() as reads:
            return [_flag(row) for row in reads.all(query)]

    def flag(self, flag_id: int) -> FlagView:
        with self._db.reading() as reads:
            row = reads.one(_FLAG_BY_ID, b_id=flag_id)
        if row is None:
            raise SeUnknownFlag()
        return _flag(row)

    def acknowledge(self, flag_id: int, *, actor: str, note: str = "") -> FlagView:
        """An operator has looked at the flag (``note``: what they found). The next report
        breaking the same rule in the same host opens a new flag."""
        se_id = self.flag(flag_id).se_id
        now = self._now()
        with self._db.work() as uow:
            uow.one(_ELEMENT_LOCKED, b_se_id=se_id)  # the reports' lock order: SE, then flag
            flag = uow.one(_FLAG_LOCKED, b_id=flag_id)
            if flag.status != "open":
                raise SeFlagAlreadyAcknowledged(f"flag {flag_id} was acknowledged already")
            uow.run(_ACKNOWLEDGE, b_id=flag_id, b_actor=actor, b_now=now, b_note=note[:NOTE_CHARS])
            uow.run(_FLAG_CLOSED, b_se_id=se_id)
            uow.audit(
                "se.flag_acknowledged",
                actor=actor,
                subject=se_id,
                details={"flag_id": flag_id, "rule": flag.rule, "device_id": flag.device_id},
            )
        return self.flag(flag_id)


def _page(limit: int) -> int:
    return max(1, min(limit, MAX_PAGE))


def _optional_time(value: datetime | None) -> datetime | None:
    return as_utc(value) if value is not None else None


def _element(row: Any) -> ElementView:
    return ElementView(
        se_id=row.se_id,
        bound_device=row.bound_device,
        locked=bool(row.locked),
        binds=row.binds,
        bound_at=_optional_time(row.bound_at),
        last_kind=row.last_kind,
        last_device=row.last_device,
        last_at=as_utc(row.last_at),
        open_flags=row.open_flags,
        first_seen_at=as_utc(row.first_seen_at),
    )


def _event(row: Any) -> EventView:
    return EventView(
        id=row.id,
        report_id=row.report_id,
        se_id=row.se_id,
        kind=row.kind,
        device_id=row.device_id,
        reported_at=as_utc(row.reported_at),
        received_at=as_utc(row.received_at),
        reported_by=row.reported_by,
    )


def _flag(row: Any) -> FlagView:
    return FlagView(
        id=row.id,
        se_id=row.se_id,
        rule=row.rule,
        description=RULES[row.rule],
        device_id=row.device_id,
        bound_device=row.bound_device,
        report_id=row.report_id,
        count=row.count,
        raised_at=as_utc(row.raised_at),
        last_seen_at=as_utc(row.last_seen_at),
        status=row.status,
        acknowledged_by=row.acknowledged_by,
        acknowledged_at=_optional_time(row.acknowledged_at),
        note=row.note,
    )
