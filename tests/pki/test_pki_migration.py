"""The PKI tables come from their own Alembic branch (tests/server/test_server_schema.py
checks every migrated table against the models)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from trustfleet.pki import models
from trustfleet.store import engine as engine_module
from trustfleet.store.engine import make_engine, migrate

PKI_TABLES = {models.CertificateAuthority.__tablename__, models.IssuedCertificate.__tablename__}


def test_the_migration_is_its_own_branch(engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) >= PKI_TABLES
    config = Config()
    config.set_main_option(
        "script_location", str(Path(engine_module.__file__).parent / "migrations")
    )
    script = ScriptDirectory.from_config(config)
    assert script.get_revision("pki_0001").branch_labels == {"pki"}
    assert script.get_revision("pki@head").revision == "pki_0002"
    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        # applied; not a head of its own since tmk_0006 (a head) depends on it
        assert "pki_0002" in {
            r.revision for r in script.iterate_revisions(context.get_current_heads(), "base")
        }


def test_an_existing_key_server_root_is_restricted_by_the_migration(database_url: str) -> None:
    """KSRCRT made before CAs could be restricted is restricted by tmk_0006; other CAs are
    left unrestricted."""
    engine = make_engine(database_url)
    try:
        migrate(engine, "pki_0001")
        with engine.begin() as connection:
            for number, name in enumerate(["tmk-ksrcrt", "trustfleet-root"], start=1):
                connection.execute(
                    text(
                        "INSERT INTO pki_cas (id, name, algorithm, key_handle, certificate_der,"
                        " serial_hex, path_length, crl_number, created_at) VALUES (:id, :name,"
                        " 'ec-p256', :handle, :der, :serial, 0, 0, '2026-01-01')"
                    ),
                    {"id": number, "name": name, "handle": f"h{number}", "der": b"x",
                     "serial": f"{number:02x}"},
                )  # fmt: skip
        migrate(engine)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT name, restricted FROM pki_cas")).all()
        assert {name: bool(restricted) for name, restricted in rows} == {
            "tmk-ksrcrt": True,
            "trustfleet-root": False,
        }
    finally:
        engine.dispose()
