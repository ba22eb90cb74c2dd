"""Tables of the POS terminal master key capability."""

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
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from trustfleet.store.engine import Base


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


# -- download sessions, keys and the key server's identity (migration tmk_0002) --------

SESSION_STAGES = ("challenged", "delivered", "active", "aborted")
TMK_STATUSES = ("pending", "active", "retired", "aborted")
WORKING_KEY_STATUSES = ("active", "retired")
IDENTITY_STATUSES = ("active", "retired", "revoked")


class DownloadSession(Base):
    """One TMK download between two requests: the protocol's ``ServerSessionState`` as JSON.

    The state holds no secret (randoms, times and an opaque key store handle); ``stage`` and
    ``expires_at`` repeat what it says so sessions can be queried and swept.
    """

    __tablename__ = "tmk_download_sessions"
    __table_args__ = (
        CheckConstraint(f"stage IN {SESSION_STAGES!r}", name="stage"),
        # a terminal's open sessions are found without reading the ended ones, however many
        # it has (anyone with the gateway token can end sessions by the thousand)
        Index("ix_tmk_download_sessions_sn_stage", "sn", "stage"),
    )

    session_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sn: Mapped[str] = mapped_column(String(64), ForeignKey("tmk_terminals.sn"))
    stage: Mapped[str] = mapped_column(String(16), index=True)
    state_json: Mapped[str] = mapped_column(Text)
    tmk_algorithm: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: the stable code of the error that aborted the session
    error_code: Mapped[str | None] = mapped_column(String(64))
    # what the session answered, so that a repeated request gets the same answer
    # (migration tmk_0005; docs/tmk-protocol.md, "Retries")
    #: SHA-256 (hex) of the canonical proof this session was stored from (delivered, or
    #: refused at the proof step)
    proof_sha256: Mapped[str | None] = mapped_column(String(64))
    #: the key delivery answered to that proof, byte for byte: the TMK wrapped to the
    #: terminal's key (ciphertext only the terminal can open) and its KCV, no secret
    delivery_json: Mapped[str | None] = mapped_column(Text)
    #: SHA-256 (hex) of the canonical confirmation that activated the session, or that was
    #: refused and ended it
    confirmation_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TerminalMasterKey(Base):
    """A TMK made for a terminal: pending (delivered, unconfirmed), active (confirmed; at
    most one per SN, enforced by the unique ``active_sn``), retired or aborted. Rows are
    history; the key itself is destroyed in the key store once it is no longer active
    (``destroyed_at``)."""

    __tablename__ = "tmk_master_keys"
    __table_args__ = (CheckConstraint(f"status IN {TMK_STATUSES!r}", name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sn: Mapped[str] = mapped_column(String(64), ForeignKey("tmk_terminals.sn"), index=True)
    session_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tmk_download_sessions.session_id"), unique=True
    )
    key_handle: Mapped[str] = mapped_column(String(200))
    algorithm: Mapped[str] = mapped_column(String(16))
    kcv_hex: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    #: the SN while this TMK is active, else NULL: one active TMK per terminal on any node
    active_sn: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    destroyed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WorkingKey(Base):
    """A working key issued to a terminal as a TR-31 block under its TMK. At most one active
    key per (SN, usage), enforced by the unique ``active_slot``."""

    __tablename__ = "tmk_working_keys"
    __table_args__ = (CheckConstraint(f"status IN {WORKING_KEY_STATUSES!r}", name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sn: Mapped[str] = mapped_column(String(64), ForeignKey("tmk_terminals.sn"), index=True)
    tmk_id: Mapped[int] = mapped_column(ForeignKey("tmk_master_keys.id"), index=True)
    usage: Mapped[str] = mapped_column(String(2))
    algorithm: Mapped[str] = mapped_column(String(16))
    key_version: Mapped[str] = mapped_column(String(2))
    key_handle: Mapped[str] = mapped_column(String(200))
    kcv_hex: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    #: "<sn>:<usage>" while active, else NULL
    active_slot: Mapped[str | None] = mapped_column(String(80), unique=True)
    issued_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    destroyed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DownloadPolicy(Base):
    """Per terminal: the TMK algorithm its downloads get, and whether an operator asked for
    a new TMK (a terminal that has an active TMK may download again only then)."""

    __tablename__ = "tmk_download_policies"

    sn: Mapped[str] = mapped_column(String(64), ForeignKey("tmk_terminals.sn"), primary_key=True)
    tmk_algorithm: Mapped[str] = mapped_column(String(16))
    rotation_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    requested_by: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ServerIdentity(Base):
    """A key-server work key (a key store handle) and its work certificate KSWCRT, issued
    under the KSRCRT root CA of :mod:`trustfleet.pki`. One is active (``active_slot`` = 1);
    rotated ones are retired, revoked ones revoked."""

    __tablename__ = "tmk_server_identities"
    __table_args__ = (CheckConstraint(f"status IN {IDENTITY_STATUSES!r}", name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    work_key_handle: Mapped[str] = mapped_column(String(200))
    algorithm: Mapped[str] = mapped_column(String(20))
    kswcrt_der: Mapped[bytes] = mapped_column(LargeBinary)
    serial_hex: Mapped[str] = mapped_column(String(40), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    active_slot: Mapped[int | None] = mapped_column(Integer, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: the HMAC key that seals this identity's session tickets (migration tmk_0003); kept
    #: when the identity is retired (its tickets live out their minute), destroyed when
    #: it is revoked
    ticket_key_handle: Mapped[str | None] = mapped_column(String(200))
