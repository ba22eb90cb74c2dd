"""Outbox routes (admin and operator): delivery status, redelivery, pause and resume of a
destination. Registered with the domains' routers (``server.app.DOMAIN_ROUTERS``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel

from trustfleet.kit.outbox.service import DestinationView, MessageView, Outbox
from trustfleet.server.context import AppContext
from trustfleet.server.deps import Principal, get_context, require_role
from trustfleet.server.models import Role

router = APIRouter(prefix="/v1/outbox", tags=["outbox"])

Context = Annotated[AppContext, Depends(get_context)]
Operator = Annotated[Principal, Depends(require_role(Role.ADMIN, Role.OPERATOR))]
MessageId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$")]
DestinationName = Annotated[str, Path(pattern=r"^[A-Za-z0-9._:-]{1,160}$")]


class MessageOut(BaseModel):
    id: str
    destination: str
    event_type: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    size: int

    @classmethod
    def of(cls, view: MessageView) -> MessageOut:
        return cls(**view.__dict__)


class DestinationOut(BaseModel):
    name: str
    url: str
    signing: str
    paused: bool
    pending: int
    delivered: int
    dead: int

    @classmethod
    def of(cls, view: DestinationView) -> DestinationOut:
        return cls(**view.__dict__)


@router.get("/messages")
def list_messages(
    context: Context,
    principal: Operator,
    status: Literal["pending", "delivered", "dead"] | None = None,
    destination: Annotated[str | None, Query(max_length=160)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[MessageOut]:
    """Messages, newest first (their payloads are not shown)."""
    views = Outbox(context.db).messages(status=status, destination=destination, limit=limit)
    return [MessageOut.of(view) for view in views]


@router.get("/messages/{message_id}")
def get_message(message_id: MessageId, context: Context, principal: Operator) -> MessageOut:
    """One message's delivery status."""
    return MessageOut.of(Outbox(context.db).message(message_id))


@router.post("/messages/{message_id}/redeliver")
def redeliver(message_id: MessageId, context: Context, principal: Operator) -> MessageOut:
    """Send a delivered or dead message again, with the same ``webhook-id``."""
    return MessageOut.of(Outbox(context.db).redeliver(message_id, actor=principal.actor))


@router.get("/destinations")
def list_destinations(context: Context, principal: Operator) -> list[DestinationOut]:
    """Every destination with its message counts."""
    return [DestinationOut.of(view) for view in Outbox(context.db).destinations()]


@router.post("/destinations/{name}/pause")
def pause(name: DestinationName, context: Context, principal: Operator) -> DestinationOut:
    """No delivery attempts to this destination until resumed; messages wait."""
    return DestinationOut.of(Outbox(context.db).set_paused(name, True, actor=principal.actor))


@router.post("/destinations/{name}/resume")
def resume(name: DestinationName, context: Context, principal: Operator) -> DestinationOut:
    """Deliveries to this destination start again."""
    return DestinationOut.of(Outbox(context.db).set_paused(name, False, actor=principal.actor))
