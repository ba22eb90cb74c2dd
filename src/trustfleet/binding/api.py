"""SE binding routes: the fleet view.

Hosts report binding events through the device gateway (``POST /v1/se/reports``, a device
route: the ``device-gateway`` role only); operators list the secure elements, their events
and the flags the reports raised, and acknowledge flags (docs/binding.md, *Fleet view*).
Routes parse, authorise, call :mod:`~trustfleet.binding.fleet` and serialise; nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Literal, get_args

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from trustfleet.binding import services
from trustfleet.binding.fleet import FLAG_STATUS_FILTERS, MAX_PAGE
from trustfleet.binding.models import FLAG_RULES, NOTE_CHARS
from trustfleet.binding.reporting import HEX_ID_PATTERN
from trustfleet.kit.routes import DeviceRoutes
from trustfleet.server.context import AppContext
from trustfleet.server.deps import Principal, get_context, require_role
from trustfleet.server.devicelane import DeviceAnswer
from trustfleet.server.models import ROLES, Role
from trustfleet.store import MAX_INTEGER

router = APIRouter(prefix="/v1/se", tags=["se"])

#: who reads the fleet view: operators, and auditors where the role exists
READ_ROLES = sorted({Role.OPERATOR.value} | ({"auditor"} & ROLES))
MAX_ID = MAX_INTEGER  # flags' and events' ids are Integer columns

Context = Annotated[AppContext, Depends(get_context)]
Reader = Annotated[Principal, Depends(require_role(*READ_ROLES))]
Operator = Annotated[Principal, Depends(require_role(Role.OPERATOR))]
SeId = Annotated[str, Path(pattern=f"^{HEX_ID_PATTERN.pattern}$", description="32 hex digits")]
FlagId = Annotated[int, Path(ge=1, le=MAX_ID)]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
DeviceFilter = Annotated[str | None, Query(min_length=1, max_length=64)]
Rule = Literal[
    "foreign-failure", "foreign-verification", "moved", "unknown-failure", "home-failure"
]
StatusFilter = Literal["open", "acknowledged", "all"]
assert get_args(Rule) == FLAG_RULES
assert get_args(StatusFilter) == FLAG_STATUS_FILTERS


# =====================================================================================
# Models
# =====================================================================================


class _View(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ReportAnswerOut(BaseModel):
    status: Literal["recorded", "duplicate"]
    report_id: str


class ElementOut(_View):
    se_id: str
    bound_device: str | None = Field(description="The host it is bound to, per the reports")
    locked: bool = Field(description="The bound host reported the bind lock")
    binds: int = Field(description="bound reports received (a locked SE binds after a reset)")
    bound_at: datetime | None
    last_kind: str
    last_device: str
    last_at: datetime
    open_flags: int
    first_seen_at: datetime


class ElementPage(BaseModel):
    elements: list[ElementOut]
    next_after: str | None = Field(description="Pass as after for the next page")


class EventOut(_View):
    id: int
    report_id: str
    se_id: str
    kind: str
    device_id: str
    reported_at: datetime = Field(description="The host's clock")
    received_at: datetime = Field(description="The server's clock (reports are judged in order)")
    reported_by: str


class EventPage(BaseModel):
    events: list[EventOut]
    next_before: int | None = Field(description="Pass as before for the next (older) page")


class FlagOut(_View):
    id: int
    se_id: str
    rule: str
    description: str
    device_id: str = Field(description="The host whose report raised it")
    bound_device: str | None = Field(description="The SE's bound host at that moment")
    report_id: str
    count: int = Field(description="Reports that broke the rule while the flag was open")
    raised_at: datetime
    last_seen_at: datetime
    status: str
    acknowledged_by: str | None
    acknowledged_at: datetime | None
    note: str


class FlagPage(BaseModel):
    flags: list[FlagOut]
    next_after: int | None = Field(description="Pass as after for the next page")


class AcknowledgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field(default="", max_length=NOTE_CHARS, description="What the operator found")


# =====================================================================================
# Reports (hosts, through the device gateway): a device route
# =====================================================================================

device = DeviceRoutes(router, roles={Role.DEVICE_GATEWAY.value})


@device.post("/reports", response_model=ReportAnswerOut)
def report(
    context: AppContext, principal: Principal, params: Mapping[str, str], body: bytes
) -> DeviceAnswer:
    """A host's ``se-binding-report`` (one event of a power-up: bound, locked, verified,
    failed, blocked). Answers ``recorded``, or ``duplicate`` for a report id recorded
    before; says nothing about the flags it raised."""
    receipt = services.fleet(context).report(body, actor=principal.actor)
    status: Literal["recorded", "duplicate"] = "duplicate" if receipt.duplicate else "recorded"
    answer = ReportAnswerOut(status=status, report_id=receipt.report_id)
    return DeviceAnswer(answer.model_dump_json().encode())


device_routes = device.routes


# =====================================================================================
# The fleet view (operators)
# =====================================================================================


@router.get("/elements")
def list_elements(
    context: Context,
    principal: Reader,
    flagged: Annotated[bool, Query(description="Only SEs with an open flag")] = False,
    device: DeviceFilter = None,
    after: Annotated[str | None, Query(pattern=f"^{HEX_ID_PATTERN.pattern}$")] = None,
    limit: Limit = 100,
) -> ElementPage:
    """Secure elements by SE ID, with the host each is bound to, its last event and its
    open flags; ``device`` lists the SEs bound to that host."""
    views = services.fleet(context).elements(
        flagged=flagged, device=device, after=after, limit=limit
    )
    return ElementPage(
        elements=[ElementOut.model_validate(v) for v in views],
        next_after=views[-1].se_id if len(views) == limit else None,
    )


@router.get("/elements/{se_id}")
def get_element(se_id: SeId, context: Context, principal: Reader) -> ElementOut:
    """One secure element as the reports describe it."""
    return ElementOut.model_validate(services.fleet(context).element(se_id))


@router.get("/elements/{se_id}/events")
def list_events(
    se_id: SeId,
    context: Context,
    principal: Reader,
    before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    limit: Limit = 100,
) -> EventPage:
    """The reports about one SE, newest first."""
    views = services.fleet(context).events(se_id, before=before, limit=limit)
    return EventPage(
        events=[EventOut.model_validate(v) for v in views],
        next_before=views[-1].id if len(views) == limit else None,
    )


@router.get("/flags")
def list_flags(
    context: Context,
    principal: Reader,
    status: StatusFilter = "open",
    se_id: Annotated[str | None, Query(pattern=f"^{HEX_ID_PATTERN.pattern}$")] = None,
    device: DeviceFilter = None,
    rule: Rule | None = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    limit: Limit = 100,
) -> FlagPage:
    """Flags, oldest first: open ones by default. ``device`` matches the host that raised
    the flag or the SE's bound host at that moment."""
    views = services.fleet(context).flags(
        status=status, se_id=se_id, device=device, rule=rule, after=after, limit=limit
    )
    return FlagPage(
        flags=[FlagOut.model_validate(v) for v in views],
        next_after=views[-1].id if len(views) == limit else None,
    )


@router.get("/flags/{flag_id}")
def get_flag(flag_id: FlagId, context: Context, principal: Reader) -> FlagOut:
    return FlagOut.model_validate(services.fleet(context).flag(flag_id))


@router.post("/flags/{flag_id}/acknowledge")
def acknowledge_flag(
    flag_id: FlagId, context: Context, principal: Operator, body: AcknowledgeIn | None = None
) -> FlagOut:
    """An operator has looked at the flag; ``note`` says what they found (audited). A
    flag acknowledged already is ``se-flag-already-acknowledged``."""
    note = body.note if body else ""
    view = services.fleet(context).acknowledge(flag_id, actor=principal.actor, note=note)
    return FlagOut.model_validate(view)
