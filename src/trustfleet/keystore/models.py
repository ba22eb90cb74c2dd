"""The soft key store's table: one row per key, the material wrapped under a master key."""

from __future__ import annotations

import hashlib
import struct
from datetime import datetime

from sqlalchemy import Boolean, DateTime, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from trustfleet.store.engine import Base


class StoredKey(Base):
    """A key of the soft store.

    ``wrapped`` is ``nonce || AES-256-GCM(master key, material)`` with associated data binding
    the row's handle, algorithm, usage and exportability (see ``trustfleet.keystore.soft``),
    so swapping ``wrapped`` between rows or editing the flags makes the key unusable rather
    than more usable. ``kek_id`` names the master key that wrapped it. A destroyed key keeps
    its row (so the handle is never reused) with ``wrapped`` emptied.
    """

    __tablename__ = "keystore_keys"

    handle: Mapped[str] = mapped_column(String(80), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(32))
    usage: Mapped[int] = mapped_column(Integer)
    exportable: Mapped[bool] = mapped_column(Boolean)
    label: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    public_key_der: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(String(16), index=True)
    destroyed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    def binding(self) -> bytes:
        """Associated data of ``wrapped``: what must not change without detection."""
        return row_binding(
            self.handle, self.algorithm, self.usage, self.exportable, self.public_key_der
        )


def row_binding(
    handle: str, algorithm: str, usage: int, exportable: bool, public_key_der: bytes | None
) -> bytes:
    fields = (
        handle.encode(),
        algorithm.encode(),
        struct.pack(">Q", usage),
        b"\x01" if exportable else b"\x00",
        hashlib.sha256(public_key_der or b"").digest(),
    )
    return b"trustfleet-keystore-v1" + b"".join(struct.pack(">H", len(f)) + f for f in fields)
