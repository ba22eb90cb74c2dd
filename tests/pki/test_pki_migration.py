"""The hand-written migration pki_0001 creates exactly what the models describe."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from trustfleet.db import Base
from trustfleet.pki import models

PKI_TABLES = {models.CertificateAuthority.__tablename__, models.IssuedCertificate.__tablename__}


def _pki_only(diff: Any) -> bool:
    """Whether an autogenerate diff entry concerns one of the PKI tables."""
    entries = diff if isinstance(diff, list) else [diff]
    for entry in entries:
        for part in entry:
            table = getattr(part, "table", None)
            name = getattr(table, "name", None) or getattr(part, "name", None)
            if name in PKI_TABLES or (isinstance(part, str) and part in PKI_TABLES):
                return True
    return False


def test_migrated_schema_matches_the_models(engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) >= PKI_TABLES
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "render_as_batch": True}
        )
        differences = [d for d in compare_metadata(context, Base.metadata) if _pki_only(d)]
    assert differences == []


def test_the_migration_is_its_own_branch(engine: Engine) -> None:
    with engine.connect() as connection:
        heads = set(MigrationContext.configure(connection).get_current_heads())
    assert "pki_0001" in heads
