"""Tables of the fleet view (spec §1, issue 15): what hosts reported about their secure
elements, and the flags raised on it (docs/binding.md, *Fleet view*)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, CheckConstraint, DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from trustfleet.store.engine import Base

EVENT_KINDS = ("bound", "locked", "verified", "failed", "blocked")
FLAG_RULES = ("foreign-failure", "foreign-verification", "moved", "unknown-failure", "home-failure")
FLAG_STATUSES = ("open", "acknowledged")
#: SE IDs are 16 bytes, kept as 32 lowercase hex digits; device IDs at most 64 UTF-8 bytes
SE_ID_CHARS = 32
DEVICE_ID_CHARS = 64
REPORT_ID_CHARS = 32
ACTOR_CHARS = 200
NOTE_CHARS = 500


class SecureElementRecord(Base):
    """One SE as the fleet's reports describe it: the host it is bound to (the last host
    that reported ``bound`` or ``locked``, or the first that reported ``verified`` when no
    bind was ever reported), whether that host reported the lock, its last event and how
    many of its flags are open. Every report locks this row first."""

    __tablename__ = "se_elements"
    __table_args__ = (Index("ix_se_elements_open_flags", "open_flags"),)

    se_id: Mapped[str] = mapped_column(String(SE_ID_CHARS), primary_key=True)
    bound_device: Mapped[str | None] = mapped_column(String(DEVICE_ID_CHARS), index=True)
    locked: Mapped[bool] = mapped_column(Boolean)
    #: ``bound`` reports received, from any host (an SE binds again only after a reset)
    binds: Mapped[int] = mapped_column(Integer)
    bound_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_kind: Mapped[str] = mapped_column(String(16))
    last_device: Mapped[str] = mapped_column(String(DEVICE_ID_CHARS))
    last_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    open_flags: Mapped[int] = mapped_column(Integer)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BindingEventRecord(Base):
    """One report of a host: an event of its power-up. ``report_id`` is the reporter's
    idempotency key (a retried report is recorded once); ``reported_at`` is the host's
    clock, ``received_at`` the server's (reports are judged in the order received)."""

    __tablename__ = "se_events"
    __table_args__ = (
        CheckConstraint(f"kind IN {EVENT_KINDS!r}", name="kind"),
        # an SE's history, newest first, without reading other SEs' events
        Index("ix_se_events_se_id_id", "se_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[str] = mapped_column(String(REPORT_ID_CHARS), unique=True)
    se_id: Mapped[str] = mapped_column(String(SE_ID_CHARS), ForeignKey("se_elements.se_id"))
    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_CHARS))
    kind: Mapped[str] = mapped_column(String(16))
    reported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    reported_by: Mapped[str] = mapped_column(String(ACTOR_CHARS))


class FleetFlag(Base):
    """A rule the reports broke (``FLAG_RULES``), for an operator to look at and
    acknowledge. At most one flag is open per (SE, rule, reporting host), enforced by the
    unique ``open_key`` (set only while open): a repeat of the same evidence counts on the
    open flag (``count``, ``last_seen_at``); after an acknowledgement it opens a new one."""

    __tablename__ = "se_flags"
    __table_args__ = (
        CheckConstraint(f"rule IN {FLAG_RULES!r}", name="rule"),
        CheckConstraint(f"status IN {FLAG_STATUSES!r}", name="status"),
        Index("ix_se_flags_status_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    se_id: Mapped[str] = mapped_column(
        String(SE_ID_CHARS), ForeignKey("se_elements.se_id"), index=True
    )
    rule: Mapped[str] = mapped_column(String(32))
    #: the host whose report raised it, and the SE's bound host at that moment
    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_CHARS), index=True)
    bound_device: Mapped[str | None] = mapped_column(String(DEVICE_ID_CHARS))
    #: the report that raised it
    report_id: Mapped[str] = mapped_column(
        String(REPORT_ID_CHARS), ForeignKey("se_events.report_id")
    )
    count: Mapped[int] = mapped_column(Integer)
    raised_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16))
    #: "<se_id>|<rule>|<device_id>" while open, else NULL: one open flag per key, any node
    open_key: Mapped[str | None] = mapped_column(String(140), unique=True)
    acknowledged_by: Mapped[str | None] = mapped_column(String(ACTOR_CHARS))
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    note: Mapped[str] = mapped_column(String(NOTE_CHARS))
