"""Tables of the POS terminal master key capability."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from trustfleet.db import Base


class Terminal(Base):
    """A POS terminal registered by its manufacturer: SN and TKP public key (TKP_Pu)."""

    __tablename__ = "tmk_terminals"

    sn: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(100))
    key_algorithm: Mapped[str] = mapped_column(String(20))
    public_key_der: Mapped[bytes] = mapped_column(LargeBinary)
    #: SHA-256 hex of public_key_der, to tell a re-import from a conflicting one cheaply
    key_fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="active")  # active|suspended|revoked
    registered_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
