"""Tables of the key-sync capability (migration keysync_0001).

Terminal keys are stored only sealed: AES-256-GCM under their import's data-encryption key
(DEK), which is itself stored only as the key store sealed it (``keystore.encrypt`` under
the capability's key-encryption key). Secrets of gateways and the import private key are
sealed the same way. No column holds key material in the clear (docs/keysync.md).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
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

IMPORT_STATUSES = ("running", "completed")
BINDING_STATUSES = ("active", "replaced")


class ServiceKey(Base):
    """The capability's own keys: ``kek`` (AES-256 key store key that seals DEKs and
    secrets), ``fingerprint`` (HMAC key store key behind the duplicate check) and ``import``
    (the X25519 key pair manifests are sealed to: its public half, and its private half
    sealed under the KEK)."""

    __tablename__ = "keysync_service_keys"

    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_handle: Mapped[str | None] = mapped_column(String(200))
    public_key_der: Mapped[bytes | None] = mapped_column(LargeBinary)
    sealed_private: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class KeyImport(Base):
    """One import job: its content's digest, how far it got (``rows_done``: resumable),
    its counts, and its DEK sealed by the key store."""

    __tablename__ = "keysync_imports"
    __table_args__ = (CheckConstraint(f"status IN {IMPORT_STATUSES!r}", name="status"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    format: Mapped[str] = mapped_column(String(16))
    content_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    rows_done: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[int] = mapped_column(Integer)
    unchanged: Mapped[int] = mapped_column(Integer)
    rejected: Mapped[int] = mapped_column(Integer)
    kek_handle: Mapped[str] = mapped_column(String(200))
    sealed_dek: Mapped[bytes] = mapped_column(LargeBinary)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ImportRejection(Base):
    """A rejected row of an import, with its code (the per-row report)."""

    __tablename__ = "keysync_import_rejections"
    __table_args__ = (Index("ix_keysync_import_rejections_import_id_row", "import_id", "row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    import_id: Mapped[str] = mapped_column(String(64), ForeignKey("keysync_imports.id"))
    row: Mapped[int] = mapped_column(Integer)
    terminal_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(64))
    code: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(String(200))


class TerminalKey(Base):
    """A terminal's key as its manufacturer imported it. ``sealed_key`` is AES-256-GCM under
    the import's DEK with the row's identity as associated data; ``fingerprint`` (a keyed
    hash, not the key) tells a re-import of the same key from a conflicting one;
    ``last_counter`` is the highest key-sync counter accepted (replays are refused)."""

    __tablename__ = "keysync_terminal_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    terminal_id: Mapped[str] = mapped_column(String(64), index=True)
    application_id: Mapped[str | None] = mapped_column(String(32))
    label: Mapped[str] = mapped_column(String(100))
    algorithm: Mapped[str] = mapped_column(String(16))
    sealed_key: Mapped[bytes] = mapped_column(LargeBinary)
    import_id: Mapped[str] = mapped_column(String(64), ForeignKey("keysync_imports.id"))
    fingerprint: Mapped[str] = mapped_column(String(32))
    last_counter: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ManufacturerKey(Base):
    """A manufacturer's manifest signing key (public half), by its JWS ``kid``."""

    __tablename__ = "keysync_manufacturer_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    manufacturer: Mapped[str] = mapped_column(String(200))
    algorithm: Mapped[str] = mapped_column(String(20))
    public_key_der: Mapped[bytes] = mapped_column(LargeBinary)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Subscriber(Base):
    """A registered MDN (E.164) and, once known, the one terminal it is bound to."""

    __tablename__ = "keysync_subscribers"

    mdn: Mapped[str] = mapped_column(String(20), primary_key=True)
    terminal_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Registration(Base):
    """A service registration: this MDN uses this application."""

    __tablename__ = "keysync_registrations"

    mdn: Mapped[str] = mapped_column(
        String(20), ForeignKey("keysync_subscribers.mdn"), primary_key=True
    )
    application_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Platform(Base):
    """An application platform: its HPKE public key and its outbox destination (webhook URL
    and signing)."""

    __tablename__ = "keysync_platforms"

    application_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hpke_kind: Mapped[str] = mapped_column(String(16))
    hpke_public_key_der: Mapped[bytes] = mapped_column(LargeBinary)
    destination: Mapped[str] = mapped_column(String(160))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Gateway(Base):
    """An SMS gateway: the webhook URL it calls (what its signature covers), its signing
    secret sealed under the KEK, and optionally its outbound API for reply SMS."""

    __tablename__ = "keysync_gateways"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    webhook_url: Mapped[str] = mapped_column(String(2000))
    sealed_secret: Mapped[bytes] = mapped_column(LargeBinary)
    kek_handle: Mapped[str] = mapped_column(String(200))
    reply_url: Mapped[str | None] = mapped_column(String(2000))
    reply_account: Mapped[str | None] = mapped_column(String(100))
    reply_from: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Binding(Base):
    """MDN <-> application ID <-> key ID (<-> the key, by its row), and the delivery that
    pushed it. One active binding per (MDN, application), enforced by ``active_slot``."""

    __tablename__ = "keysync_bindings"
    __table_args__ = (CheckConstraint(f"status IN {BINDING_STATUSES!r}", name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mdn: Mapped[str] = mapped_column(String(20), ForeignKey("keysync_subscribers.mdn"), index=True)
    application_id: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(32), ForeignKey("keysync_terminal_keys.key_id"))
    terminal_id: Mapped[str] = mapped_column(String(64))
    delivery_id: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16))
    #: "<mdn>|<application id>" while active, else NULL
    active_slot: Mapped[str | None] = mapped_column(String(60), unique=True)
    counter: Mapped[int] = mapped_column(BigInteger)
    via: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    replaced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
