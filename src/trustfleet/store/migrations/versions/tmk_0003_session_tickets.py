"""tmk: the key that seals each identity's session tickets

Revision ID: tmk_0003
Revises: tmk_0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "tmk_0003"
down_revision = "tmk_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tmk_server_identities") as batch_op:
        batch_op.add_column(sa.Column("ticket_key_handle", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tmk_server_identities") as batch_op:
        batch_op.drop_column("ticket_key_handle")
