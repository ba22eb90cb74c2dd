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

#: The largest value an ``Integer`` column holds on every supported database: PostgreSQL's
#: ``integer`` is 32 bits (SQLite's 64). An API parameter compared with such a column is
#: bounded by it, or PostgreSQL refuses the statement (a 500 where a 422 is due).
MAX_INTEGER = 2**31 - 1

__all__ = [
    "MAX_INTEGER",
    "ConnectionLost",
    "Database",
    "DatabaseBusy",
    "IntegrityViolation",
    "Reads",
    "UnitOfWork",
    "WriteLockBusy",
]
