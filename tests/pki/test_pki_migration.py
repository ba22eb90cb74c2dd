"""The PKI tables come from their own Alembic branch (tests/server/test_server_schema.py
checks every migrated table against the models)."""

from __future__ import annotations

from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from trustfleet.pki import models

PKI_TABLES = {models.CertificateAuthority.__tablename__, models.IssuedCertificate.__tablename__}


def test_the_migration_is_its_own_branch(engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) >= PKI_TABLES
    with engine.connect() as connection:
        heads = set(MigrationContext.configure(connection).get_current_heads())
    assert "pki_0001" in heads
