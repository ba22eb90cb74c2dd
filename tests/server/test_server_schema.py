"""The hand-written migrations of every domain create exactly what the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from trustfleet.models import import_all_models
from trustfleet.store.engine import Base

SERVER_TABLES = {"api_tokens", "audit_log"}


def test_migrated_schema_matches_the_models(engine: Engine) -> None:
    import_all_models()
    assert set(Base.metadata.tables) >= SERVER_TABLES
    assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
