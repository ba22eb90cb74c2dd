"""tmk: the terminal registry

Revision ID: tmk_0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "tmk_0001"
down_revision = None
branch_labels = ("tmk",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tmk_terminals",
        sa.Column("sn", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("key_algorithm", sa.String(length=20), nullable=False),
        sa.Column("public_key_der", sa.LargeBinary(), nullable=False),
        sa.Column("key_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("registered_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sn", name=op.f("pk_tmk_terminals")),
    )


def downgrade() -> None:
    op.drop_table("tmk_terminals")
