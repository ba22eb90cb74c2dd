"""Shared fixtures: a migrated database on SQLite, and again on PostgreSQL when
``TRUSTFLEET_TEST_POSTGRES_URL`` is set (each test gets its own schema there)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.db import make_engine, make_session_factory, migrate

POSTGRES_URL = os.environ.get("TRUSTFLEET_TEST_POSTGRES_URL", "")
DATABASES = ["sqlite"] + (["postgres"] if POSTGRES_URL else [])


def _postgres_schema_url(schema: str) -> str:
    sep = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database; the test is run once per available backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'trustfleet.db'}"
        return
    schema = "t_" + secrets.token_hex(6)
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield _postgres_schema_url(schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)
