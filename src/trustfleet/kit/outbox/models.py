"""The outbox's tables: where messages go (destinations) and the messages themselves."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column

from trustfleet.store.engine import Base

SIGNING_METHODS = ("v1", "v1a")
MESSAGE_STATUSES = ("pending", "delivered", "dead")


class OutboxDestination(Base):
    """A webhook endpoint: its URL, how requests to it are signed (Standard Webhooks ``v1``
    HMAC-SHA256 or ``v1a`` Ed25519) with which key store key, and whether it is paused.
    The capability that owns it names it (``keysync:<application id>``)."""

    __tablename__ = "outbox_destinations"
    __table_args__ = (CheckConstraint(f"signing IN {SIGNING_METHODS!r}", name="signing"),)

    name: Mapped[str] = mapped_column(String(160), primary_key=True)
    url: Mapped[str] = mapped_column(String(2000))
    signing: Mapped[str] = mapped_column(String(8))
    key_handle: Mapped[str] = mapped_column(String(200))
    paused_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class OutboxMessage(Base):
    """One message for one destination. ``payload`` is the request body, opaque here (the
    capability sealed whatever is secret in it). A pending message is due at
    ``next_attempt_at``; a worker that claims it moves that time a lease ahead, so a worker
    that dies mid-attempt leaves it due again when the lease ends."""

    __tablename__ = "outbox_messages"
    __table_args__ = (
        CheckConstraint(f"status IN {MESSAGE_STATUSES!r}", name="status"),
        Index("ix_outbox_messages_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    destination: Mapped[str] = mapped_column(
        String(160), ForeignKey("outbox_destinations.name"), index=True
    )
    event_type: Mapped[str] = mapped_column(String(100))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
