"""The hand-written server_0001 migration creates exactly what the models describe."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from trustfleet.db import Base
from trustfleet.models import import_all_models

SERVER_TABLES = {"api_tokens", "audit_log"}


def _ours(obj: Any, name: str | None, type_: str, _reflected: bool, _other: Any) -> bool:
    if type_ == "table":
        return name in SERVER_TABLES
    table = getattr(obj, "table", None)
    return table is not None and table.name in SERVER_TABLES


def test_migrated_schema_matches_the_models(engine: Engine) -> None:
    import_all_models()
    assert set(Base.metadata.tables) >= SERVER_TABLES
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_object": _ours}
        )
        assert compare_metadata(context, Base.metadata) == []
