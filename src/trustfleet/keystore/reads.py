"""The engine for the key store's per-call row read, the hot path of every key operation.

On PostgreSQL the shared engine pings each connection at checkout and wraps each statement
in BEGIN/ROLLBACK: three round trips around a one-row select. Key reads use a companion
engine on the same URL instead, in autocommit and without the ping, shared by every store
on that engine and disposed with it; a connection found dead is retried once. SQLite
needs none of this (no network); its reads are deferred transactions (see trustfleet.db).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError

from trustfleet.db import READ_ONLY

T = TypeVar("T")

_READ_POOL_SIZE = 5
_READ_MAX_OVERFLOW = 15
_companions: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def read_engine(engine: Engine) -> Engine:
    if engine.dialect.name != "postgresql":
        # deferred transactions: a key read never waits for a writer (even a caller's own
        # open write transaction, which would otherwise deadlock until busy_timeout)
        return engine.execution_options(**{READ_ONLY: True})
    with _lock:
        companion = _companions.get(engine)
        if companion is None:
            companion = create_engine(
                engine.url,
                isolation_level="AUTOCOMMIT",
                pool_pre_ping=False,
                pool_size=_READ_POOL_SIZE,
                max_overflow=_READ_MAX_OVERFLOW,
            )
            _companions[engine] = companion
            event.listen(engine, "engine_disposed", lambda _: companion.dispose())
        return companion


def run_read(engine: Engine, query: Callable[[Connection], T]) -> T:
    """``query`` on a pooled connection of ``engine``; once more if the connection was dead."""
    try:
        with engine.connect() as connection:
            return query(connection)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    with engine.connect() as connection:
        return query(connection)
