"""The database: engine and migrations, the unit of work a use case runs in, and the
hash-chained audit log every use case appends to.

Below the key store (the soft key store keeps its wrapped keys here) and the PKI (whose
use cases audit too).
"""

from trustfleet.store.work import (
    ConnectionLost,
    Database,
    DatabaseBusy,
    IntegrityViolation,
    Reads,
    UnitOfWork,
    WriteLockBusy,
)

__all__ = [
    "ConnectionLost",
    "Database",
    "DatabaseBusy",
    "IntegrityViolation",
    "Reads",
    "UnitOfWork",
    "WriteLockBusy",
]
