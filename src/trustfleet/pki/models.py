"""PKI tables: certificate authorities and every certificate they issued.

Private keys are not here: a CA row holds only its key-store handle. The migrations
``pki_0001`` and ``pki_0002`` create exactly these tables; change both together.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from trustfleet.store.engine import Base

KINDS = ("root", "intermediate", "server", "device")
STATUSES = ("active", "revoked")


class CertificateAuthority(Base):
    __tablename__ = "pki_cas"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    algorithm: Mapped[str] = mapped_column(String(20))
    key_handle: Mapped[str] = mapped_column(String(200))
    certificate_der: Mapped[bytes] = mapped_column(LargeBinary)
    serial_hex: Mapped[str] = mapped_column(String(40))
    parent_name: Mapped[str | None] = mapped_column(String(63), ForeignKey("pki_cas.name"))
    path_length: Mapped[int] = mapped_column(Integer)
    #: a restricted CA (the TMK key server's KSRCRT) issues no certificate through the
    #: generic routes, and no CA below it: only its owner's certificates, for keys the key
    #: store holds (``PkiService.issue_server_certificate_for_held_key``)
    restricted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: number of the last CRL signed; the next one gets crl_number + 1
    crl_number: Mapped[int] = mapped_column(Integer, default=0)
    #: the last CRL signed and when; cleared by every revocation so the next one is fresh
    crl_der: Mapped[bytes | None] = mapped_column(LargeBinary)
    crl_this_update: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IssuedCertificate(Base):
    __tablename__ = "pki_certificates"
    __table_args__ = (
        CheckConstraint(f"kind IN {KINDS!r}", name="kind"),
        CheckConstraint(f"status IN {STATUSES!r}", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    serial_hex: Mapped[str] = mapped_column(String(40), unique=True)
    issuer_name: Mapped[str] = mapped_column(String(63), ForeignKey("pki_cas.name"), index=True)
    subject: Mapped[str] = mapped_column(String(500), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    not_after: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    der: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(20), default="active")
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revocation_reason: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
