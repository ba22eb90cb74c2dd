"""tmk: a terminal's open sessions by (sn, stage), not by reading all its sessions

Revision ID: tmk_0004
Revises: tmk_0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "tmk_0004"
down_revision = "tmk_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tmk_download_sessions") as batch_op:
        batch_op.create_index("ix_tmk_download_sessions_sn_stage", ["sn", "stage"], unique=False)
        batch_op.drop_index(batch_op.f("ix_tmk_download_sessions_sn"))


def downgrade() -> None:
    with op.batch_alter_table("tmk_download_sessions") as batch_op:
        batch_op.create_index(batch_op.f("ix_tmk_download_sessions_sn"), ["sn"], unique=False)
        batch_op.drop_index("ix_tmk_download_sessions_sn_stage")
