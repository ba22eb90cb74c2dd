"""The spine's tables: API tokens here, the audit log in :mod:`trustfleet.store.audit`."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from trustfleet.store.audit import AuditRecord
from trustfleet.store.engine import Base

__all__ = ["ROLES", "ApiToken", "AuditRecord", "Role"]


class Role(StrEnum):
    """The one role an API token carries. No role implies another: admin is not a superuser,
    each route lists the roles it admits. ``auditor`` reads the audit log and the listings
    and changes nothing."""

    ADMIN = "admin"
    MANUFACTURER = "manufacturer"
    OPERATOR = "operator"
    PLATFORM = "platform"
    SMS_GATEWAY = "sms-gateway"
    DEVICE_GATEWAY = "device-gateway"
    AUDITOR = "auditor"


ROLES = frozenset(role.value for role in Role)


class ApiToken(Base):
    """An API token; only the SHA-256 of its text is stored, so the table leaks no token.
    Names are unique among all tokens, revoked and expired ones included, so that the
    audit log's ``token:<id>:<name>`` names one token for ever."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: None: the token never expires
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
