"""Database engine, declarative base, session factory (tests inspect tables with it) and
migrations. Use cases run their database work through :mod:`trustfleet.store.work`.

SQLite (WAL) is the embedded default; PostgreSQL by URL for multi-node deployments. Every
table is created by the Alembic migrations in ``trustfleet/store/migrations``; never by
``create_all`` outside tests of a single model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


#: how long a write waits for another writer before it gives up with ``database-busy`` (503
#: and ``Retry-After``): SQLite's ``busy_timeout`` for its write lock, PostgreSQL's
#: ``lock_timeout`` for a row lock and the pool's checkout timeout (docs/configuration.md)
WRITE_WAIT_SECONDS = 10


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # transactions are begun by _sqlite_begin_immediate
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={WRITE_WAIT_SECONDS * 1000}")
    # deleted and overwritten content (a destroyed key's wrapped copy) is zeroed in the
    # page, not left in its free space; the WAL's older copies go at the checkpoint that
    # follows a key's destruction (UnitOfWork.checkpoint_after_commit)
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _postgres_lock_timeout(dbapi_connection: Any, _record: Any) -> None:
    # a write that waits for a row lock longer than this fails (database-busy) instead of
    # holding its request and its pooled connection indefinitely
    dbapi_connection.execute(f"SET lock_timeout = '{WRITE_WAIT_SECONDS}s'")
    dbapi_connection.commit()


def _sqlite_begin(connection: Any) -> None:
    # Take the write lock at BEGIN: two processes that both read then write would otherwise
    # deadlock on the lock upgrade, which busy_timeout cannot resolve. The price: a write
    # transaction must not wait for another write transaction of the same thread (a key
    # store write inside a service's open transaction would block until busy_timeout).
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _create_owner_only(url: str) -> None:
    """Create a SQLite URL's database file (mode 0600) before SQLite does (with 0644 under
    the usual umask); SQLite gives the WAL and shared-memory files it makes beside it the
    database file's mode. An existing file is left as it is."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        return  # SQLite reports what is wrong with the path when it opens it


def make_engine(url: str) -> Engine:
    """An engine for ``url``: WAL, a busy timeout and immediate transactions on SQLite (its
    file created owner-only), pre-ping and a lock timeout on PostgreSQL (both
    :data:`WRITE_WAIT_SECONDS`)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        _create_owner_only(url)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=20,
        pool_timeout=WRITE_WAIT_SECONDS,
    )
    event.listen(engine, "connect", _postgres_lock_timeout)
    return engine


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def migrate(engine: Engine, target: str = "heads") -> None:
    """Apply every domain's Alembic branch up to its head (idempotent); ``target`` names
    one revision instead (tests of a migration start from the revision before it)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, target)
