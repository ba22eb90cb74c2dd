"""pki: restricted certificate authorities

Revision ID: pki_0002
Revises: pki_0001
Create Date: 2026-12-06

A restricted CA issues nothing through the generic issuing route and has no CA below it;
its owner issues its certificates, for keys the key store holds. Existing CAs are not
restricted; the TMK branch's tmk_0006 restricts the key server's root (KSRCRT).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "pki_0002"
down_revision = "pki_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pki_cas") as batch_op:
        batch_op.add_column(
            sa.Column("restricted", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("pki_cas") as batch_op:
        batch_op.drop_column("restricted")
