"""keystore: the soft key store's table

Revision ID: keystore_0001
Revises:
Create Date: 2026-05-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "keystore_0001"
down_revision = None
branch_labels = ("keystore",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "keystore_keys",
        sa.Column("handle", sa.String(length=80), nullable=False),
        sa.Column("algorithm", sa.String(length=32), nullable=False),
        sa.Column("usage", sa.Integer(), nullable=False),
        sa.Column("exportable", sa.Boolean(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("public_key_der", sa.LargeBinary(), nullable=True),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("kek_id", sa.String(length=16), nullable=False),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("handle", name=op.f("pk_keystore_keys")),
    )
    with op.batch_alter_table("keystore_keys") as batch_op:
        batch_op.create_index(batch_op.f("ix_keystore_keys_kek_id"), ["kek_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("keystore_keys") as batch_op:
        batch_op.drop_index(batch_op.f("ix_keystore_keys_kek_id"))
    op.drop_table("keystore_keys")
