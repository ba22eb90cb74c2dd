"""tmk: what a download session answered, so that a repeated proof or confirmation gets
the same answer

Revision ID: tmk_0005
Revises: tmk_0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "tmk_0005"
down_revision = "tmk_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tmk_download_sessions") as batch_op:
        batch_op.add_column(sa.Column("proof_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("delivery_json", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("confirmation_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tmk_download_sessions") as batch_op:
        batch_op.drop_column("confirmation_sha256")
        batch_op.drop_column("delivery_json")
        batch_op.drop_column("proof_sha256")
