"""keysync: imported terminal keys, registrations, platforms, gateways and bindings

Revision ID: keysync_0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "keysync_0001"
down_revision = None
branch_labels = ("keysync",)
depends_on = ("outbox_0001",)

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "keysync_service_keys",
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("key_handle", sa.String(length=200), nullable=True),
        sa.Column("public_key_der", sa.LargeBinary(), nullable=True),
        sa.Column("sealed_private", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("purpose", name=op.f("pk_keysync_service_keys")),
    )
    op.create_table(
        "keysync_imports",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("rows_done", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("unchanged", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
        sa.Column("kek_handle", sa.String(length=200), nullable=False),
        sa.Column("sealed_dek", sa.LargeBinary(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.Column("completed_at", _TIME, nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'completed')", name=op.f("ck_keysync_imports_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keysync_imports")),
    )
    op.create_table(
        "keysync_import_rejections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("import_id", sa.String(length=64), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("terminal_id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("code", sa.String(length=40), nullable=False),
        sa.Column("message", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["import_id"],
            ["keysync_imports.id"],
            name=op.f("fk_keysync_import_rejections_import_id_keysync_imports"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keysync_import_rejections")),
    )
    op.create_index(
        "ix_keysync_import_rejections_import_id_row",
        "keysync_import_rejections",
        ["import_id", "row"],
        unique=False,
    )
    op.create_table(
        "keysync_terminal_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("terminal_id", sa.String(length=64), nullable=False),
        sa.Column("application_id", sa.String(length=32), nullable=True),
        sa.Column("label", sa.String(length=100), nullable=False),
        sa.Column("algorithm", sa.String(length=16), nullable=False),
        sa.Column("sealed_key", sa.LargeBinary(), nullable=False),
        sa.Column("import_id", sa.String(length=64), nullable=False),
        sa.Column("fingerprint", sa.String(length=32), nullable=False),
        sa.Column("last_counter", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["import_id"],
            ["keysync_imports.id"],
            name=op.f("fk_keysync_terminal_keys_import_id_keysync_imports"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keysync_terminal_keys")),
        sa.UniqueConstraint("key_id", name=op.f("uq_keysync_terminal_keys_key_id")),
    )
    op.create_index(
        op.f("ix_keysync_terminal_keys_terminal_id"),
        "keysync_terminal_keys",
        ["terminal_id"],
        unique=False,
    )
    op.create_table(
        "keysync_manufacturer_keys",
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("manufacturer", sa.String(length=200), nullable=False),
        sa.Column("algorithm", sa.String(length=20), nullable=False),
        sa.Column("public_key_der", sa.LargeBinary(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("kid", name=op.f("pk_keysync_manufacturer_keys")),
    )
    op.create_table(
        "keysync_subscribers",
        sa.Column("mdn", sa.String(length=20), nullable=False),
        sa.Column("terminal_id", sa.String(length=64), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("mdn", name=op.f("pk_keysync_subscribers")),
        sa.UniqueConstraint("terminal_id", name=op.f("uq_keysync_subscribers_terminal_id")),
    )
    op.create_table(
        "keysync_registrations",
        sa.Column("mdn", sa.String(length=20), nullable=False),
        sa.Column("application_id", sa.String(length=32), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["mdn"],
            ["keysync_subscribers.mdn"],
            name=op.f("fk_keysync_registrations_mdn_keysync_subscribers"),
        ),
        sa.PrimaryKeyConstraint("mdn", "application_id", name=op.f("pk_keysync_registrations")),
    )
    op.create_table(
        "keysync_platforms",
        sa.Column("application_id", sa.String(length=32), nullable=False),
        sa.Column("hpke_kind", sa.String(length=16), nullable=False),
        sa.Column("hpke_public_key_der", sa.LargeBinary(), nullable=False),
        sa.Column("destination", sa.String(length=160), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("application_id", name=op.f("pk_keysync_platforms")),
    )
    op.create_table(
        "keysync_gateways",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("webhook_url", sa.String(length=2000), nullable=False),
        sa.Column("sealed_secret", sa.LargeBinary(), nullable=False),
        sa.Column("kek_handle", sa.String(length=200), nullable=False),
        sa.Column("reply_url", sa.String(length=2000), nullable=True),
        sa.Column("reply_account", sa.String(length=100), nullable=True),
        sa.Column("reply_from", sa.String(length=20), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_keysync_gateways")),
    )
    op.create_table(
        "keysync_bindings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mdn", sa.String(length=20), nullable=False),
        sa.Column("application_id", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("terminal_id", sa.String(length=64), nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("active_slot", sa.String(length=60), nullable=True),
        sa.Column("counter", sa.BigInteger(), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("replaced_at", _TIME, nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'replaced')", name=op.f("ck_keysync_bindings_status")
        ),
        sa.ForeignKeyConstraint(
            ["mdn"],
            ["keysync_subscribers.mdn"],
            name=op.f("fk_keysync_bindings_mdn_keysync_subscribers"),
        ),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["keysync_terminal_keys.key_id"],
            name=op.f("fk_keysync_bindings_key_id_keysync_terminal_keys"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keysync_bindings")),
        sa.UniqueConstraint("active_slot", name=op.f("uq_keysync_bindings_active_slot")),
    )
    op.create_index(op.f("ix_keysync_bindings_mdn"), "keysync_bindings", ["mdn"], unique=False)


def downgrade() -> None:
    for table in (
        "keysync_bindings",
        "keysync_gateways",
        "keysync_platforms",
        "keysync_registrations",
        "keysync_subscribers",
        "keysync_manufacturer_keys",
        "keysync_terminal_keys",
        "keysync_import_rejections",
        "keysync_imports",
        "keysync_service_keys",
    ):
        op.drop_table(table)
