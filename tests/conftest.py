"""Shared fixtures: a migrated database on SQLite, and again on PostgreSQL when
``TRUSTFLEET_TEST_POSTGRES_URL`` is set (each test gets its own schema there)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from harness import POSTGRES_URL, postgres_schema
from trustfleet.store import Database
from trustfleet.store.engine import make_engine, make_session_factory, migrate

DATABASES = ["sqlite"] + (["postgres"] if POSTGRES_URL else [])


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database; the test is run once per available backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'trustfleet.store.engine'}"
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def db(engine: Engine) -> Database:
    return Database(engine)
