"""Times as the protocols and the database carry them: aware, in UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC time. A naive value is taken as UTC (SQLite hands back
    naive datetimes, stored as UTC); PostgreSQL hands back aware ones in the connection's
    time zone, which need not be UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_seconds(now: datetime) -> datetime:
    """An aware time in UTC cut to whole seconds, as messages carry times. A naive ``now``
    is a caller's bug (it is ambiguous), not a peer's: ValueError."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC).replace(microsecond=0)


def utcnow() -> datetime:
    return datetime.now(UTC)
